"""Key material -> 32-byte seed that selects a subject's synthetic latent (pure: hashlib/hmac only).

The seed is ``HMAC-SHA256(key_material, derivation_message(tenant, subject, key_version))``. The message is built
separately so that a KMS provider can compute the same MAC remotely (AWS KMS ``GenerateMac`` with
``HMAC_SHA_256`` over ``derivation_message(...)``) and obtain the same kind of 32-byte seed without the key ever
leaving the KMS.

Message layout (unambiguous: every field is length-prefixed, so no two distinct inputs share a message)::

    b"CFDRV1" || lp(purpose) || lp(tenant) || lp(subject) || lp(str(key_version))

where ``lp(x) = len(utf8(x)).to_bytes(4, "big") || utf8(x)``. The purpose string separates uses of one key
(the latent today; other purposes later get unrelated seeds). ``key_version`` is written in decimal, so the
int 3 and the string "3" name the same version.

Seeds are secrets: never log them, never put them in exception messages.
"""

from __future__ import annotations

import hashlib
import hmac

DEFAULT_PURPOSE = "faceanonymixer/v1/latent"
SEED_BYTES = 32
MIN_KEY_BYTES = 16
_MAGIC = b"CFDRV1"


def _field(value: str, name: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str")
    if not value:
        raise ValueError(f"{name} must not be empty")
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates
        raise ValueError(f"{name} is not valid UTF-8 text") from exc
    return len(data).to_bytes(4, "big") + data


def _version_text(key_version: int | str) -> str:
    if isinstance(key_version, bool):
        raise TypeError("key_version must be an int or a decimal str")
    if isinstance(key_version, int):
        if key_version < 0:
            raise ValueError("key_version must be >= 0")
        return str(key_version)
    if isinstance(key_version, str) and key_version.isascii() and key_version.isdigit():
        return str(int(key_version))  # "03" and "3" are the same version
    raise TypeError("key_version must be an int or a decimal str")


def derivation_message(tenant: str, subject: str, key_version: int | str, purpose: str = DEFAULT_PURPOSE) -> bytes:
    """The exact bytes that are MACed to derive a seed (see the module docstring for the layout)."""
    return (
        _MAGIC
        + _field(purpose, "purpose")
        + _field(tenant, "tenant")
        + _field(subject, "subject")
        + _field(_version_text(key_version), "key_version")
    )


def seed_from_mac(key_material: bytes, message: bytes) -> bytes:
    """HMAC-SHA256 of ``message`` under ``key_material`` -> 32 bytes (what a local keyring computes)."""
    if not isinstance(key_material, bytes | bytearray):
        raise TypeError("key material must be bytes")
    if len(key_material) < MIN_KEY_BYTES:
        raise ValueError(f"key material must be at least {MIN_KEY_BYTES} bytes")
    return hmac.new(bytes(key_material), message, hashlib.sha256).digest()


def derive_seed(
    key_material: bytes, tenant: str, subject: str, key_version: int | str, purpose: str = DEFAULT_PURPOSE
) -> bytes:
    """32-byte seed for (tenant, subject, key_version): HMAC-SHA256(key_material, derivation_message(...))."""
    return seed_from_mac(key_material, derivation_message(tenant, subject, key_version, purpose))
