"""Calibrate a bundle's ``verify_threshold`` at a target FAR, running the engine the way the worker does.

Protocol (per sampled LFW identity, all in-process, CPU):

* enrol   : ``engine.enroll`` of its first ``--enrol-photos`` usable photos in ONE call under its seed
            (seed = derive_seed(calibration key, tenant, subject, key version 1), as the key provider derives it);
* genuine : a DIFFERENT photo of the same identity, ``engine.probe`` ALONE in a later call under the same seed;
* impostor: a photo of another identity, ``engine.probe`` alone under the VICTIM's seed (the attacker presents
            their own face for the victim's (tenant, subject, key version); the worker derives the victim's seed).

Scores are ``engine.score(probe.embedding, template)`` (cosine in the in-loss recognizer), as ``cancelable.verify``
computes them. The worker accepts iff score >= threshold. The threshold is the lowest 4-decimal value whose
empirical FAR on the impostor sample is <= ``--far``; with n impostors the empirical FAR can not resolve rates below
1/n, which the report states. Faces are prepared with ``Engine.prepare`` on decoded RGB uint8 images (the worker's
``decode_image``); photos where it finds no face or several are skipped, as the worker would reject them.

Identities: LFW TRAIN only (never a VALIDATION identity: sha256(name) % 10 == 0, kept for the independent
evaluation). ``--pool holdout`` (default) samples the TRAIN identities the lite model never trained on
(sha256(name) % 10 == 3); ``--pool train`` samples all TRAIN identities.

The engine configuration is the one a default deployment gets: the bundle manifest's ``engine`` section with the
worker's default settings on top (``worker.bundle_config.deployed_config``); ``--steps`` overrides it like an
explicit ``CANCELABLE_ENGINE__STEPS`` would (the threshold then belongs to that engine fingerprint only).

``--write`` sets ``manifest["engine"]["verify_threshold"]`` and records how it was obtained in
``manifest["calibration"]["verify_threshold"]`` (the manifest itself is not hashed; component files are).

Run: ``nice -n 19 cancelable-bundle calibrate-threshold worker/bundles/keymap [--ids 20] [--write]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from worker.errors import CancelableError

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "lfw-dev"
TENANT = "calibration"
KEY_VERSION = 1


def is_validation(name: str) -> bool:
    """The project's split: VALIDATION iff sha256(name) % 10 == 0 (never used here)."""
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10 == 0


def in_pool(name: str, pool: str) -> bool:
    if is_validation(name):
        return False
    return pool == "train" or int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10 == 3


@dataclass
class Identity:
    """One sampled person: prepared faces (each (3, R, R) in [-1, 1]) and its seed under the calibration key."""

    name: str
    enrol: torch.Tensor  # (E, 3, R, R)
    probe: torch.Tensor  # (3, R, R), a photo not in ``enrol``
    seed: bytes
    template: torch.Tensor | None = None  # (D,)
    skipped_photos: int = 0


@dataclass
class Scores:
    genuine: list[float] = field(default_factory=list)
    impostor: list[float] = field(default_factory=list)


# --- sampling and preparation ---------------------------------------------------------------------------------------
def candidate_identities(data: Path, pool: str, min_photos: int) -> list[tuple[str, list[Path]]]:
    out = []
    for d in sorted(p for p in data.iterdir() if p.is_dir()):
        if not in_pool(d.name, pool):
            continue
        photos = sorted(d.glob("*.jpg"))
        if len(photos) >= min_photos:
            out.append((d.name, photos))
    return out


def prepare_photo(engine: Any, path: Path) -> torch.Tensor | None:
    """Decode like the worker and align with the engine; None where the worker would reject the photo."""
    from worker.service.images import decode_image

    try:
        rgb = decode_image(path.read_bytes(), max_bytes=20_000_000, max_pixels=40_000_000, name=path.name)
        return engine.prepare(rgb)
    except CancelableError:  # NoFaceError, MultipleFacesError, InvalidImageError, ...
        return None


