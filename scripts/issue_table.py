"""Issue 13's table from a ``cancelable-eval`` report directory (report.json + shards/*/records.npz).

All matches are judge cosines >= the report's original FMR 0.1 % threshold. Rows:
genuine C(A,K1) vs C(B,K1); same-key impostor C(A_i,K1_i) vs C(B_{i+1},K1_i); protection C(A,Kk) vs original A not
matched; C(A,K1) vs C(B,K2) (reissued probe vs revoked enrolment) and C(A,K1) vs C(A,K2) (same photo, two keys);
D_sys; different people C(A_i,K1_i) vs C(A_j,K1_j); generated faces the judge's detector finds.

    .venv/bin/python scripts/issue_table.py reports/eval-keymap
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main(report_dir: str) -> None:
    d = Path(report_dir)
    rep = json.loads((d / "report.json").read_text())
    thr = rep["thresholds"]["original_fmr_1e-3"]["value"]
    recs = [np.load(p) for p in sorted((d / "shards").glob("*/records.npz"))]
    cat = {k: np.concatenate([r[k] for r in recs]) for k in recs[0].files if k.startswith("emb_")}
    c1, c2 = unit(cat["emb_cancel_k1"]), unit(cat["emb_cancel_k2"])
    p1, p2, imp = unit(cat["emb_probe_k1"]), unit(cat["emb_probe_k2"]), unit(cat["emb_impostor_k1"])
    oa = unit(cat["emb_orig_a"])
    n = len(c1)

    def rate(x: np.ndarray) -> str:
        x = x[np.isfinite(x)]
        return f"{100 * float((x >= thr).mean()):.1f} % ({int((x >= thr).sum())}/{x.size})"

    keys = [k for k in cat if k.startswith("emb_cancel_k")]
    prot = np.concatenate([(unit(cat[k]) * oa).sum(1) for k in keys])
    m = c1 @ c1.T
    diff = m[np.triu_indices(n, 1)]
    p = rep["protocols"]
    rows = [
        ("verification C(A,K1) vs C(B,K1) accepted", rate((c1 * p1).sum(1))),
        ("same-key impostor C(A_i,K1_i) vs C(B_i+1,K1_i) accepted", rate((c1 * imp).sum(1))),
        ("protection: C(A,Kk) vs original A NOT matched", f"{100 * float((prot < thr).mean()):.1f} % of {prot.size}"),
        ("revocation C(A,K1) vs C(B,K2) matched", rate((c1 * p2).sum(1))),
        ("same photo, two keys C(A,K1) vs C(A,K2) matched", rate((c1 * c2).sum(1))),
        ("unlinkability D_sys", f"{p['unlinkability']['d_sys']:.3f}" if p.get("unlinkability") else "n/a"),
        ("different people C(A_i,K1_i) vs C(A_j,K1_j) matched", rate(diff)),
        ("reissued template matches revoked (report)", json.dumps(p["revocation"].get("reissued_matches_revoked"))),
        ("judge detector misses on generated faces", json.dumps(rep["run"].get("judge_detection_misses", {}))),
    ]
    print(f"threshold (original FMR 0.1 %): {thr:.4f}; identities {n}")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main(sys.argv[1])
