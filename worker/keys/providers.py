"""Key providers: turn (key_id, tenant, subject, key_version) into the 32-byte seed, without key material ever
leaving the provider object.

- ``LocalKeyring``: a JSON keyring file (mode 0600) of key_id -> random key material; the seed is
  ``worker.keys.derive.derive_seed``. For development, tests and the embedded default.
- ``KmsHmacProvider``: AWS KMS HMAC keys (``KeySpec=HMAC_256``, ``KeyUsage=GENERATE_VERIFY_MAC``); the seed is
  ``GenerateMac(KeyId, Message=derivation_message(...), MacAlgorithm=HMAC_SHA_256)``, the same function computed
  inside KMS, so the key never leaves it.

Key state and per-subject key versions live in S3 (``worker.keys.registry.KeyRegistry``); ``seed_for`` refuses
unknown keys (``UnknownKeyError``) and keys the registry records as revoked (``RevokedKeyError``).

Nothing here logs, returns or raises with key material or seeds in it.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import secrets
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.contracts.ids import check_key_id
from worker.errors import (
    KeyProviderUnavailable,
    RevokedKeyError,
    UnknownKeyError,
)
from worker.keys.derive import MIN_KEY_BYTES, SEED_BYTES, derivation_message, seed_from_mac
from worker.keys.registry import KeyRegistry
from worker.storage.records import utcnow

if TYPE_CHECKING:
    from worker.settings import Settings
    from worker.storage.client import ObjectStore

log = logging.getLogger(__name__)

KEY_BYTES = 32


# --- providers -----------------------------------------------------------------------------------------------------
class KeyProvider(ABC):
    """Seeds from keys. Subclasses implement ``has_key`` and ``_mac``; the key material stays inside them."""

    name: str = "abstract"

    def __init__(self, registry: KeyRegistry | None = None) -> None:
        self.registry = registry

    @abstractmethod
    def has_key(self, key_id: str) -> bool:
        """Whether the provider holds a usable key ``key_id`` (raises ``KeyProviderUnavailable`` when it cannot
        tell)."""

    @abstractmethod
    def _mac(self, key_id: str, message: bytes) -> bytes:
        """HMAC-SHA256 of ``message`` under key ``key_id`` (32 bytes)."""

    def check_usable(self, tenant: str, key_id: str) -> None:
        """Raise ``UnknownKeyError`` / ``RevokedKeyError`` unless ``key_id`` can derive seeds for ``tenant``."""
        check_key_id(key_id)
        if self.registry is not None and self.registry.is_revoked(tenant, key_id):
            raise RevokedKeyError(f"key {key_id} is revoked for tenant {tenant}")
        if not self.has_key(key_id):
            raise UnknownKeyError(f"key {key_id} is not known to the {self.name} provider{self._unknown_hint(key_id)}")

    def _unknown_hint(self, key_id: str) -> str:
        return ""

    def seed_for(self, key_id: str, tenant: str, subject: str, key_version: int) -> bytes:
        """The 32-byte seed of (tenant, subject, key_version) under ``key_id``. Secret: never log it."""
        self.check_usable(tenant, key_id)
        seed = self._mac(key_id, derivation_message(tenant, subject, key_version))
        if len(seed) != SEED_BYTES:
            raise KeyProviderUnavailable(f"{self.name} provider returned a MAC of the wrong length")
        return seed

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"

    def __reduce__(self) -> Any:
        raise TypeError(f"{type(self).__name__} holds key handles and must not be pickled")


# --- local keyring -------------------------------------------------------------------------------------------------
def _decode_material(entry: Any, key_id: str) -> bytes:
    if isinstance(entry, dict):
        if "b64" in entry:
            raw = base64.b64decode(entry["b64"], validate=True)
        elif "hex" in entry:
            raw = bytes.fromhex(entry["hex"])
        else:
            raise KeyProviderUnavailable(f"keyring entry {key_id} has neither b64 nor hex")
    else:
        raise KeyProviderUnavailable(f"keyring entry {key_id} is not an object")
    if len(raw) < MIN_KEY_BYTES:
        raise KeyProviderUnavailable(f"keyring entry {key_id} is shorter than {MIN_KEY_BYTES} bytes")
    return raw


def write_keyring(path: Path, key_ids: list[str]) -> list[str]:
    """Create ``path`` (mode 0600, exclusive) or add missing ``key_ids`` to it, with fresh random 32-byte keys.
    Returns the key IDs added. Existing keys are never changed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.with_name(f".{path.name}.lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two `cancelable keys add` at once: both keys kept
        return _add_keys(path, key_ids)
    finally:
        os.close(lock)


def _add_keys(path: Path, key_ids: list[str]) -> list[str]:
    data: dict[str, Any] = {"format": "cancelable-keyring/1", "keys": {}}
    if path.exists():
        data = json.loads(path.read_text())
    added = []
    for k in key_ids:
        check_key_id(k)
        if k not in data["keys"]:
            data["keys"][k] = {
                "b64": base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode(),
                "created_at": utcnow().isoformat(),
            }
            added.append(k)
    if added or not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    return added


def keyring_entries(path: Path) -> list[dict[str, str]]:
    """The keys of a keyring file without their material: ``[{"key_id", "created_at"}]`` sorted by key ID.
    ``KeyProviderUnavailable`` when the file is missing, readable by others or not a keyring."""
    ring = LocalKeyring(path)
    ring.key_ids()  # the mode and format checks
    data = json.loads(Path(path).read_text())
    return [{"key_id": k, "created_at": str(v.get("created_at", ""))} for k, v in sorted(data["keys"].items())]


def next_key_id(key_id: str) -> str:
    """The key ID a rotation of ``key_id`` moves to by default: its trailing number plus one (``dev-key-1`` ->
    ``dev-key-2``), or ``-2`` appended when it has none."""
    head = key_id.rstrip("0123456789")
    tail = key_id[len(head) :]
    return check_key_id(f"{head}{int(tail) + 1}" if tail else f"{key_id}-2")


class LocalKeyring(KeyProvider):
    """Keys from a JSON file ``{"format": "cancelable-keyring/1", "keys": {key_id: {"b64"|"hex": ...}}}``.

    The file must not be readable by group or others (``KeyProviderUnavailable`` otherwise). It is re-read when its
    modification time changes, so keys added by ``write_keyring`` are seen by running workers.
    """

    name = "local"

    def __init__(self, path: Path, registry: KeyRegistry | None = None) -> None:
        super().__init__(registry)
        self._path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self.__material: dict[str, bytes] = {}

    def _load(self) -> dict[str, bytes]:
        try:
            st = self._path.stat()
        except FileNotFoundError:
            raise KeyProviderUnavailable(f"keyring {self._path} does not exist") from None
        if st.st_mode & 0o077:
            raise KeyProviderUnavailable(f"keyring {self._path} is readable by others (chmod 600)")
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                try:
                    data = json.loads(self._path.read_text())
                    keys = data["keys"]
                except (ValueError, KeyError, TypeError):
                    raise KeyProviderUnavailable(f"keyring {self._path} is not a valid keyring file") from None
                self.__material = {k: _decode_material(v, k) for k, v in keys.items()}
                self._stamp = stamp
            return self.__material

    def key_ids(self) -> list[str]:
        return sorted(self._load())

    def _unknown_hint(self, key_id: str) -> str:
        return f" (keyring {self._path}; add it with `cancelable keys add {key_id}`)"

    def has_key(self, key_id: str) -> bool:
        return key_id in self._load()

    def _mac(self, key_id: str, message: bytes) -> bytes:
        material = self._load().get(key_id)
        if material is None:
            raise UnknownKeyError(f"key {key_id} is not in the keyring")
        return seed_from_mac(material, message)


# --- AWS KMS -------------------------------------------------------------------------------------------------------
def _install_redaction() -> None:
    """botocore logs response bodies at DEBUG, and a GenerateMac response body *is* the seed: put the project's one
    redaction filter on botocore's loggers, so such records are redacted before any handler sees them."""
    from worker.observability.redaction import RedactionFilter

    for name in ("botocore.parsers", "botocore.endpoint", "botocore.hooks", "botocore.retryhandler"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, RedactionFilter) for f in lg.filters):
            lg.addFilter(RedactionFilter())


