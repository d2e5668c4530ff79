"""Align lfw-dev with dlib into "dlib-chip" crops and cache them for the lite model.

Convention ("dlib-chip"): dlib frontal face detector (no upsampling first, one upsampling retry), 5-point
shape predictor from ``face_recognition_models``, ``dlib.get_face_chip(img, shape, size=R, padding=0.25)``.
When several faces are found the largest detection is kept. Images with no detection are skipped and counted.

Output in ``--out`` (default ``data-cache/``):
- ``lfw_chips_<R>.npy``: uint8 (N, R, R, 3) RGB;
- ``lfw_chips_<R>.tsv``: one line per row of the array: ``index<TAB>identity<TAB>relative path<TAB>split``
  where split is ``train``, ``val`` or ``holdout`` by ``worker.evaluation.splits.identity_split`` (only ``train`` is
  trained on).

Run: ``.venv/bin/python scripts/prepare_lfw.py --size 64``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

from worker.evaluation.splits import identity_split  # noqa: E402


def load_dlib():
    """Return (detector, shape predictor) from dlib-bin and face_recognition_models."""
    import dlib
    import face_recognition_models

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location())
    return detector, predictor


def align_chip(img: np.ndarray, detector, predictor, size: int) -> np.ndarray | None:
    """RGB uint8 (H, W, 3) -> dlib-chip uint8 (size, size, 3) of the largest face, or None without a face."""
    import dlib

    dets = detector(img, 0)
    if len(dets) == 0:
        dets = detector(img, 1)
    if len(dets) == 0:
        return None
    rect = max(dets, key=lambda r: r.width() * r.height())
    shape = predictor(img, rect)
    return np.asarray(dlib.get_face_chip(img, shape, size=size, padding=0.25), dtype=np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "lfw-dev")
    ap.add_argument("--out", type=Path, default=ROOT / "data-cache")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--limit", type=int, default=0, help="process only the first N images (for quick checks)")
    args = ap.parse_args()

    if not args.data.is_dir():
        sys.exit(f"data directory not found: {args.data}")
    args.out.mkdir(parents=True, exist_ok=True)
    detector, predictor = load_dlib()
    paths = sorted(args.data.glob("*/*.jpg"))
    if args.limit:
        paths = paths[: args.limit]
    chips: list[np.ndarray] = []
    rows: list[str] = []
    missed = 0
    t0 = time.time()
    for i, p in enumerate(paths):
        img = np.asarray(Image.open(p).convert("RGB"))
        chip = align_chip(img, detector, predictor, args.size)
        if chip is None:
            missed += 1
            continue
        name = p.parent.name
        split = identity_split(name)
        rows.append(f"{len(chips)}\t{name}\t{p.relative_to(args.data)}\t{split}")
        chips.append(chip)
        if (i + 1) % 500 == 0:
            el = time.time() - t0
            print(
                f"{i + 1}/{len(paths)} images, {missed} without face, {el:.0f}s, "
                f"ETA {el / (i + 1) * (len(paths) - i - 1):.0f}s",
                flush=True,
            )
    arr = np.stack(chips)
    stem = args.out / f"lfw_chips_{args.size}"
    np.save(stem.with_suffix(".npy"), arr)
    stem.with_suffix(".tsv").write_text("\n".join(rows) + "\n")
    n_val = sum(not r.endswith("\ttrain") for r in rows)
    print(
        f"wrote {arr.shape} to {stem}.npy; {n_val} val/holdout rows, {len(rows) - n_val} train rows, {missed} missed, "
        f"{time.time() - t0:.0f}s"
    )


if __name__ == "__main__":
    main()
