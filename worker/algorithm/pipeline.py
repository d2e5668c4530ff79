"""The engine the tasks call: aligned faces + key seed -> cancelable faces and templates (FaceAnonyMixer).

``Engine.__call__`` runs, for a batch of subjects at once (each subject = its faces + its 32-byte key seed):

1. encode     the aligned faces to W+ (fp32, no grad)
2. key latent per subject from its seed (keylatent.py)
3. mix        hard layer swap real/key (mix.py)
4. optimise   the trainable layers of all images together, per-sample Adam on a sum of per-subject losses
5. decode     the final W+ to images (fp32)
6. template   per subject: mean of the L2-normalised identity embeddings of its cancelable images, re-normalised

Original-image features (identity embedding, attribute tokens, key target) are computed once before step 4.
Models are frozen and in eval mode; gradients flow only to the trainable latents. Seeds are secrets: they are
never logged nor put in exception messages.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from worker.algorithm.config import EngineConfig
from worker.algorithm.engine_base import (
    EngineBase,
    EngineEnrollment,
    ProbeResult,
    check_faces,
    check_seed,
    pack_subjects,
    per_subject,
)
from worker.algorithm.keylatent import key_latents, key_orthogonal, key_rotation_about, key_target
from worker.algorithm.losses import group_pairs, total_loss
from worker.algorithm.mix import LayerSplit, assemble, mix, resolve_split
from worker.algorithm.optimise import adam_optimise
from worker.errors import BundleError
from worker.models.base import AttributeModel, Encoder, Generator, IdentityModel

KEY_TARGET_LABEL = "identity-target"


class BundleLike(Protocol):
    """What the engine needs from worker.models.bundle.ModelBundle."""

    generator: Generator
    encoder: Encoder
    identity: IdentityModel
    attribute: AttributeModel | None


class Engine(EngineBase):
    """FaceAnonyMixer on a model bundle. Not thread-safe (one engine per worker process)."""

    def __init__(
        self, bundle: BundleLike | Any, config: EngineConfig | None = None, device: torch.device | str | None = None
    ):
        for role in ("generator", "encoder", "identity"):
            if getattr(bundle, role, None) is None:
                raise BundleError(f"the engine needs a bundle with a {role}")
        self.bundle = bundle
        self.config = config or EngineConfig()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = self.config.torch_dtype()
        self.generator: Generator = bundle.generator
        self.encoder: Encoder = bundle.encoder
        self.identity: IdentityModel = bundle.identity
        self.attribute: AttributeModel | None = bundle.attribute if self.config.w_attr > 0 else None
        for model in (self.generator, self.encoder, self.identity, bundle.attribute):
            if isinstance(model, torch.nn.Module):
                model.to(self.device).eval().requires_grad_(False)
                if self.dtype != torch.float32:
                    model.to(self.dtype)
        self.split: LayerSplit = resolve_split(self.config.split, self.generator.n_latent)
        self.schedule = self.config.schedule()
        self.weights = self.config.loss_weights()
        self.input_size = int(self.encoder.input_size)
        self.output_size = int(self.generator.resolution)
        self.embedding_dim = int(self.identity.embedding_dim)
        center = self.config.key_target_center
        if center is not None and len(center) != self.embedding_dim:
            raise ValueError(
                f"key_target_center has {len(center)} values; the identity model gives {self.embedding_dim}"
            )

    @property
    def fingerprint(self) -> str:
        """``<bundle_id>:<config fingerprint>``. Store it with a template: a probe must use an equal fingerprint."""
        return f"{getattr(self.bundle, 'bundle_id', 'unknown')}:{self.config.fingerprint()}"

    # --- the numbered steps -------------------------------------------------------------------------------------
    def _run(self, subjects: list[tuple[torch.Tensor, bytes]]) -> list[EngineEnrollment]:
        if not subjects:
            return []
        counts = [len(f) for f, _ in subjects]
        faces = torch.cat([f for f, _ in subjects]).to(self.device)
        groups = torch.repeat_interleave(torch.arange(len(subjects)), torch.tensor(counts)).to(self.device)

        # 1. encode
        with torch.no_grad():
            w_real = self.encoder(faces).to(self.dtype)

        # 2. key latent per subject (drawn on the CPU from the seed, mapped in fp32), one row per image
        w_key = key_latents(self.generator, [s for _, s in subjects], self.config.truncation_psi)[groups].to(self.dtype)

        # 3. mix
        w_mixed, w_train = mix(w_real, w_key, self.split)

        # 4. optimise (features of the originals once, no grad)
        loss_fn = self._loss_fn(faces, groups, len(subjects), [s for _, s in subjects], w_mixed)
        w_train = adam_optimise(w_train, loss_fn, self.schedule).latents

        # 5. decode
        with torch.no_grad():
            images = self.generator.synthesis(assemble(w_mixed, w_train, self.split)).to(self.dtype).clamp(-1.0, 1.0)

            # 6. templates
            emb = F.normalize(self.identity.embed(images, self.generator.alignment).to(self.dtype), dim=-1)
        images, emb = images.float().cpu(), emb.float().cpu()
        return per_subject(images, emb, counts)

    def _loss_fn(
        self, faces: torch.Tensor, groups: torch.Tensor, n_groups: int, seeds: list[bytes], w_mixed: torch.Tensor
    ) -> Any:
        enc_align, gen_align = self.encoder.alignment, self.generator.alignment
        with torch.no_grad():
            e_r = F.normalize(self.identity.embed(faces, enc_align).to(self.dtype), dim=-1)
            tok_r = self.attribute.tokens(faces, enc_align).to(self.dtype) if self.attribute is not None else None
            target = None
            if self.weights.key > 0:
                target = torch.empty_like(e_r)
                for s, seed in enumerate(seeds):
                    rot = self._key_rotation(seed).to(self.device)
                    idx = (groups == s).nonzero()[:, 0]
                    target[idx] = key_target(e_r[idx], rot).to(target.dtype)
        split, weights, attribute, dtype = self.split, self.weights, self.attribute, self.dtype
        pairs = group_pairs(groups)

        def loss_fn(w_train: torch.Tensor) -> torch.Tensor:
            wplus = assemble(w_mixed, w_train, split)
            with self._autocast():
                img = self.generator.synthesis(wplus)
                e_p = self.identity.embed(img, gen_align)
                tok_p = attribute.tokens(img, gen_align) if attribute is not None else None
            terms = total_loss(weights, groups, n_groups, e_p.to(dtype), e_r, tok_p, tok_r, target, pairs)
            return terms.total

        return loss_fn

    # --- helpers ------------------------------------------------------------------------------------------------
    def _key_rotation(self, seed: bytes) -> torch.Tensor:
        """(D, D) key-derived orthogonal matrix of the identity target: about the origin, or about the identity
        model's mean direction when the config names one."""
        center = self.config.key_target_center
        if center is None:
            return key_orthogonal(seed, self.embedding_dim, KEY_TARGET_LABEL)
        return key_rotation_about(seed, torch.tensor(center, dtype=torch.float64), KEY_TARGET_LABEL)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.mixed_precision and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


__all__ = [
    "KEY_TARGET_LABEL",
    "Engine",
    "EngineEnrollment",
    "ProbeResult",
    "check_faces",
    "check_seed",
    "pack_subjects",
]