class KmsHmacProvider(KeyProvider):
    """AWS KMS HMAC_256 keys; the seed is computed by KMS (``GenerateMac``), the key never leaves KMS."""

    name = "kms"
    MAC_ALGORITHM = "HMAC_SHA_256"
    DESCRIBE_TTL_S = 60.0
    """How long a DescribeKey answer is reused; a key disabled in KMS is refused by GenerateMac anyway."""

    def __init__(
        self,
        client: Any = None,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        registry: KeyRegistry | None = None,
        key_map: dict[str, str] | None = None,
    ) -> None:
        super().__init__(registry)
        _install_redaction()
        self.key_map = dict(key_map or {})
        if client is None:
            import boto3
            from botocore.config import Config

            kw: dict[str, Any] = {
                "region_name": region,
                # 32 connections: one per task thread of a threads-pool engine worker (botocore's default is 10)
                "config": Config(
                    retries={"mode": "standard", "max_attempts": 4},
                    connect_timeout=5,
                    read_timeout=10,
                    max_pool_connections=32,
                ),
            }
            if endpoint_url:
                kw["endpoint_url"] = endpoint_url
            if access_key_id and secret_access_key:
                kw["aws_access_key_id"], kw["aws_secret_access_key"] = access_key_id, secret_access_key
            client = boto3.session.Session().client("kms", **kw)
        self._client = client
        self._known: dict[str, tuple[bool, float]] = {}

    def _err(self, e: Exception, key_id: str) -> Exception:
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(e, ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NotFoundException",):
                return UnknownKeyError(f"KMS key {key_id} not found")
            if code in ("DisabledException", "KMSInvalidStateException"):
                return RevokedKeyError(f"KMS key {key_id} is disabled or pending deletion")
            if code in ("InvalidKeyUsageException", "InvalidArnException", "ValidationException"):
                return UnknownKeyError(f"KMS key {key_id} is not an HMAC_256 GENERATE_VERIFY_MAC key ({code})")
            return KeyProviderUnavailable(f"KMS {code or 'error'} for key {key_id}")
        if isinstance(e, BotoCoreError):
            return KeyProviderUnavailable(f"KMS unreachable ({type(e).__name__})")
        return e

    def kms_key(self, key_id: str) -> str | None:
        """The KMS key (UUID, alias or ARN) behind ``key_id``: its ``keys.kms_key_map`` entry, ``key_id`` itself when
        no map is set, None when a map is set and does not name it."""
        if not self.key_map:
            return key_id
        return self.key_map.get(key_id)

    def _unknown_hint(self, key_id: str) -> str:
        return " (not in keys.kms_key_map)" if self.key_map else ""

    def key_ids(self) -> list[str]:
        """The mapped key IDs (empty when no map is set: any KMS key may be named)."""
        return sorted(self.key_map)

    def check_key_map(self) -> None:
        """At worker start: every mapped KMS key exists, is enabled and is an HMAC_256 ``GENERATE_VERIFY_MAC`` key.
        Raises ``UnknownKeyError``, ``RevokedKeyError`` or ``KeyProviderUnavailable`` naming the first bad entry."""
        for key_id in sorted(self.key_map):
            try:
                ok = self.has_key(key_id)
            except (RevokedKeyError, KeyProviderUnavailable) as e:
                raise type(e)(f"keys.kms_key_map entry {key_id}: {e}") from None
            if not ok:
                raise UnknownKeyError(
                    f"keys.kms_key_map entry {key_id}: KMS key {self.key_map[key_id]} does not exist or is not an "
                    "HMAC_256 GENERATE_VERIFY_MAC key"
                )

    def has_key(self, key_id: str) -> bool:
        kms_key = self.kms_key(key_id)
        if kms_key is None:
            return False
        hit = self._known.get(key_id)
        if hit is not None and time.monotonic() - hit[1] < self.DESCRIBE_TTL_S:
            return hit[0]
        try:
            meta = self._client.describe_key(KeyId=kms_key)["KeyMetadata"]
        except Exception as e:
            err = self._err(e, key_id)
            if isinstance(err, UnknownKeyError):
                self._known[key_id] = (False, time.monotonic())
                return False
            raise err from None
        if meta.get("KeyState") not in (None, "Enabled"):
            raise RevokedKeyError(f"KMS key {key_id} is {meta.get('KeyState')}")
        ok = meta.get("KeySpec") == "HMAC_256" and meta.get("KeyUsage") == "GENERATE_VERIFY_MAC"
        self._known[key_id] = (ok, time.monotonic())
        return ok

    def _mac(self, key_id: str, message: bytes) -> bytes:
        kms_key = self.kms_key(key_id)
        if kms_key is None:
            raise UnknownKeyError(f"key {key_id} is not in keys.kms_key_map")
        try:
            r = self._client.generate_mac(KeyId=kms_key, Message=message, MacAlgorithm=self.MAC_ALGORITHM)
        except Exception as e:
            raise self._err(e, key_id) from None
        return bytes(r["Mac"])

    def create_key(self, description: str = "cancelable faces seed key", alias: str | None = None) -> str:
        """Create an HMAC_256 key (dev and tests; production keys are provisioned by the security team).
        Returns its KeyId (or the alias name ``alias/...`` if ``alias`` is given)."""
        r = self._client.create_key(Description=description, KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")
        key_id = r["KeyMetadata"]["KeyId"]
        if alias:
            name = alias if alias.startswith("alias/") else f"alias/{alias}"
            self._client.create_alias(AliasName=name, TargetKeyId=key_id)
            return name
        return str(key_id)


def make_key_provider(settings: Settings, store: ObjectStore | None = None) -> KeyProvider:
    """The provider ``settings.keys.provider`` names, with a ``KeyRegistry`` on ``store`` if given."""
    registry = KeyRegistry(store) if store is not None else None
    k = settings.keys
    if k.provider == "local":
        return LocalKeyring(k.keyring_path, registry)
    return KmsHmacProvider(
        endpoint_url=k.kms_endpoint_url,
        region=k.kms_region or settings.s3.region,
        access_key_id=k.kms_access_key_id.get_secret_value() if k.kms_access_key_id else None,
        secret_access_key=k.kms_secret_access_key.get_secret_value() if k.kms_secret_access_key else None,
        registry=registry,
        key_map=k.kms_key_map,
    )
