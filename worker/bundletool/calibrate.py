"""Calibrate a bundle's verify decisions per enrolment size (1, 2, 3+ photos), running the engine as a worker does.

Protocol (all in-process, CPU, the engine configuration a default deployment gets):

* identities: LFW lfw-dev holdout identities (sha256(name) % 10 == 3, never trained on; never a VALIDATION
  identity), split in two halves by ``sha256(name) // 10 % 2``: ``--part calibration`` (even) sets thresholds,
  ``--part test`` (odd) measures them on other people; each with 2+ usable photos (up to ``--photos``).
* keys: ``--keys`` calibration keys (seed = derive_seed(calibration key, tenant, "key-j", 1), as the key provider
  derives seeds). Every photo of every identity is anonymised under every key, each image alone (the engine's
  output for an image depends only on that image and its seed, so an enrolment of n photos is exactly the
  normalised mean of their single-photo embeddings).
* trials, for enrolment size s (1, 2, 3+) over the identities with s + 1 photos: template = the first s photos
  under key j, probe = the identity's last photo.
  - genuine: probe of the same person under key j;
  - impostor (same key): another person's probe under key j (the attacker presents their own face for the
    victim's subject, and the worker uses the victim's key); every person against every other, per key;
  - other-key impostor: another person's probe under another key;
  - old key: the same person's probe under another key (a probe under a revoked key against the reissue).
  Scores are ``engine.score`` (the dot product in the engine's ``match_space``), as ``cancelable verify`` computes
  them.

Thresholds are set on same-key impostors (the attack verify faces) at each FAR in
``operating_points.FAR_TARGETS``, with the FAR's exact 95 % interval. Impostor trials share probes and templates (an
identity appears in many pairs), so the interval, computed as if trials were independent, is optimistic.

``--write`` stores ``manifest["verify"]`` (matcher, target FAR, threshold per enrolment size and the operating
points) and sets ``engine.verify_threshold`` to the strictest of the size thresholds (for templates that do not
record their size), with how it was obtained in ``manifest["calibration"]["verify"]``. ``--scores FILE`` keeps the
embeddings (an ``.npz``, saved after every identity) and a later run with the same arguments continues from it (or,
when complete, recomputes the thresholds without anonymising again).

Run: ``nice -n 19 cancelable-bundle calibrate-threshold worker/bundles/keymap --ids 80 --keys 3 --write``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.bundletool.operating_points import FAR_TARGETS, observed_eer, operating_points, rate_at
from worker.errors import CancelableError

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "lfw-dev"
TENANT = "calibration"
SIZES = ("1", "2", "3+")


def _digest(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16)


def in_part(name: str, part: str) -> bool:
    """Holdout identity (sha256 % 10 == 3) of the given half; never a VALIDATION identity (% 10 == 0)."""
    h = _digest(name)
    if h % 10 != 3:
        return False
    return part == "all" or (h // 10 % 2 == 0) == (part == "calibration")


# --- sampling and anonymisation -------------------------------------------------------------------------------------
def prepare_photo(engine: Any, path: Path) -> torch.Tensor | None:
    """Decode like the worker and align with the engine; None where the worker would reject the photo."""
    from worker.service.images import decode_image

    try:
        rgb = decode_image(path.read_bytes(), max_bytes=20_000_000, max_pixels=40_000_000, name=path.name)
        return engine.prepare(rgb)
    except CancelableError:  # NoFaceError, MultipleFacesError, InvalidImageError, ...
        return None


def key_seeds(n_keys: int, sample_seed: int) -> list[bytes]:
    """Public calibration keys: these seeds protect nothing, they only need to be distinct."""
    from worker.keys.derive import derive_seed

    material = hashlib.sha256(f"calibrate_threshold/{sample_seed}".encode()).digest()
    return [derive_seed(material, TENANT, f"key-{j}", 1) for j in range(n_keys)]


def anonymise_all(
    engine: Any, args: argparse.Namespace, log: Any, done: dict[str, Any] | None = None, save: Any = None
) -> dict[str, Any]:
    """Every usable photo of up to ``args.ids`` identities under every key -> {"names", "emb": per identity an array
    (keys, photos, D)}. Continues ``done`` (a checkpoint of the same run); ``save(table)`` after each identity; stops
    early at ``args.max_minutes``."""
    dirs = sorted(d for d in args.data.iterdir() if d.is_dir() and in_part(d.name, args.part))
    dirs = [d for d in dirs if len(list(d.glob("*.jpg"))) >= 2]
    random.Random(args.seed).shuffle(dirs)
    seeds = key_seeds(args.keys, args.seed)
    table: dict[str, Any] = done or {"names": [], "emb": [], "tried": []}
    t0 = time.perf_counter()
    for d in dirs:
        if len(table["names"]) >= args.ids:
            break
        if args.max_minutes is not None and time.perf_counter() - t0 >= 60 * args.max_minutes:
            log(f"--max-minutes {args.max_minutes} reached: calibrating on the identities done so far")
            break
        if d.name in table["tried"]:
            continue
        photos = sorted(d.glob("*.jpg"))
        random.Random(f"{args.seed}/{d.name}").shuffle(photos)
        faces = [f for f in (prepare_photo(engine, p) for p in photos[: args.photos]) if f is not None]
        table["tried"].append(d.name)
        if len(faces) >= 2:
            stack = torch.stack(faces)
            per_key = [engine.enroll(stack, s).embeddings.numpy() for s in seeds]
            table["names"].append(d.name)
            table["emb"].append(np.stack(per_key).astype(np.float32))
            el = time.perf_counter() - t0
            log(f"  {len(table['names']):>3}/{args.ids} identities, {len(faces)} photos x {args.keys} keys, {el:.0f} s")
        if save is not None:
            save(table)
    log(f"{len(table['names'])} identities from {len(dirs)} candidates in part {args.part!r}")
    return table


def save_scores(path: Path, table: dict[str, Any], meta: dict[str, Any]) -> None:
    """The embeddings (and which identities were tried) as an ``.npz``, replaced atomically."""
    arrays = {f"e{i}": e for i, e in enumerate(table["emb"])}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(
        tmp, names=np.array(table["names"]), tried=np.array(table["tried"]), meta=np.array(json.dumps(meta)), **arrays
    )
    os.replace(tmp, path)


def load_scores(path: Path, meta: dict[str, Any]) -> dict[str, Any] | None:
    """A checkpoint written by ``save_scores`` for the same arguments and engine, else None."""
    if not path.is_file():
        return None
    z = np.load(path)
    if json.loads(str(z["meta"])) != meta:
        return None
    names = [str(n) for n in z["names"]]
    return {"names": names, "tried": [str(n) for n in z["tried"]], "emb": [z[f"e{i}"] for i in range(len(names))]}


# --- trials ---------------------------------------------------------------------------------------------------------
def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


Project = Callable[[np.ndarray], np.ndarray]
"""The engine's ``match_space`` on numpy: (N, D) embeddings or templates -> (N, D') unit vectors."""


def trials(emb: list[np.ndarray], size: str, project: Project | None = None) -> dict[str, list[float]]:
    """Scores of the four trial kinds for enrolment ``size`` ("1", "2", "3+": 3 photos). ``emb``: per identity
    (keys, photos, D) unit embeddings; identities with fewer than size + 1 photos take no part. A template is the
    normalised mean of its photos' embeddings (as the worker stores it); ``project`` (default: none, cosine) maps
    templates and probes into the matcher's space before the dot product."""
    s = 3 if size == "3+" else int(size)
    used = [e for e in emb if e.shape[1] >= s + 1]
    out: dict[str, list[float]] = {"genuine": [], "impostor": [], "other_key": [], "old_key": []}
    if len(used) < 2:
        return out
    tmpl = np.stack([_unit(e[:, :s].mean(1)) for e in used])  # (I, K, D)
    probe = np.stack([_unit(e[:, -1]) for e in used])  # (I, K, D)
    if project is not None:
        tmpl, probe = (project(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:2], -1) for x in (tmpl, probe))
    n_id, n_keys = tmpl.shape[:2]
    for j in range(n_keys):
        for jp in range(n_keys):
            sc = tmpl[:, j] @ probe[:, jp].T  # [victim, attacker]: victim's template (key j), probe under key jp
            diag = np.eye(n_id, dtype=bool)
            if j == jp:
                out["genuine"] += sc[diag].tolist()
                out["impostor"] += sc[~diag].tolist()
            else:
                out["old_key"] += sc[diag].tolist()
                out["other_key"] += sc[~diag].tolist()
    return out


