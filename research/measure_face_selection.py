"""Failure-to-enrol of the face detection + selection step on a labelled photo folder (default ../shared/data/lfw-dev).

Every image goes through ``worker.models.dlib_face.detect_faces`` once; then two selection rules are applied to the
same detections:

- ``area-only`` (the rule before issue 12): every face with at least 25 % of the largest box's area competes; more
  than one competing face -> ``multiple_faces``;
- ``current``: ``worker.models.dlib_face.select_face`` (prominence = size x centrality, refuse only comparable faces).

Failure to enrol = images that end in ``no_face`` or ``multiple_faces``. LFW photos are centred on the labelled
person, so a chosen face whose centre lies more than 20 % of the half-diagonal from the image centre is counted as
"off-centre" (a likely wrong person). Run from the repository root:

    PYTHONPATH=. .venv/bin/python research/measure_face_selection.py [--every N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CANCELABLE_SHARED_DIR", REPO.parent / "shared"))
OLD_AREA_RATIO = 0.25
OFF_CENTRE = 0.2


def area_only(faces: list, image_hw: tuple[int, int]) -> object:
    """The rule this project used before: the largest face unless another has >= 25 % of its area."""
    from worker.errors import MultipleFacesError, NoFaceError

    if not faces:
        raise NoFaceError("no face detected")
    largest = max(faces, key=lambda f: f.area)
    if sum(f.area >= OLD_AREA_RATIO * largest.area for f in faces) > 1:
        raise MultipleFacesError("faces of similar size")
    return largest


def off_centre(face: object, image_hw: tuple[int, int]) -> bool:
    h, w = image_hw
    left, top, right, bottom = face.box  # type: ignore[attr-defined]
    off = np.hypot((left + right) / 2 - w / 2, (top + bottom) / 2 - h / 2) / (np.hypot(w, h) / 2)
    return bool(off > OFF_CENTRE)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=SHARED / "data" / "lfw-dev", help="folder of <person>/<photo>.jpg")
    ap.add_argument("--every", type=int, default=1, help="use every N-th image in sorted order (1: all)")
    ap.add_argument("--json", type=Path, help="also write the counts (and refused image names) to this JSON file")
    args = ap.parse_args(argv)

    import torch
    from PIL import Image

    from worker.errors import CancelableError
    from worker.models import dlib_face

    torch.set_num_threads(1)
    paths = sorted(args.root.glob("*/*.jpg"))[:: args.every]
    if not paths:
        print(f"no images under {args.root}", file=sys.stderr)
        return 2
    rules = {"area-only": area_only, "current": dlib_face.select_face}
    counts: dict[str, Counter[str]] = {name: Counter() for name in rules}
    refused: dict[str, list[str]] = {name: [] for name in rules}
    t0 = time.monotonic()
    for p in paths:
        rgb = np.asarray(Image.open(p).convert("RGB"))
        faces = dlib_face.detect_faces(rgb)
        for name, rule in rules.items():
            try:
                face = rule(faces, rgb.shape[:2])
            except CancelableError as e:
                counts[name][e.code] += 1
                refused[name].append(f"{p.parent.name}/{p.name}")
                continue
            counts[name]["enrolled"] += 1
            if len(faces) > 1 and off_centre(face, rgb.shape[:2]):
                counts[name]["off_centre_choice"] += 1
    n = len(paths)
    print(f"{n} images from {args.root} (every {args.every}), {time.monotonic() - t0:.0f} s")
    out = {"root": str(args.root), "every": args.every, "images": n, "rules": {}}
    for name, c in counts.items():
        fte = c["no_face"] + c["multiple_faces"]
        print(
            f"  {name:10s} failure to enrol {fte}/{n} = {100 * fte / n:.2f} % (no_face {c['no_face']}, multiple_faces "
            f"{c['multiple_faces']}); off-centre choice among multi-face images {c['off_centre_choice']}"
        )
        out["rules"][name] = {**dict(c), "failure_to_enrol": fte, "refused": refused[name]}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
