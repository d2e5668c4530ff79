"""Quick knob sweep for the keymap bundle, judged by the independent recognizer (never part of any loss).

Runs on lfw-dev TRAIN identities with 2+ photos that are NOT in the evaluation holdout (sha256 % 10 not in {0, 3}),
so knobs are chosen without looking at the held-out identities; the acceptance numbers come from
``cancelable-eval --split holdout``. Per identity i: photo A and B, key seeds k1, k2.

- genuine: C(A_i, k1) vs C(B_i, k1); cross-key: C(A_i, k1) vs C(B_i, k2); same-key impostor: C(A_i, k1) vs
  C(B_{i+1}, k1_i); different people: C(A_i, k1_i) vs C(A_j, k1_j); protection: C(A_i, k1) vs original A_i.
  Match = judge cosine >= ``--threshold`` (0.3438 = FMR 1e-3 on 499,500 original lfw-dev pairs, lite MODEL_CARD).

    PYTHONPATH=. .venv/bin/python research/keymap_quick_eval.py --bundle /tmp/km --ids 40 --steps 0 20 --lr 0.05
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def identities(data: Path, n: int) -> list[tuple[str, list[Path]]]:
    from worker.evaluation.splits import is_holdout_identity, is_validation_identity

    out = []
    for d in sorted(p for p in data.iterdir() if p.is_dir()):
        if is_validation_identity(d.name) or is_holdout_identity(d.name):
            continue
        photos = sorted(d.glob("*.jpg"))
        if len(photos) >= 2:
            out.append((d.name, photos))
    out.sort(key=lambda x: hashlib.sha256(("q" + x[0]).encode()).hexdigest())
    return out[:n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default=str(REPO / "worker" / "bundles" / "keymap"))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "lfw-dev"))
    ap.add_argument("--ids", type=int, default=40)
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 20])
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--prior", type=float, nargs="+", default=[None])
    ap.add_argument("--nuisance", type=float, nargs="+", default=[None])
    ap.add_argument("--threshold", type=float, default=0.3438)
    ap.add_argument("--out", default=None, help="append JSON lines here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from worker.algorithm.config import EngineConfig
    from worker.algorithm.keymap_engine import KeymapEngine
    from worker.evaluation.evaluator import Evaluator, load_rgb
    from worker.evaluation.protocols import to_uint8
    from worker.models.alignment import template
    from worker.models.bundle import load_bundle

    judge = Evaluator(threads=1)
    bundle = load_bundle(args.bundle)
    base = KeymapEngine(bundle, EngineConfig(steps=0))
    people = []
    for name, photos in identities(Path(args.data), args.ids * 2):
        try:
            a, b = base.prepare(load_rgb(photos[0])), base.prepare(load_rgb(photos[1]))
        except Exception:
            continue
        people.append((name, load_rgb(photos[0]), a, b))
        if len(people) == args.ids:
            break
    n = len(people)
    rng = np.random.default_rng(0)
    k1 = [bytes(rng.integers(0, 256, 32, dtype=np.uint8)) for _ in range(n)]
    k2 = [bytes(rng.integers(0, 256, 32, dtype=np.uint8)) for _ in range(n)]
    orig, _ = judge.embed_many([p[1] for p in people])
    unit = np.asarray(template(bundle.generator.alignment), dtype=np.float32)
    fa = torch.stack([p[2] for p in people])
    fb = torch.stack([p[3] for p in people])
    fb_next = torch.roll(fb, -1, 0)
    faces = torch.cat([fa, fb, fb, fb_next])
    seeds = k1 + k1 + k2 + k1
    for nuis, prior, steps in itertools.product(args.nuisance, args.prior, args.steps):
        if nuis is not None:
            bundle.encoder.nuisance_scale = nuis
        eng = KeymapEngine(bundle, EngineConfig(steps=steps, lr=args.lr), prior_weight=prior)
        t = time.time()
        z0, tg = eng.start_latents(faces, seeds)
        # refined in chunks (per-sample loss and Adam: the same result, a quarter of the activation memory)
        z = torch.cat([eng.refine(z0[i : i + 40], tg[i : i + 40]) for i in range(0, len(z0), 40)])
        with torch.no_grad():
            imgs = eng.generator(z).clamp(-1, 1)
        sec = (time.time() - t) / len(faces)
        e, found = judge.embed_with_fallback([to_uint8(x) for x in imgs], unit)
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        ca, cb1, cb2, imp = e[:n], e[n : 2 * n], e[2 * n : 3 * n], e[3 * n :]
        o = orig / np.linalg.norm(orig, axis=1, keepdims=True)
        thr = args.threshold
        gen = (ca * cb1).sum(1)
        cross = (ca * cb2).sum(1)
        impo = (ca * imp).sum(1)
        prot = (ca * o).sum(1)
        m = ca @ ca.T
        diff = m[np.triu_indices(n, 1)]
        rec = {
            "bundle": bundle.bundle_id,
            "steps": steps,
            "lr": args.lr,
            "prior": eng.prior_weight,
            "nuisance": bundle.encoder.nuisance_scale,
            "n": n,
            "genuine": round(float((gen >= thr).mean()), 3),
            "cross_key": round(float((cross >= thr).mean()), 3),
            "same_key_impostor": round(float((impo >= thr).mean()), 3),
            "different_people": round(float((diff >= thr).mean()), 4),
            "vs_original": round(float((prot >= thr).mean()), 3),
            "genuine_mean": round(float(gen.mean()), 3),
            "diff_mean": round(float(diff.mean()), 3),
            "detected": round(float(found.mean()), 3),
            "sec_per_image": round(sec, 3),
            "threads": 1,
            "pid": os.getpid(),
        }
        print(json.dumps(rec), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
