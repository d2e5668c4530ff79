"""How well can ANY verify built on the keymap bundle's in-loss recognizer do? Its decisions on the real photos.

A cancelable face of the keymap bundle carries its photo's identity as the key map's target: dlib's embedding,
reduced to the top-k whitened real coordinates and rotated by the key (cosines between targets are the cosines
between the photos' whitened coordinates). A generator that reproduced every target exactly would therefore verify
exactly as well as cosines of those coordinates on the real photos do, and no better than dlib itself on the real
photos. This script measures both, with the protocol of ``cancelable-bundle calibrate-threshold`` (template = mean
of the first n photos, probe = another photo, impostor = another identity's probe; TAR at the same FAR targets).

    PYTHONPATH=. .venv/bin/python research/real_photo_ceiling.py --part test --ids 160
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default=str(REPO / "worker" / "bundles" / "keymap"))
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "lfw-dev")
    ap.add_argument("--part", default="all", choices=("all", "calibration", "test"))
    ap.add_argument("--ids", type=int, default=160)
    ap.add_argument("--photos", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from worker.algorithm.config import EngineConfig
    from worker.algorithm.keymap_engine import KeymapEngine
    from worker.bundletool.calibrate import calibrate_sizes, in_part, prepare_photo
    from worker.models.bundle import load_bundle

    engine = KeymapEngine(load_bundle(args.bundle), EngineConfig(steps=0))
    km = engine.keymap
    dirs = sorted(d for d in args.data.iterdir() if d.is_dir() and in_part(d.name, args.part))
    dirs = [d for d in dirs if len(list(d.glob("*.jpg"))) >= 2]
    random.Random(args.seed).shuffle(dirs)
    emb: list[np.ndarray] = []
    t0 = time.perf_counter()
    for d in dirs:
        if len(emb) >= args.ids:
            break
        photos = sorted(d.glob("*.jpg"))
        random.Random(f"{args.seed}/{d.name}").shuffle(photos)
        faces = [f for f in (prepare_photo(engine, p) for p in photos[: args.photos]) if f is not None]
        if len(faces) < 2:
            continue
        with torch.no_grad():
            e = engine.identity.embed(torch.stack(faces), km.alignment).float()
        emb.append(torch.nn.functional.normalize(e, dim=-1).numpy()[None])  # (1 key, photos, D)
    print(f"{len(emb)} identities embedded in {time.perf_counter() - t0:.0f} s", flush=True)

    def whitened(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            c = km.real_coords(torch.from_numpy(x).float()).double().numpy()
        return c / np.linalg.norm(c, axis=-1, keepdims=True)

    for name, project in (("dlib raw cosine", None), (f"whitened real top-{km.k} (the key map's targets)", whitened)):
        res = calibrate_sizes(emb, project=project)
        for size, r in res.items():
            points = {f"{p['far_target']:g}": round(p["tar"], 3) for p in r["operating_points"]}
            line = {"scoring": name, "size": size, "identities": r["identities"], "eer": round(r["eer"], 4)}
            print(json.dumps({**line, "tar_at_far": points}), flush=True)


if __name__ == "__main__":
    main()