def sample_identities(engine: Any, args: argparse.Namespace, key_material: bytes, log: Any) -> list[Identity]:
    from worker.keys.derive import derive_seed

    need = args.enrol_photos + 1
    candidates = candidate_identities(args.data, args.pool, need)
    if len(candidates) < 2:
        raise SystemExit(f"only {len(candidates)} identities with {need}+ photos in pool {args.pool!r} at {args.data}")
    random.Random(args.seed).shuffle(candidates)
    chosen: list[Identity] = []
    skipped_ids = 0
    for name, photos in candidates:
        if len(chosen) == args.ids:
            break
        order = list(photos)
        random.Random(f"{args.seed}/{name}").shuffle(order)
        faces, bad = [], 0
        for p in order:
            face = prepare_photo(engine, p)
            if face is None:
                bad += 1
            else:
                faces.append(face)
            if len(faces) == need:
                break
        if len(faces) < need:
            skipped_ids += 1
            continue
        seed = derive_seed(key_material, TENANT, f"subject-{len(chosen):04d}", KEY_VERSION)
        chosen.append(Identity(name, torch.stack(faces[:-1]), faces[-1], seed, skipped_photos=bad))
    log(
        f"sampled {len(chosen)} identities from {len(candidates)} candidates in pool {args.pool!r} "
        f"({skipped_ids} skipped for lack of {need} usable photos, "
        f"{sum(i.skipped_photos for i in chosen)} photos rejected by face preparation)"
    )
    if len(chosen) < 2:
        raise SystemExit("need at least 2 identities")
    return chosen


def impostor_pairs(ids: list[Identity], per_victim: int, seed: int) -> list[tuple[int, int]]:
    """(victim, attacker) pairs: each victim gets ``per_victim`` distinct other identities as attackers."""
    rng = random.Random(f"{seed}/impostors")
    pairs: list[tuple[int, int]] = []
    for v in range(len(ids)):
        others = [a for a in range(len(ids)) if a != v]
        pairs.extend((v, a) for a in rng.sample(others, min(per_victim, len(others))))
    return pairs


# --- metrics --------------------------------------------------------------------------------------------------------
def threshold_at_far(impostor: list[float], far: float) -> float:
    """Lowest 4-decimal threshold t with #(impostor >= t) <= floor(far * n)."""
    imp = sorted(impostor, reverse=True)
    allowed = math.floor(far * len(imp) + 1e-9)
    if allowed >= len(imp):
        return -1.0
    bound = imp[allowed]  # t must be strictly above this score
    t = math.floor(bound * 1e4) / 1e4 + 1e-4
    return round(min(t, 1.0), 4)


def rate_at(scores: list[float], t: float) -> float:
    return sum(s >= t for s in scores) / len(scores) if scores else float("nan")


def eer(genuine: list[float], impostor: list[float]) -> tuple[float, float]:
    """(EER, threshold): the accept threshold among the observed scores where FAR and FRR are closest."""
    best = (2.0, 0.0, 0.0)
    for t in sorted(set(genuine) | set(impostor)) + [1.01]:
        far, frr = rate_at(impostor, t), 1.0 - rate_at(genuine, t)
        if abs(far - frr) < best[0]:
            best = (abs(far - frr), (far + frr) / 2, t)
    return best[1], best[2]


def summary(scores: Scores, far: float) -> dict[str, Any]:
    gen, imp = scores.genuine, scores.impostor
    t = threshold_at_far(imp, far)
    e, e_t = eer(gen, imp)
    z = statistics.NormalDist().inv_cdf(1.0 - far)
    gauss = statistics.fmean(imp) + z * statistics.stdev(imp) if len(imp) > 1 else float("nan")
    return {
        "threshold": t,
        "target_far": far,
        "far": rate_at(imp, t),
        "impostors_accepted": sum(s >= t for s in imp),
        "tar": rate_at(gen, t),
        "genuine_accepted": sum(s >= t for s in gen),
        "n_genuine": len(gen),
        "n_impostor": len(imp),
        "far_resolution": 1.0 / len(imp) if imp else float("nan"),
        "far_upper_95": 1.0 - 0.05 ** (1.0 / len(imp)) if imp and rate_at(imp, t) == 0 else None,
        "eer": e,
        "eer_threshold": e_t,
        "gaussian_threshold": gauss,
        "tar_at_gaussian_threshold": rate_at(gen, gauss),
        "genuine_mean": statistics.fmean(gen) if gen else float("nan"),
        "genuine_min": min(gen) if gen else float("nan"),
        "impostor_mean": statistics.fmean(imp) if imp else float("nan"),
        "impostor_max": max(imp) if imp else float("nan"),
    }