def decision_rates(scores: dict[str, list[float]], threshold: float) -> dict[str, Any]:
    """Accepted share (and count) of each trial kind at ``threshold``."""
    return {k: {"accepted": rate_at(v, threshold), "n": len(v)} for k, v in scores.items() if v}


def calibrate_sizes(
    emb: list[np.ndarray], targets: tuple[float, ...] = FAR_TARGETS, project: Project | None = None
) -> dict[str, Any]:
    """Per enrolment size: operating points on same-key impostors, EER, trial counts."""
    out: dict[str, Any] = {}
    for size in SIZES:
        sc = trials(emb, size, project)
        if len(sc["impostor"]) < 2:
            continue
        e, e_t = observed_eer(sc["genuine"], sc["impostor"])
        out[size] = {
            "identities": int(sum(x.shape[1] >= (3 if size == "3+" else int(size)) + 1 for x in emb)),
            "operating_points": operating_points(sc["genuine"], sc["impostor"], targets),
            "eer": e,
            "eer_threshold": e_t,
        }
    return out


# --- run ------------------------------------------------------------------------------------------------------------
def deployed_engine(bundle_dir: Path, steps: int | None, log: Any) -> tuple[Any, dict[str, Any]]:
    """The engine a worker with default settings runs for the bundle in ``bundle_dir`` (on the CPU), and the
    bundle's manifest."""
    from worker.algorithm.factory import build_engine
    from worker.bundle_config import deployed_config
    from worker.models.bundle import load_bundle

    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    config = deployed_config(bundle_dir, steps, None)
    engine = build_engine(load_bundle(bundle_dir, "cpu"), config, "cpu")
    log(f"bundle {manifest['bundle_id']} at {bundle_dir}; engine {engine.fingerprint}, {config.steps} steps")
    return engine, manifest


