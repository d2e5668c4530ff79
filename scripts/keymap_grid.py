"""Contact sheet of the keymap bundle: per column one holdout identity (never trained on).

Rows: [originals: only with --with-originals, never committed], cancelable face of photo A under key 1, of photo B
(another photo) under key 1, of photo A under key 2 (after reissue), then a row of plain key samples G(z), z ~ N(0, I)
from a seed. Writes ``docs/img/keymap-grid.png`` (the model card's sheet) by default.

    PYTHONPATH=. .venv/bin/python scripts/keymap_grid.py [--with-originals --out /tmp/grid.png]
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default=str(REPO / "worker" / "bundles" / "keymap"))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "lfw-dev"))
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--with-originals", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from worker.algorithm.keymap_engine import build_engine
    from worker.bundle_config import deployed_config
    from worker.evaluation.evaluator import load_rgb
    from worker.evaluation.protocols import list_identities, to_uint8

    bundle = Path(args.bundle)
    from worker.models.bundle import load_bundle

    engine = build_engine(load_bundle(bundle), deployed_config(bundle, None, None), None, bundle)
    cols, origs = [], []
    for name, photos in list_identities(args.data, "holdout", 40):
        if len(photos) < 2:
            continue
        try:
            a, b = engine.prepare(load_rgb(photos[0])), engine.prepare(load_rgb(photos[1]))
        except Exception:
            continue
        k1 = hashlib.sha256(f"grid:{name}:1".encode()).digest()
        k2 = hashlib.sha256(f"grid:{name}:2".encode()).digest()
        cols.append((a, b, k1, k2))
        origs.append(to_uint8(torch.nn.functional.interpolate(a[None], size=64, mode="area")[0]))
        if len(cols) == args.n:
            break
    res = engine.enroll_many(
        [(c[0][None], c[2]) for c in cols] + [(c[1][None], c[2]) for c in cols] + [(c[0][None], c[3]) for c in cols]
    )
    n = len(cols)
    rows = [[to_uint8(r.images[0]) for r in res[i * n : (i + 1) * n]] for i in range(3)]
    z = torch.randn(n, engine.generator.z_dim, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        rows.append([to_uint8(x) for x in engine.generator(z).clamp(-1, 1)])
    if args.with_originals:
        rows.insert(0, origs)
    sheet = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
    out = Path(args.out) if args.out else REPO / "docs" / "img" / "keymap-grid.png"
    Image.fromarray(sheet).resize((sheet.shape[1] * 2, sheet.shape[0] * 2), Image.NEAREST).save(out)
    print(f"wrote {out} ({len(rows)} rows x {n})")


if __name__ == "__main__":
    main()
