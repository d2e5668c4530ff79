"""dlib identity embeddings of lfw-dev TRAIN identities (the data the keymap bundle's key transform is fit on).

Identities the project holds out are skipped: validation (sha256 % 10 == 0) and the holdout the keymap bundle is
evaluated on (sha256 % 10 == 3, ``worker.evaluation.splits.is_holdout_identity``). Faces are aligned and embedded
exactly as the engine does (``prepare_face`` -> 150 px dlib chip -> the torch port of dlib's ResNet).

    PYTHONPATH=. .venv/bin/python scripts/keymap_embed_lfw.py --max-per-id 2 --out data-cache/keymap_lfw_dlib.npz
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from worker.evaluation.evaluator import load_rgb
from worker.evaluation.splits import is_holdout_identity, is_validation_identity
from worker.models.dlib_face import prepare_face
from worker.models.dlib_resnet import load_dlib_resnet

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "lfw-dev"))
    ap.add_argument("--max-per-id", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="at most this many images")
    ap.add_argument("--out", default=str(REPO / "data-cache" / "keymap_lfw_dlib.npz"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    net = load_dlib_resnet().eval()
    names, embs = [], []
    paths = []
    for d in sorted(p for p in Path(args.data).iterdir() if p.is_dir()):
        if is_validation_identity(d.name) or is_holdout_identity(d.name):
            continue
        paths += [(d.name, p) for p in sorted(d.glob("*.jpg"))[: args.max_per_id]]
    paths = paths[: args.limit] if args.limit else paths
    t0 = time.time()
    batch, bnames = [], []

    def flush() -> None:
        if batch:
            x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            with torch.no_grad():
                embs.append(net.embed(x, "dlib-chip").numpy())
            names.extend(bnames)
            batch.clear()
            bnames.clear()

    for i, (name, p) in enumerate(paths):
        try:
            batch.append(prepare_face(load_rgb(p), 150, "dlib-chip"))
            bnames.append(name)
        except Exception:  # no face / several faces: skip
            pass
        if len(batch) == 32:
            flush()
        if i % 500 == 0:
            print(f"{i}/{len(paths)} {time.time() - t0:.0f}s", flush=True)
    flush()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, names=np.array(names), emb=np.concatenate(embs).astype(np.float32))
    print(f"wrote {out}: {len(names)} embeddings in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
