"""The acceptance rows of a ``cancelable-eval`` report: ``cancelable-eval acceptance <report dir>``.

Reads ``report.json`` and the shard records (``shards/*/records.npz``) the report was merged from. Every match is a
judge cosine at or above the report's original FMR 0.1 % threshold. Rows: genuine C(A,K1) vs C(B,K1); same-key
impostor C(A_i,K1_i) vs C(B_{i+1},K1_i); protection C(A,Kk) vs original A NOT matched; C(A,K1) vs C(B,K2)
(reissued probe vs revoked enrolment) and C(A,K1) vs C(A,K2) (same photo, two keys); D_sys; different people
C(A_i,K1_i) vs C(A_j,K1_j); the report's reissued-vs-revoked rate and the judge detector's misses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from worker.evaluation.protocols import load_shards


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def acceptance_rows(report: dict[str, Any], records: dict[str, np.ndarray]) -> tuple[float, int, list[tuple[str, str]]]:
    """(threshold, identities, [(row, value)]) from a report and its merged shard records."""
    thr = float(report["thresholds"]["original_fmr_1e-3"]["value"])
    e = {k[4:]: v for k, v in records.items() if k.startswith("emb_")}
    c1, c2 = _unit(e["cancel_k1"]), _unit(e["cancel_k2"])
    p1, p2, imp = _unit(e["probe_k1"]), _unit(e["probe_k2"]), _unit(e["impostor_k1"])
    oa = _unit(e["orig_a"])
    n = len(c1)

    def rate(x: np.ndarray) -> str:
        x = x[np.isfinite(x)]
        hits = int((x >= thr).sum())
        return f"{100 * hits / x.size:.1f} % ({hits}/{x.size})" if x.size else "n/a"

    keys = sorted(k for k in e if k.startswith("cancel_k"))
    prot = np.concatenate([(_unit(e[k]) * oa).sum(1) for k in keys])
    prot = prot[np.isfinite(prot)]
    diff = (c1 @ c1.T)[np.triu_indices(n, 1)]
    p = report["protocols"]
    unl = p.get("unlinkability")
    rows = [
        ("verification C(A,K1) vs C(B,K1) accepted", rate((c1 * p1).sum(1))),
        ("same-key impostor C(A_i,K1_i) vs C(B_i+1,K1_i) accepted", rate((c1 * imp).sum(1))),
        ("protection: C(A,Kk) vs original A NOT matched", f"{100 * float((prot < thr).mean()):.1f} % of {prot.size}"),
        ("revocation C(A,K1) vs C(B,K2) matched", rate((c1 * p2).sum(1))),
        ("same photo, two keys C(A,K1) vs C(A,K2) matched", rate((c1 * c2).sum(1))),
        ("unlinkability D_sys", f"{unl['d_sys']:.3f}" if unl else "n/a"),
        ("different people C(A_i,K1_i) vs C(A_j,K1_j) matched", rate(diff)),
        ("reissued template matches revoked (report)", json.dumps(p["revocation"].get("reissued_matches_revoked"))),
        ("judge detector misses on generated faces", json.dumps(report["run"].get("judge_detection_misses", {}))),
    ]
    return thr, n, rows


def print_acceptance(report_dir: Path) -> int:
    """Print the rows as a Markdown table; 2 when the directory is not a merged report with its shards."""
    shards = sorted(p.parent for p in (report_dir / "shards").glob("*/records.npz"))
    if not (report_dir / "report.json").is_file() or not shards:
        print(f"{report_dir}: needs report.json and shards/*/records.npz (cancelable-eval run / merge --out there)")
        return 2
    report = json.loads((report_dir / "report.json").read_text())
    records, _ = load_shards(shards)
    thr, n, rows = acceptance_rows(report, records)
    print(f"threshold (original FMR 0.1 %): {thr:.4f}; identities {n}")
    print("| row | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0
