"""``cancelable-eval acceptance``: the acceptance rows from a report directory and its shard records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from worker.evaluation import protocols as P
from worker.evaluation.acceptance import acceptance_rows
from worker.evaluation.cli import main

E = np.eye(4, dtype=np.float32)  # orthogonal unit embeddings: cosine 1 (same row) or 0
REPORT = {
    "thresholds": {"original_fmr_1e-3": {"value": 0.5}},
    "protocols": {"unlinkability": {"d_sys": 0.1234}, "revocation": {"reissued_matches_revoked": {"value": 0.0}}},
    "run": {"judge_detection_misses": {}},
}


def _records() -> dict[str, np.ndarray]:
    return {
        "names": np.array(["a", "b", "c"]),
        "emb_cancel_k1": E[[0, 1, 2]],
        "emb_probe_k1": E[[0, 1, 3]],  # genuine: 2 of 3 match
        "emb_impostor_k1": E[[3, 3, 3]],  # no impostor matches
        "emb_cancel_k2": E[[0, 3, 3]],  # same photo under two keys: 1 of 3 matches
        "emb_probe_k2": E[[3, 3, 3]],  # revocation: none match
        "emb_orig_a": E[[3, 3, 3]],  # protection: k1 never matches the original, k2 twice -> 4 of 6 protected
    }


def test_acceptance_rows_count_matches_at_the_report_threshold() -> None:
    thr, n, rows = acceptance_rows(REPORT, _records())
    got = dict(rows)
    assert (thr, n) == (0.5, 3)
    assert got["verification C(A,K1) vs C(B,K1) accepted"] == "66.7 % (2/3)"
    assert got["same-key impostor C(A_i,K1_i) vs C(B_i+1,K1_i) accepted"] == "0.0 % (0/3)"
    assert got["protection: C(A,Kk) vs original A NOT matched"] == "66.7 % of 6"
    assert got["revocation C(A,K1) vs C(B,K2) matched"] == "0.0 % (0/3)"
    assert got["same photo, two keys C(A,K1) vs C(A,K2) matched"] == "33.3 % (1/3)"
    assert got["unlinkability D_sys"] == "0.123"
    assert got["different people C(A_i,K1_i) vs C(A_j,K1_j) matched"] == "0.0 % (0/3)"


def test_cli_reads_the_report_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["acceptance", str(tmp_path)]) == 2  # no report yet
    shard = tmp_path / "shards" / "0-of-1"
    shard.mkdir(parents=True)
    np.savez_compressed(shard / P.RECORDS, **_records())  # type: ignore[arg-type]
    (shard / P.META).write_text(json.dumps({"shard_schema": P.SHARD_SCHEMA}))
    (tmp_path / "report.json").write_text(json.dumps(REPORT))
    capsys.readouterr()
    assert main(["acceptance", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "threshold (original FMR 0.1 %): 0.5000; identities 3" in out
    assert "| same photo, two keys C(A,K1) vs C(A,K2) matched | 33.3 % (1/3) |" in out
