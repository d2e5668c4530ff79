"""Per-process state of a worker: settings, Redis, S3, key provider and (engine workers only) the loaded models.

Nothing is created at import. ``get_runtime()`` builds the state on first use in the CURRENT process and rebuilds it
if it finds itself in a forked child (different pid), so sockets, boto3 clients and CUDA contexts are never shared
across ``fork``. The Celery app calls ``load_engine()`` from ``worker_process_init`` in each pool child of an engine
worker; a worker that only consumes the control queue never loads models.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.errors import BundleError
from worker.tasks.config import connect_redis, connect_store

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
LITE_BUNDLE_DIR = REPO / "worker" / "bundles" / "lite"
EMBEDDED_BUNDLES = {"lite": LITE_BUNDLE_DIR, "keymap": REPO / "worker" / "bundles" / "keymap"}


@dataclass
class LoadedEngine:
    """The engine and what the template records need to say about it."""

    engine: Any  # worker.algorithm.pipeline.Engine
    bundle_id: str
    bundle_hashes: dict[str, str]
    algorithm: dict[str, Any]
    device: str
    load_seconds: float
    fingerprint: str = ""
    verify_threshold: float = 0.5


def resolve_bundle_dir(spec: str, cache_dir: Path | None = None, store: Any = None) -> Path:
    """``engine.bundle`` setting -> local bundle directory (``lite`` / ``keymap`` = the embedded bundles; ``s3://``
    synced into ``cache_dir`` through ``store``)."""
    if spec in EMBEDDED_BUNDLES:
        return EMBEDDED_BUNDLES[spec]
    if spec.startswith("s3://"):
        from worker.storage.bundles import sync_bundle

        if store is None or cache_dir is None:
            raise BundleError("an s3:// bundle needs an S3 store and a cache directory")
        return Path(sync_bundle(spec, cache_dir, store))
    return Path(spec).expanduser()


def check_bundle_present(spec: str, cache_dir: Path | None = None, store: Any = None) -> Path:
    """Fail fast (in the worker's main process, before forking) when the bundle has no manifest."""
    if spec.startswith("s3://") and store is None:
        return Path(spec)
    d = resolve_bundle_dir(spec, cache_dir, store)
    if not (d / "manifest.json").is_file():
        hint = (
            " (the embedded lite bundle is not in this checkout; train it with scripts/train_lite.py or set "
            "CANCELABLE_ENGINE__BUNDLE to a bundle directory)"
            if spec == "lite"
            else ""
        )
        raise BundleError(f"model bundle manifest not found: {d / 'manifest.json'}{hint}")
    return d


def pick_device(spec: str) -> Any:
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def engine_config_from(settings: Any, manifest: dict[str, Any]) -> Any:
    """EngineConfig = the bundle's recommended engine section (if any) + the deployment's settings on top."""
    import dataclasses

    from worker.algorithm.config import EngineConfig

    known = {f.name for f in dataclasses.fields(EngineConfig)}
    recommended = manifest.get("engine", {}) if isinstance(manifest.get("engine"), dict) else {}
    kw: dict[str, Any] = {k: v for k, v in recommended.items() if k in known}
    for k in ("lr_milestones",):
        if k in kw and isinstance(kw[k], list):
            kw[k] = tuple(kw[k])
    explicit = settings.engine.model_fields_set
    for ours, theirs in (
        ("steps", "steps"),
        ("mixed_precision", "mixed_precision"),
        ("batch_size", "max_batch_images"),
    ):
        if ours in explicit or theirs not in kw:  # a deployment's explicit setting wins over the bundle's advice
            kw[theirs] = getattr(settings.engine, ours)
    return EngineConfig(**kw)


def load_engine_from_settings(settings: Any, store: Any = None) -> LoadedEngine:
    """Load the bundle and build the engine (minutes for the production bundle, about a second for lite)."""
    import json

    import torch

    from worker import metrics
    from worker.algorithm.keymap_engine import build_engine
    from worker.models.bundle import load_bundle

    torch.set_num_threads(max(1, int(os.environ.get("CANCELABLE_TORCH_THREADS", "1"))))
    directory = check_bundle_present(settings.engine.bundle, settings.engine.bundle_cache_dir, store)
    manifest = json.loads((directory / "manifest.json").read_text())
    device = pick_device(settings.engine.device)
    start = time.perf_counter()
    with metrics.model_load_timer(device.type if device.type in metrics.DEVICE_TYPES else "cpu"):
        bundle = load_bundle(directory, device)
        config = engine_config_from(settings, manifest)
        engine = build_engine(bundle, config, device)  # the bundle's generator family picks the engine class
    seconds = time.perf_counter() - start
    # what a template records about how it was made; ``fingerprint`` must match at verify time
    algorithm = dict(config.result_fields())
    algorithm["fingerprint"] = engine.fingerprint
    log.info("engine loaded: %s on %s in %.1f s", engine.fingerprint, device, seconds)
    return LoadedEngine(
        engine,
        bundle.bundle_id,
        dict(bundle.hashes),
        algorithm,
        str(device),
        seconds,
        engine.fingerprint,
        verify_threshold_from(settings, manifest),
    )


def verify_threshold_from(settings: Any, manifest: dict[str, Any]) -> float:
    """The deployment's ``engine.verify_threshold`` when set explicitly, else the bundle's recommended
    ``engine.verify_threshold`` (manifest), else the settings default."""
    explicit = "verify_threshold" in settings.engine.model_fields_set
    recommended = (
        manifest.get("engine", {}).get("verify_threshold") if isinstance(manifest.get("engine"), dict) else None
    )
    if not explicit and isinstance(recommended, int | float) and -1.0 <= float(recommended) <= 1.0:
        return float(recommended)
    return float(settings.engine.verify_threshold)


class Runtime:
    """Lazily created per-process resources, shared by the task threads of a ``threads`` pool: each is created
    once under a lock (redis-py and boto3 clients are thread-safe once built; building them is not)."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.pid = os.getpid()
        self._lock = threading.Lock()  # the engine (a load can take minutes; other threads wait for it)
        self._init_lock = threading.RLock()  # the clients (the engine load itself uses ``store``)
        self._redis: Any = None
        self._store: Any = None
        self._keys: Any = None
        self._engine: LoadedEngine | None = None

    @property
    def redis(self) -> Any:
        if self._redis is None:
            with self._init_lock:
                if self._redis is None:
                    self._redis = connect_redis(self.settings)
        return self._redis

    @property
    def book(self) -> Any:
        from worker.tasks.progress import JobBook

        return JobBook(self.redis)

    @property
    def store(self) -> Any:
        if self._store is None:
            with self._init_lock:
                if self._store is None:
                    self._store = connect_store(self.settings)
        return self._store

    @property
    def keys(self) -> Any:
        if self._keys is None:
            from worker.keys.providers import make_key_provider

            with self._init_lock:
                if self._keys is None:
                    self._keys = make_key_provider(self.settings, self.store)
        return self._keys

    def engine(self) -> LoadedEngine:
        with self._lock:
            if self._engine is None:
                self._engine = load_engine_from_settings(self.settings, self.store)
            return self._engine

    @property
    def engine_loaded(self) -> bool:
        return self._engine is not None


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def _new_lock_after_fork() -> None:
    # the prefork parent's metrics thread may hold the lock at the moment of a fork (progress collector)
    global _runtime_lock
    _runtime_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)


def get_runtime() -> Runtime:
    """This process's runtime (created on first use, once even when task threads race; a forked child gets a
    fresh one)."""
    global _runtime
    rt = _runtime
    if rt is not None and rt.pid == os.getpid():
        return rt
    with _runtime_lock:
        if _runtime is None or _runtime.pid != os.getpid():
            from worker.settings import get_settings

            _runtime = Runtime(get_settings())
        return _runtime


def reset_runtime() -> None:
    """Forget the runtime (tests, and a child right after fork)."""
    global _runtime
    _runtime = None
