"""Write a lite bundle's ``engine.key_target_center``: the dlib recognizer's mean embedding direction over the TRAIN
chips (the engine rotates key targets about it; docs/decisions.md). ``train_lite.py`` finalize does the same for
a new bundle; this script adds it to an existing one without touching its weights (the manifest is not hashed).

Run: ``cancelable-bundle fit-key-center tests/fixtures/bundles/lite`` (about 3 min on one core; needs the chips from
``scripts/prepare_lfw.py``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from worker.evaluation.splits import identity_split
from worker.models.dlib_resnet import load_dlib_resnet

ROOT = Path(__file__).resolve().parents[2]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("bundle", type=Path, help="lite-family bundle directory")
    ap.add_argument("--cache", type=Path, default=ROOT / "data-cache", help="where scripts/prepare_lfw.py put chips")
    ap.add_argument("--resolution", type=int, default=64)


def main(args: argparse.Namespace) -> int:
    """``cancelable-bundle fit-key-center``: write ``engine.key_target_center`` into the bundle's manifest."""
    torch.set_num_threads(1)
    chips = np.load(args.cache / f"lfw_chips_{args.resolution}.npy")
    names = [ln.split("\t")[1] for ln in (args.cache / f"lfw_chips_{args.resolution}.tsv").read_text().splitlines()]
    train = np.array([i for i, n in enumerate(names) if identity_split(n) == "train"])
    ident = load_dlib_resnet()
    total = torch.zeros(128, dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(train), 256):
            x = torch.from_numpy(chips[train[i : i + 256]]).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
            total += ident.embed(x, "dlib-chip").double().sum(0)
    center = torch.nn.functional.normalize(total, dim=0)
    path = args.bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.setdefault("engine", {})["key_target_center"] = [round(float(v), 7) for v in center]
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"{path}: key_target_center from {len(train)} train chips")
    return 0