# --- run ------------------------------------------------------------------------------------------------------------
class Progress:
    """Image-weighted progress with an ETA (an enrolment of 2 photos costs about 2 probes)."""

    def __init__(self, total: int, log: Any) -> None:
        self.total, self.done, self.start, self.log = total, 0, time.perf_counter(), log

    def step(self, n: int, what: str) -> None:
        self.done += n
        el = time.perf_counter() - self.start
        eta = el / self.done * (self.total - self.done)
        self.log(f"  {what:<28} {self.done:>4}/{self.total} images  {el:6.0f} s elapsed  ETA {eta:5.0f} s")


def run(engine: Any, ids: list[Identity], pairs: list[tuple[int, int]], args: argparse.Namespace, log: Any) -> Scores:
    total = sum(len(i.enrol) for i in ids) + len(ids) + len(pairs)
    prog = Progress(total, log)
    deadline = prog.start + args.max_minutes * 60 if args.max_minutes else math.inf
    for n, ident in enumerate(ids):
        ident.template = engine.enroll(ident.enrol, ident.seed).template
        prog.step(len(ident.enrol), f"enrol {n + 1}/{len(ids)}")
    # genuine and impostor probes interleaved, so a run stopped by --max-minutes keeps both kinds
    jobs: list[tuple[str, int, int]] = [("genuine", v, v) for v in range(len(ids))]
    jobs += [("impostor", v, a) for v, a in pairs]
    random.Random(f"{args.seed}/order").shuffle(jobs)
    scores = Scores()
    for kind, v, a in jobs:
        if time.perf_counter() > deadline:
            log(f"--max-minutes {args.max_minutes} reached: stopping with the trials done so far")
            break
        victim = ids[v]
        assert victim.template is not None
        res = engine.probe(ids[a].probe, victim.seed)  # alone, under the VICTIM's seed
        (scores.genuine if kind == "genuine" else scores.impostor).append(engine.score(res.embedding, victim.template))
        prog.step(1, f"{kind} probe")
    return scores


def build_engine(bundle_dir: Path, steps: int | None, log: Any) -> tuple[Any, dict[str, Any]]:
    from worker.algorithm.keymap_engine import build_engine as make_engine
    from worker.bundle_config import deployed_config
    from worker.models.bundle import load_bundle

    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    config = deployed_config(bundle_dir, steps or None, None)
    engine = make_engine(load_bundle(bundle_dir, "cpu"), config, "cpu", bundle_dir)
    log(f"bundle {manifest['bundle_id']} at {bundle_dir}; engine {engine.fingerprint}, {config.steps} steps")
    return engine, manifest


def write_threshold(
    bundle_dir: Path, loaded_manifest: dict[str, Any], engine: Any, res: dict[str, Any], args: argparse.Namespace
) -> None:
    path = bundle_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    if manifest.get("bundle_id") != loaded_manifest.get("bundle_id"):
        raise SystemExit(
            f"refusing to write: the manifest now names bundle {manifest.get('bundle_id')!r}, "
            f"the calibration ran on {loaded_manifest.get('bundle_id')!r} (re-run the calibration)"
        )
    engine_section = manifest.get("engine") if isinstance(manifest.get("engine"), dict) else {}
    engine_section["verify_threshold"] = res["threshold"]
    manifest["engine"] = engine_section
    calibration = manifest.get("calibration") if isinstance(manifest.get("calibration"), dict) else {}
    calibration["verify_threshold"] = {
        "tool": "cancelable-bundle calibrate-threshold",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "engine_fingerprint": engine.fingerprint,
        "steps": engine.config.steps,
        "protocol": f"enrol {args.enrol_photos} photo(s) in one call, probe another photo alone; impostor = "
        "another identity's photo probed under the victim's seed",
        "data": f"LFW lfw-dev, {args.pool} pool (TRAIN identities only), sample seed {args.seed}",
        **{
            k: round(res[k], 4) if isinstance(res[k], float) else res[k]
            for k in ("target_far", "far", "tar", "n_genuine", "n_impostor", "eer", "impostors_accepted")
        },
    }
    manifest["calibration"] = calibration
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("bundle", type=Path, help="bundle directory (e.g. worker/bundles/keymap)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="lfw-dev directory")
    ap.add_argument("--pool", choices=("holdout", "train"), default="holdout")
    ap.add_argument("--ids", type=int, default=20, help="identities (each: 1 enrolment + 1 genuine probe)")
    ap.add_argument("--impostors-per-id", type=int, default=2, help="attackers probed under each victim's seed")
    ap.add_argument("--enrol-photos", type=int, choices=(1, 2), default=2)
    ap.add_argument("--far", type=float, default=1e-2, help="target false accept rate")
    ap.add_argument("--steps", type=int, default=None, help="override the engine's steps (as a deployment would)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed; also fixes the calibration key")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: see docs/decisions.md)")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop probing after this long, use what is done")
    ap.add_argument("--json", type=Path, default=None, help="write the summary and the scores here")
    ap.add_argument("--write", action="store_true", help="store the threshold in the bundle manifest")