def verify_section(result: dict[str, Any], target_far: float, matcher: str) -> dict[str, Any]:
    """``manifest["verify"]``: matcher, target FAR, threshold per enrolment size, operating points."""
    thresholds: dict[str, float] = {}
    points: dict[str, list[dict[str, Any]]] = {}
    for size, r in result.items():
        pts = [{k: round(v, 6) if isinstance(v, float) else v for k, v in p.items()} for p in r["operating_points"]]
        points[size] = pts
        at = [p for p in pts if p["far_target"] == target_far]
        if not at:
            raise SystemExit(f"--far {target_far:g} is not one of the calibrated FARs {FAR_TARGETS}")
        thresholds[size] = at[0]["threshold"]
    return {"matcher": matcher, "target_far": target_far, "thresholds": thresholds, "operating_points": points}


def write_calibration(
    bundle_dir: Path, loaded: dict[str, Any], engine: Any, section: dict[str, Any], provenance: dict[str, Any]
) -> None:
    path = bundle_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    if manifest.get("bundle_id") != loaded.get("bundle_id"):
        raise SystemExit(
            f"refusing to write: the manifest now names bundle {manifest.get('bundle_id')!r}, "
            f"the calibration ran on {loaded.get('bundle_id')!r} (re-run the calibration)"
        )
    engine_section = manifest.get("engine") if isinstance(manifest.get("engine"), dict) else {}
    engine_section["verify_threshold"] = max(section["thresholds"].values())
    manifest["engine"] = engine_section
    manifest["verify"] = section
    calibration = manifest.get("calibration") if isinstance(manifest.get("calibration"), dict) else {}
    calibration.pop("verify_threshold", None)  # superseded by the per-size calibration
    calibration["verify"] = {
        "tool": "cancelable-bundle calibrate-threshold",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "engine_fingerprint": engine.fingerprint,
        "steps": engine.config.steps,
        **provenance,
    }
    manifest["calibration"] = calibration
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("bundle", type=Path, help="bundle directory (e.g. worker/bundles/keymap)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="lfw-dev directory")
    ap.add_argument("--part", choices=("calibration", "test", "all"), default="calibration")
    ap.add_argument("--ids", type=int, default=80, help="identities (each with 2+ usable photos)")
    ap.add_argument("--photos", type=int, default=4, help="photos per identity at most (3+ enrolment needs 4)")
    ap.add_argument("--keys", type=int, default=3, help="calibration keys (every photo anonymised under each)")
    ap.add_argument("--far", type=float, default=1e-3, help=f"target false accept rate, one of {FAR_TARGETS}")
    ap.add_argument("--compare", type=float, nargs="*", default=[], help="also report decisions at these thresholds")
    ap.add_argument("--steps", type=int, default=None, help="override the engine's steps (as a deployment would)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed; also fixes the calibration keys")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: see docs/decisions.md)")
    ap.add_argument("--scores", type=Path, default=None, help="keep (and continue from) the embeddings in this .npz")
    ap.add_argument(
        "--max-minutes", type=float, default=None, help="stop anonymising after this long (0: only re-use --scores)"
    )
    ap.add_argument("--json", type=Path, default=None, help="write the full result here")
    ap.add_argument("--write", action="store_true", help="store the calibration in the bundle manifest")


