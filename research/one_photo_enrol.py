"""One-photo enrolment variants on the keymap bundle, same-key verification (engine scores, as ``cancelable verify``).

Variants of the ONE enrolment photo's template (the probe is always the deployed single render of another photo):
- ``base``:   the deployed engine (one render);
- ``flip``:   identity read from the photo and its mirror image (mean dlib embedding), for the template AND the probe;
- ``renders``: the template averages R renders of the photo under the same key, nuisance r = 0 (the key's own) and
  r = 1..R-1 (further key-seeded nuisance codes).
Identities: the ``test`` half of the held-out identities of ``cancelable-bundle calibrate-threshold`` (photo 0 enrols,
the last photo probes); impostors: every other identity's probe under the victim's key. Reports TAR at same-key FAR
1 % and 5 % within the sample, so variants are compared at equal false-accept rates.

PYTHONPATH=. nice -n 5 .venv/bin/python research/one_photo_enrol.py --ids 30 --out runs/one_photo.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from worker.algorithm.keylatent import seeded_normal
from worker.algorithm.keymap import NUISANCE_LABEL, key_rotation
from worker.bundletool.calibrate import DEFAULT_DATA, build_engine, in_part, key_seeds, prepare_photo
from worker.bundletool.operating_points import threshold_at_far


def start(engine, faces, seed: bytes, flip: bool, render: int):
    km = engine.keymap
    with torch.no_grad():
        e = engine.identity.embed(faces, km.alignment).float()
        if flip:
            e = torch.nn.functional.normalize(e, dim=-1) + torch.nn.functional.normalize(
                engine.identity.embed(faces.flip(-1), km.alignment).float(), dim=-1
            )
        rot = key_rotation(seed, km.k)[None]
        nseed = seed if render == 0 else hashlib.sha256(seed + f"render-{render}".encode()).digest()
        nu = seeded_normal(nseed, (km.nuisance_dim,), NUISANCE_LABEL).float()[None]
        t = km.targets(e, rot)
        return km(t, nu), t


def embed(engine, face, seed: bytes, flip: bool = False, render: int = 0) -> np.ndarray:
    z0, t = start(engine, face[None], seed, flip, render)
    z = engine.refine(z0, t)
    with torch.no_grad():
        img = engine.generator(z).float().clamp(-1, 1)
        e = torch.nn.functional.normalize(engine.identity.embed(img, engine.generator.alignment).float(), dim=-1)
    return e[0].numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ids", type=int, default=30)
    ap.add_argument("--renders", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("runs/one_photo.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    engine, _ = build_engine(Path("worker/bundles/keymap"), None, print)
    seed = key_seeds(1, 0)[0]
    dirs = sorted(d for d in DEFAULT_DATA.iterdir() if d.is_dir() and in_part(d.name, "test"))
    dirs = [d for d in dirs if len(list(d.glob("*.jpg"))) >= 2]
    random.Random(0).shuffle(dirs)
    rows: dict[str, list[np.ndarray]] = {"base_t": [], "base_p": [], "flip_t": [], "flip_p": [], "renders_t": []}
    t0 = time.perf_counter()
    for d in dirs:
        if len(rows["base_t"]) == args.ids:
            break
        photos = sorted(d.glob("*.jpg"))
        random.Random(f"0/{d.name}").shuffle(photos)
        faces = [f for f in (prepare_photo(engine, p) for p in photos[:4]) if f is not None]
        if len(faces) < 2:
            continue
        a, b = faces[0], faces[-1]
        base_t = embed(engine, a, seed)
        rows["base_t"].append(base_t)
        rows["base_p"].append(embed(engine, b, seed))
        rows["flip_t"].append(embed(engine, a, seed, flip=True))
        rows["flip_p"].append(embed(engine, b, seed, flip=True))
        extra = [embed(engine, a, seed, render=r) for r in range(1, args.renders)]
        m = np.mean([base_t, *extra], axis=0)
        rows["renders_t"].append(m / np.linalg.norm(m))
        print(f"{len(rows['base_t'])}/{args.ids} identities, {time.perf_counter() - t0:.0f} s", flush=True)
    out = {}
    for name, (tk, pk) in {
        "base": ("base_t", "base_p"),
        "flip": ("flip_t", "flip_p"),
        "renders": ("renders_t", "base_p"),
    }.items():
        sc = np.stack(rows[tk]) @ np.stack(rows[pk]).T  # [victim template, probe]
        diag = np.eye(len(sc), dtype=bool)
        gen, imp = sc[diag].tolist(), sc[~diag].tolist()
        res = {
            "n_genuine": len(gen),
            "n_impostor": len(imp),
            "genuine_mean": float(np.mean(gen)),
            "impostor_mean": float(np.mean(imp)),
        }
        for far in (0.01, 0.05):
            t = threshold_at_far(imp, far)
            res[f"tar_at_far_{far:g}"] = float(np.mean(np.array(gen) >= t))
            res[f"threshold_at_far_{far:g}"] = t
        out[name] = res
        print(name, json.dumps(res))
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