def main(args: argparse.Namespace) -> int:
    """``cancelable-bundle calibrate-threshold``: calibrate, print the summary, optionally write the manifest."""
    if args.ids < 2 or args.impostors_per_id < 1 or not 0 < args.far < 1:
        raise SystemExit("need --ids >= 2, --impostors-per-id >= 1 and 0 < --far < 1")

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    engine, manifest = build_engine(args.bundle, args.steps, log)
    # a fixed, public calibration key: these seeds protect nothing, they only need to be distinct per subject
    key_material = hashlib.sha256(f"calibrate_threshold/{args.seed}".encode()).digest()
    ids = sample_identities(engine, args, key_material, log)
    pairs = impostor_pairs(ids, args.impostors_per_id, args.seed)
    log(f"{len(ids)} enrolments, {len(ids)} genuine + {len(pairs)} impostor probes, {args.threads} threads")
    scores = run(engine, ids, pairs, args, log)
    if len(scores.genuine) < 1 or len(scores.impostor) < 2:
        raise SystemExit("too few trials completed to calibrate")
    res = summary(scores, args.far)

    n_imp = res["n_impostor"]
    print()
    print(f"bundle {manifest['bundle_id']}, engine {engine.fingerprint}, {engine.config.steps} steps")
    print(
        f"sample: {len(ids)} identities ({args.pool} pool), {res['n_genuine']} genuine and {n_imp} impostor trials "
        f"(SMALL sample: the FAR estimate resolves only multiples of {res['far_resolution']:.3g})"
    )
    print(
        f"genuine  mean {res['genuine_mean']:.4f} min {res['genuine_min']:.4f} | "
        f"impostor (victim's key) mean {res['impostor_mean']:.4f} max {res['impostor_max']:.4f}"
    )
    print(
        f"threshold @ FAR <= {args.far:g}: {res['threshold']:.4f}  -> FAR {res['far']:.4f} "
        f"({res['impostors_accepted']}/{n_imp} impostors accepted), TAR {res['tar']:.4f} "
        f"({res['genuine_accepted']}/{res['n_genuine']})"
    )
    if res["far_upper_95"] is not None:
        print(f"  0/{n_imp} impostors accepted: the true FAR is below {res['far_upper_95']:.3f} with 95 % confidence")
    print(f"EER {res['eer']:.4f} (at threshold {res['eer_threshold']:.4f})")
    print(
        f"cross-check, Gaussian fit of the impostor scores: threshold {res['gaussian_threshold']:.4f} at FAR "
        f"{args.far:g} -> TAR {res['tar_at_gaussian_threshold']:.4f}"
    )
    print(f"total {time.perf_counter() - t0:.0f} s")

    if args.json:
        args.json.write_text(json.dumps({"summary": res, "scores": scores.__dict__}, indent=2) + "\n")
    if args.write:
        write_threshold(args.bundle, manifest, engine, res, args)
        print(f"wrote engine.verify_threshold = {res['threshold']:.4f} to {args.bundle / 'manifest.json'}")
    return 0
