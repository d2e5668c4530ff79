"""The project's identity split of LFW (lfw-dev), by SHA-256 of the identity's folder name.

Every training script, the evaluation harness and the bundle tools use these rules, so no model is evaluated or
calibrated on people it was trained on:

- ``val`` (validation): sha256(name) % 10 == 0;
- ``holdout``: sha256(name) % 10 == 3, also never trained on. In lfw-dev every validation identity has a single
  photo, so measurements against another photo of the same person use the holdout (164 identities with 2+ photos);
- ``train``: every other identity.
"""

from __future__ import annotations

import hashlib


def _residue(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10


def is_validation_identity(name: str) -> bool:
    """VALIDATION iff sha256(folder name) % 10 == 0."""
    return _residue(name) == 0


def is_holdout_identity(name: str) -> bool:
    """The evaluation holdout: sha256(folder name) % 10 == 3."""
    return _residue(name) == 3


def identity_split(name: str) -> str:
    """``"val"``, ``"holdout"`` or ``"train"`` (only ``train`` identities are ever trained or fit on)."""
    if is_validation_identity(name):
        return "val"
    return "holdout" if is_holdout_identity(name) else "train"
