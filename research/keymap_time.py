"""Time one anonymisation with the keymap bundle as a worker deploys it (1 torch thread, CPU).

PYTHONPATH=. .venv/bin/python research/keymap_time.py [--bundle worker/bundles/keymap] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default=str(REPO / "worker" / "bundles" / "keymap"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--image", default=str(REPO.parent / "shared" / "data" / "faces-smoke" / "obama-biden" / "obama.jpg")
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    from worker.algorithm.keymap_engine import build_engine
    from worker.bundle_config import deployed_config
    from worker.evaluation.evaluator import load_rgb
    from worker.models.bundle import load_bundle

    engine = build_engine(load_bundle(args.bundle), deployed_config(Path(args.bundle), None, None), None, args.bundle)
    rgb = load_rgb(args.image)
    t = time.perf_counter()
    face = engine.prepare(rgb)
    prep = time.perf_counter() - t
    engine.enroll(face[None], os.urandom(32))  # warm-up
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        engine.enroll(face[None], os.urandom(32))
        times.append(time.perf_counter() - t)
    print(
        f"{engine.fingerprint}: {engine.config.steps} steps, 1 thread: "
        f"anonymisation median {statistics.median(times):.3f} s "
        f"(min {min(times):.3f}, max {max(times):.3f}, n={len(times)}); detect+align {prep:.3f} s; "
        f"load average {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