def main(args: argparse.Namespace) -> int:
    """``cancelable-bundle calibrate-threshold``: calibrate, print the summary, optionally write the manifest."""
    from worker.bundle_config import default_matcher

    if args.ids < 2 or args.keys < 1 or args.photos < 2 or args.far not in FAR_TARGETS:
        raise SystemExit(f"need --ids >= 2, --keys >= 1, --photos >= 2 and --far in {FAR_TARGETS}")
    if args.steps is not None and args.steps < 1:
        raise SystemExit("--steps must be >= 1 (a worker runs at least one refinement step)")
    if args.write and args.part == "test":
        raise SystemExit("--write calibrates on --part calibration (or all), never on the test half")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    engine, manifest = deployed_engine(args.bundle, args.steps, log)
    if not getattr(engine, "images_independent", False):
        raise SystemExit(
            "this bundle's engine optimises a subject's photos together (layer mixing with the identity term), so "
            "an n-photo template is not the mean of single-photo results: per-size calibration needs an engine whose "
            "images run independently (the keymap family)"
        )
    meta = {k: str(getattr(args, k)) for k in ("data", "part", "ids", "photos", "keys", "seed")} | {
        "engine": engine.fingerprint
    }
    table = load_scores(args.scores, meta) if args.scores else None
    if table is not None:
        log(f"continuing from {len(table['names'])} identities in {args.scores}")
    scores_path = args.scores

    def save(t: dict[str, Any]) -> None:
        if scores_path is not None:
            save_scores(scores_path, t, meta)

    table = anonymise_all(engine, args, log, table, save)

    def project(x: np.ndarray) -> np.ndarray:
        return engine.match_space(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    result = calibrate_sizes(table["emb"], project=project)
    if not result:
        raise SystemExit("too few identities to calibrate")
    compare = sorted(set(args.compare))
    decisions = {
        size: {f"{t:.4f}": decision_rates(trials(table["emb"], size, project), t) for t in compare} for size in result
    }
    for size, r in result.items():
        print(f"\nenrolment {size} photo(s): {r['identities']} identities, EER {r['eer']:.4f}")
        for p in r["operating_points"]:
            lo, hi = p["far_ci95"]
            print(
                f"  FAR <= {p['far_target']:<6g} threshold {p['threshold']:.4f}: FAR {p['far']:.5f} "
                f"[{lo:.5f}, {hi:.5f}] ({p['impostors_accepted']}/{p['n_impostor']}), TAR {p['tar']:.4f} "
                f"of {p['n_genuine']}{'' if p['resolved'] else '  (below the sample resolution)'}"
            )
        for t, rates in decisions[size].items():
            text = ", ".join(f"{k} {v['accepted']:.4f} of {v['n']}" for k, v in rates.items())
            print(f"  at threshold {t}: {text}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    provenance = {
        "protocol": "each photo anonymised alone under each calibration key; template = normalised mean of the "
        "first n photos' embeddings, probe = another photo; impostor = another identity's probe under the "
        "victim's key (every pair, per key)",
        "data": f"LFW lfw-dev holdout identities, part {args.part}, sample seed {args.seed}",
        "identities": len(table["names"]),
        "keys": args.keys,
    }
    if args.json:
        args.json.write_text(json.dumps({"result": result, "decisions": decisions, **provenance}, indent=2) + "\n")
    if args.write:
        section = verify_section(result, args.far, default_matcher(manifest))
        write_calibration(args.bundle, manifest, engine, section, provenance)
        print(f"wrote verify thresholds {section['thresholds']} to {args.bundle / 'manifest.json'}")
    return 0
