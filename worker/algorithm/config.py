"""EngineConfig: every knob of the encode -> mix -> optimise -> decode engine, with the reference's defaults."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import torch

from worker.algorithm.losses import LossWeights
from worker.algorithm.mix import PRESETS, LayerSplit
from worker.algorithm.optimise import AdamSchedule

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings. Defaults follow the reference (lr 0.01, 50 steps, x0.8 at 75 % and 90 %, 10/10/0.15).

    split: "code" (released code), "readme" (authors' README / FALCO) or an explicit ``LayerSplit``.
    key_target / w_key: the consistency-over-time term (docs/decisions.md); w_key is only used when on.
    key_target_center: the identity model's mean embedding direction (from the bundle manifest); when set, the key
    rotation turns embeddings about it instead of about the origin (``keylatent.key_rotation_about``).
    mixed_precision: bf16 autocast around the networks inside the optimisation loop, CUDA only; latents, Adam
    state, losses, the encoder, the key mapping and the final decode + template always run in fp32.
    dtype: "float32" (production) or "float64" (exact mode: every network, latent and loss in float64). float32
    results depend in their last bits on the CPU's kernel choice, which varies with the batch size; float64 makes
    the batching-equivalence checks hold to 1e-8 on any x86 without vendor dispatch flags (tests use it). It is a
    precision knob, not a different algorithm: templates of either mode verify against each other.
    max_batch_images: enroll_many packs whole subjects into optimisation batches of at most this many images
    (a subject with more images than this runs alone in its own batch).
    """

    split: str | LayerSplit = "code"
    steps: int = 50
    lr: float = 0.01
    lr_decay: float = 0.8
    lr_milestones: tuple[float, ...] = (0.75, 0.9)
    truncation_psi: float = 0.7
    w_anon: float = 10.0
    w_idp: float = 10.0
    w_attr: float = 0.15
    anon_margin: float = 0.0
    anon_hinge: bool = False
    key_target: bool = True
    w_key: float = 10.0
    key_target_center: tuple[float, ...] | None = None
    mixed_precision: bool = True
    dtype: str = "float32"
    max_batch_images: int = 32
    input_tolerance: float = 1e-3  # how far outside [-1, 1] an input pixel may be (then clamped)

    def __post_init__(self) -> None:
        if isinstance(self.split, str) and self.split not in PRESETS:
            raise ValueError(f"unknown split preset {self.split!r}; expected one of {PRESETS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.max_batch_images < 1:
            raise ValueError("max_batch_images must be >= 1")
        if not 0.0 <= self.truncation_psi <= 1.0:
            raise ValueError("truncation_psi must be in [0, 1]")
        if min(self.w_anon, self.w_idp, self.w_attr, self.w_key) < 0:
            raise ValueError("loss weights must be >= 0")
        if self.key_target_center is not None:
            center = tuple(float(v) for v in self.key_target_center)
            if len(center) < 2 or not all(math.isfinite(v) for v in center) or math.hypot(*center) < 1e-6:
                raise ValueError("key_target_center must be a finite, non-zero vector")
            object.__setattr__(self, "key_target_center", center)  # a manifest gives a list
        self.schedule()  # validates steps / lr / milestones

    def result_fields(self) -> dict[str, object]:
        """The settings that change results (everything except speed-only knobs), JSON-ready."""
        out = asdict(self)
        for speed_only in ("mixed_precision", "dtype", "max_batch_images", "input_tolerance"):
            out.pop(speed_only)
        out["split"] = asdict(self.split) if isinstance(self.split, LayerSplit) else self.split
        out["lr_milestones"] = list(self.lr_milestones)
        if not self.key_target:
            out.pop("w_key")
            out.pop("key_target_center")
        elif self.key_target_center is None:
            out.pop("key_target_center")  # fingerprints of configs from before the field existed stay the same
        else:
            out["key_target_center"] = [round(float(v), 6) for v in self.key_target_center]
        return out

    def fingerprint(self) -> str:
        """Short hex digest of ``result_fields``: store it with a template; probe only with the same one."""
        text = json.dumps(self.result_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def schedule(self) -> AdamSchedule:
        return AdamSchedule(steps=self.steps, lr=self.lr, decay=self.lr_decay, milestones=self.lr_milestones)

    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def loss_weights(self) -> LossWeights:
        return LossWeights(
            anon=self.w_anon,
            idp=self.w_idp,
            attr=self.w_attr,
            key=self.w_key if self.key_target else 0.0,
            anon_margin=self.anon_margin,
            anon_hinge=self.anon_hinge,
        )
