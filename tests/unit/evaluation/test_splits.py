"""The project's identity split rule (worker/evaluation/splits.py)."""

from __future__ import annotations

import hashlib

from worker.evaluation.splits import identity_split, is_holdout_identity, is_validation_identity


def test_identity_split_rule() -> None:
    names = ["George_W_Bush", "Aaron_Eckhart", "Ariel_Sharon", "Zico", "Tony_Blair"]
    for n in names:
        h = int(hashlib.sha256(n.encode()).hexdigest(), 16) % 10
        assert is_validation_identity(n) == (h == 0)
        assert is_holdout_identity(n) == (h == 3)
        assert identity_split(n) == {0: "val", 3: "holdout"}.get(h, "train")
    # pinned: a change of the rule would silently move identities between train and validation
    assert [identity_split(n) for n in names] == ["train", "train", "holdout", "train", "val"]
