"""Which model bundle a worker runs and how its engine is built: the embedded bundles, ``s3://`` bundles synced to a
cache, the engine settings and verify policy (``worker.bundle_config``: bundle advice + the deployment's explicit
settings), the engine (``worker.algorithm.factory``), the ``LoadedEngine`` the service functions use, and
``EngineCall``: the one engine call. torch is imported only when an engine is loaded."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.errors import BundleError

if TYPE_CHECKING:
    import torch

    from worker.algorithm.engine_base import EngineBase, EngineEnrollment, Subject
    from worker.bundle_config import VerifyPolicy
    from worker.settings import Settings
    from worker.storage.client import ObjectStore

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
LITE_BUNDLE_DIR = REPO / "tests" / "fixtures" / "bundles" / "lite"  # a source checkout's test fixture, not in the wheel
EMBEDDED_BUNDLES = {"lite": LITE_BUNDLE_DIR, "keymap": REPO / "worker" / "bundles" / "keymap"}


@dataclass
class LoadedEngine:
    """The engine and what the template records need to say about it."""

    engine: EngineBase  # Engine or KeymapEngine (``worker.algorithm.factory.build_engine`` picks by bundle)
    bundle_id: str
    bundle_hashes: dict[str, str]
    algorithm: dict[str, Any]
    device: str
    load_seconds: float
    fingerprint: str = ""
    verify_threshold: float = 0.5
    policy: VerifyPolicy | None = None  # per-enrolment-size thresholds and their FARs (``bundle_config``)
    matcher: str = ""  # recorded in templates; verify refuses a template of another matcher

    def verify_policy(self) -> VerifyPolicy:
        """The decision rule; without a calibrated manifest, ``verify_threshold`` for every template."""
        from worker.bundle_config import VerifyPolicy

        if self.policy is not None:
            return self.policy
        return VerifyPolicy(self.matcher, self.verify_threshold, True, {}, {})


class EngineCall:
    """The one engine call of the service: ``call(job_type, subjects)`` with ``subjects`` =
    ``[(faces (N, 3, R, R) float in [-1, 1], seed 32 B), ...]`` -> one ``EngineEnrollment`` per subject, in order.

    Packs the subjects (whole, in order) into batches of at most ``max_images`` images, runs each batch as ONE engine
    batch and meters it (batch size, optimisation time and steps, images processed, labelled by ``job_type``).
    A worker's ``Runtime.engine_call`` runs it through the micro-batcher (``worker.tasks.batcher``), which hands it
    the subjects of several jobs at once; results do not depend on batch mates. Seeds are never logged."""

    def __init__(self, loaded: LoadedEngine) -> None:
        self.loaded = loaded

    @property
    def max_images(self) -> int:
        """The most images one engine batch takes (``EngineConfig.max_batch_images``)."""
        return int(self.loaded.engine.config.max_batch_images)

    def __call__(self, job_type: str, subjects: list[Subject]) -> list[EngineEnrollment]:
        from worker import metrics
        from worker.algorithm.engine_base import pack_subjects

        engine = self.loaded.engine
        results: list[EngineEnrollment] = []
        for batch in pack_subjects(list(subjects), self.max_images):
            n = sum(len(faces) for faces, _ in batch)
            metrics.batch_size(job_type, n)
            with metrics.stage_timer("optimise", job_type):
                results.extend(engine(batch))
            metrics.optimisation_steps(job_type, int(engine.config.steps))
            metrics.images_processed(n, "succeeded", job_type)
        return results


def resolve_bundle_dir(spec: str, cache_dir: Path | None = None, store: ObjectStore | None = None) -> Path:
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


def check_bundle_present(spec: str, cache_dir: Path | None = None, store: ObjectStore | None = None) -> Path:
    """Fail fast (in the worker's main process, before forking) when the bundle has no manifest."""
    if spec.startswith("s3://") and store is None:
        return Path(spec)
    d = resolve_bundle_dir(spec, cache_dir, store)
    if not (d / "manifest.json").is_file():
        hint = (
            " (the lite bundle is a test fixture of a source checkout, not part of an installed package; use "
            "CANCELABLE_ENGINE__BUNDLE=keymap or a bundle directory)"
            if spec == "lite"
            else ""
        )
        raise BundleError(f"model bundle manifest not found: {d / 'manifest.json'}{hint}")
    return d


def pick_device(spec: str) -> torch.device:
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def load_engine_from_settings(settings: Settings, store: ObjectStore | None = None) -> LoadedEngine:
    """Load the bundle and build the engine (minutes for the production bundle, about a second for lite)."""
    import torch

    from worker import metrics
    from worker.algorithm.factory import build_engine
    from worker.bundle_config import calibration_mismatch, check_matcher, engine_config, verify_policy
    from worker.models.bundle import load_bundle, read_manifest
    from worker.models.dlib_face import warm_detection

    torch.set_num_threads(max(1, int(os.environ.get("CANCELABLE_TORCH_THREADS", "1"))))
    directory = check_bundle_present(settings.engine.bundle, settings.engine.bundle_cache_dir, store)
    manifest = read_manifest(directory)
    device = pick_device(settings.engine.device)
    start = time.perf_counter()
    with metrics.model_load_timer(device.type if device.type in metrics.DEVICE_TYPES else "cpu"):
        bundle = load_bundle(directory, device)
        config = engine_config(manifest, settings.engine)
        engine = build_engine(bundle, config, device)  # the bundle's encoder picks the engine class
        check_matcher(verify_policy(manifest, settings.engine).matcher, engine.matcher_kind)
        warm_detection()  # the face detectors too: the first jobs would otherwise pay for them
    seconds = time.perf_counter() - start
    # what a template records about how it was made; ``fingerprint`` must match at verify time
    algorithm = dict(config.result_fields())
    algorithm["fingerprint"] = engine.fingerprint
    log.info("engine loaded: %s on %s in %.1f s", engine.fingerprint, device, seconds)
    mismatch = calibration_mismatch(manifest, engine.fingerprint)
    if mismatch:
        log.warning("%s", mismatch)
    policy = verify_policy(manifest, settings.engine)
    return LoadedEngine(
        engine,
        bundle.bundle_id,
        dict(bundle.hashes),
        algorithm,
        str(device),
        seconds,
        engine.fingerprint,
        policy.default_threshold,
        policy,
        policy.matcher,
    )
