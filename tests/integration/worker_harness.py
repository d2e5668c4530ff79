"""Shared pieces of the worker integration tests: a real ``celery worker`` subprocess, a throwaway lite bundle, the
sample faces uploaded to S3, and a producer ``Client`` wired to the test session's Redis + SeaweedFS.

A test module declares its own fixture: ``dep = pytest.fixture(lambda service_env, seaweed, tmp_path: ...)``, see
``running``.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
LITE_MANIFEST = REPO / "tests" / "fixtures" / "bundles" / "lite" / "manifest.json"
CELERY = [sys.executable, "-m", "celery"]


def write_random_lite_bundle(directory: Path, seed: int = 0) -> Path:
    """A lite bundle of RANDOMLY initialised networks (tests of plumbing only: its faces are noise) + the dlib
    identity model from the installed package. Returns the directory."""
    import torch

    from worker.models.bundle import write_manifest
    from worker.models.lite import LiteEncoder, LiteGenerator

    torch.manual_seed(seed)
    cfg = {
        "resolution": 32,
        "w_dim": 64,
        "z_dim": 64,
        "g_channels": [64, 48, 32, 16, 8, 8],
        "e_channels": [16, 24, 32, 48, 64, 64],
        "e_hidden": 64,
    }
    directory.mkdir(parents=True, exist_ok=True)
    g, e = LiteGenerator(cfg), LiteEncoder(cfg)
    with torch.no_grad():  # untrained affines start at zero (style-independent output): give them random weights
        for m in g.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, 1.0 / cfg["w_dim"] ** 0.5)
    torch.save({"generator": g.state_dict(), "encoder": e.state_dict()}, directory / "lite_random.pt")
    dlib_dat = "pkg://face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat"
    write_manifest(
        directory,
        {
            "generator": {"format": "lite-generator", "path": "lite_random.pt", "config": cfg},
            "encoder": {"format": "lite-encoder", "path": "lite_random.pt", "config": cfg},
            "identity": {"format": "dlib-resnet", "path": dlib_dat, "config": {}},
        },
        bundle_id="lite-random-test",
    )
    return directory


@dataclass
class WorkerProc:
    """One ``celery -A worker.tasks.app worker`` subprocess (own process group), its log file and environment."""

    popen: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str]
    argv: list[str]
    pool: str = "prefork"
    concurrency: int = 1

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    def children(self) -> list[int]:
        """PIDs of the pool processes (direct children of the main worker process)."""
        try:
            out = subprocess.run(["pgrep", "-P", str(self.popen.pid)], capture_output=True, text=True, check=False)
        except FileNotFoundError:  # pragma: no cover
            return []
        return [int(x) for x in out.stdout.split()]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the whole worker (main process and pool children) with ``sig``, as a crash would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(15)

    def stop(self) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()


def start_worker(
    env: dict[str, str],
    log: Path,
    queues: str = "engine.interactive,engine,engine.bulk,control",
    concurrency: int = 1,
    name: str | None = None,
    pool: str = "prefork",
) -> WorkerProc:
    argv = [
        *CELERY,
        "-A",
        "worker.tasks.app",
        "worker",
        "-Q",
        queues,
        "-c",
        str(concurrency),
        "--pool",
        pool,
        "-n",
        f"{name or 'w' + uuid.uuid4().hex[:6]}@%h",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-l",
        "INFO",
    ]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
    return WorkerProc(p, log, env, argv, pool, concurrency)


def wait_ready(client: Any, worker: WorkerProc, timeout: float = 90.0, engine: bool = True) -> None:
    """Until the worker answers a ping on the control queue and (``engine``) an engine ping with models loaded."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not worker.alive():
            raise RuntimeError(f"worker exited with {worker.popen.returncode}:\n{worker.tail()}")
        try:
            client.ping(timeout=5)
            if not engine:
                return
            r = client.ping(timeout=5, engine=True)
            if r.get("engine_loaded"):
                return
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.5)
    raise RuntimeError(f"worker not ready after {timeout:.0f}s ({last!r}):\n{worker.tail()}")


def worker_env(service_env: Callable[..., dict[str, str]], bucket: str, bundle: Path, **extra: str) -> dict[str, str]:
    env = service_env(bucket)
    env.update(
        {
            "CANCELABLE_ENGINE__BUNDLE": str(bundle),
            "CANCELABLE_ENGINE__STEPS": "5",
            "CANCELABLE_ENGINE__DEVICE": "cpu",
            "CANCELABLE_ENGINE__MIXED_PRECISION": "false",
            "CANCELABLE_METRICS__ENABLED": "false",
            "CANCELABLE_WORKER__TASK_TIME_LIMIT": "120",
            "CANCELABLE_WORKER__VISIBILITY_TIMEOUT": "150",
            "CANCELABLE_TORCH_THREADS": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    env.update(extra)
    return env


def settings_from_env(env: dict[str, str]) -> Any:
    """``Settings`` built from a worker environment (what a producer on the same deployment uses)."""
    from worker.settings import load_settings

    saved = {k: v for k, v in os.environ.items() if k.upper().startswith("CANCELABLE_")}
    try:
        for k in saved:
            del os.environ[k]
        os.environ.update({k: v for k, v in env.items() if k.upper().startswith("CANCELABLE_")})
        return load_settings()
    finally:
        for k in [k for k in os.environ if k.upper().startswith("CANCELABLE_")]:
            del os.environ[k]
        os.environ.update(saved)


# --- images -----------------------------------------------------------------------------------------------------
def jpeg_bytes(path: Path, max_side: int = 400) -> bytes:
    """A face photo downscaled (keeps the tests fast on 2 cores), re-encoded as JPEG."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def upload(s3: Any, bucket: str, key: str, body: bytes) -> str:
    s3.put_object(Bucket=bucket, Key=key, Body=body)
    return f"s3://{bucket}/{key}"


@dataclass
class Deployment:
    """A running worker plus everything a test needs to talk to it."""

    worker: WorkerProc
    client: Any
    s3: Any
    bucket: str
    env: dict[str, str]
    settings: Any
    faces: dict[str, str]  # name -> s3:// ref of the sample photo
    keyring: Path
    tmp: Path

    @property
    def input_bucket(self) -> str:
        """The default input bucket (``<bucket>-inputs``); tenant ``t`` may read ``tenants/t/`` in it."""
        return input_bucket_of(self.bucket)

    def upload_input(self, tenant: str, name: str, body: bytes) -> str:
        """Put ``body`` where ``tenant``'s jobs may read it; returns the s3:// ref."""
        return upload(self.s3, self.input_bucket, f"tenants/{tenant}/{name}", body)

    def restart(self, timeout: float = 120.0, **extra_env: str) -> None:
        self.worker.stop()
        env = {**self.env, **extra_env}
        w = self.worker
        self.worker = start_worker(env, w.log, name="r" + uuid.uuid4().hex[:6], pool=w.pool, concurrency=w.concurrency)
        wait_ready(self.client, self.worker, timeout)


def input_bucket_of(bucket: str) -> str:
    return f"{bucket}-inputs"


def create_input_bucket(s3: Any, bucket: str) -> str:
    """The default input bucket of a deployment whose output bucket is ``bucket``."""
    s3.create_bucket(Bucket=input_bucket_of(bucket))
    return input_bucket_of(bucket)


def upload_faces(s3: Any, bucket: str, faces_dir: Path, tenant: str = "acme", max_side: int | None = None) -> dict:
    """The sample faces as JPEGs in ``tenant``'s input prefix of ``bucket``'s input bucket: name -> s3:// ref."""
    inb = input_bucket_of(bucket)
    out = {}
    for p in sorted(faces_dir.glob("*.jpg")):
        body = jpeg_bytes(p) if max_side is None else jpeg_bytes(p, max_side)
        out[p.stem] = upload(s3, inb, f"tenants/{tenant}/{p.name}", body)
    return out


def _faces_dir() -> Path | None:
    shared = Path(os.environ.get("CANCELABLE_SHARED_DIR", REPO.parent / "shared"))
    d = shared / "data" / "faces-smoke" / "obama-biden"
    return d if d.is_dir() else None


def deploy(
    service_env: Callable[..., dict[str, str]],
    seaweed: Any,
    tmp: Path,
    *,
    bundle: Path | None = None,
    queues: str = "engine.interactive,engine,engine.bulk,control",
    pool: str = "prefork",
    concurrency: int = 1,
    **extra_env: str,
) -> Deployment:
    """Upload the sample faces to a fresh bucket, create key ``k1`` (and ``k2``), start a worker (``pool``,
    ``concurrency``), wait until ready."""
    from producers.client import Client
    from worker.keys.providers import write_keyring

    faces_dir = _faces_dir()
    if faces_dir is None:
        pytest.skip("sample faces (../shared/data/faces-smoke/obama-biden) not found; set CANCELABLE_SHARED_DIR")
    if bundle is None:
        bundle = write_random_lite_bundle(tmp / "bundle")
    bucket = seaweed.new_bucket("w")
    s3 = seaweed.client()
    create_input_bucket(s3, bucket)
    faces = upload_faces(s3, bucket, faces_dir)
    env = worker_env(service_env, bucket, bundle, **extra_env)
    keyring = Path(env["CANCELABLE_KEYS__KEYRING_PATH"])
    write_keyring(keyring, ["k1", "k2"])
    settings = settings_from_env(env)
    client = Client(settings)
    worker = start_worker(env, tmp / "worker.log", queues=queues, pool=pool, concurrency=concurrency)
    try:
        wait_ready(client, worker, engine="engine" in queues)
    except Exception:
        worker.stop()
        raise
    return Deployment(worker, client, s3, bucket, env, settings, faces, keyring, tmp)


def running(
    service_env: Callable[..., dict[str, str]], seaweed: Any, tmp_path: Path, **kw: Any
) -> Iterator[Deployment]:
    """Body of a test module's ``dep`` fixture: a worker on both queues (default: random lite bundle, steps=5),
    stopped afterwards. ``kw`` goes to ``deploy``."""
    dep = deploy(service_env, seaweed, tmp_path, **kw)
    try:
        yield dep
    finally:
        dep.worker.stop()
        dep.client.close()


def job_id(tag: str = "t") -> str:
    return f"{tag}-{uuid.uuid4().hex}"
