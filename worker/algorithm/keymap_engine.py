"""The engine of the "keymap" generator family (embedded DCGAN bundle): same API as ``pipeline.Engine``.

Per image (each image runs alone, as a batch of one: results never depend on batch mates, bit for bit):

1. identity   e = dlib(face) on the 150 px dlib chip (the in-loss recognizer; never the evaluation judge)
2. key        t = key transform of e in whitened identity coordinates (``keymap.KeyMapModel.targets``), with the
              subject seed's rotation; nuisance code from the same seed
3. start      z0 = key map MLP(t, nuisance): the start already carries the key-transformed identity
4. refine     ``config.steps`` Adam steps (lr ``config.lr``) on z: 1 - cos(c_g(G(z)), t) + w_prior (|z|^2/d - 1)^2
5. decode     G(z), 64 px; template = normalised mean of the dlib embeddings of the subject's outputs

A probe is transformed toward its own key target, never toward a stored template. Seeds are never logged.
``generator``, ``encoder`` (image -> z through the key map with the identity rotation: the bundle's best
reconstruction of a face without a key), ``split`` and ``config`` exist so the evaluation harness can treat it like
the layer-mixing engine; its re-inversion attack is ``worker.evaluation.keymap_attack``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from worker.algorithm.config import EngineConfig
from worker.algorithm.engine_base import EngineBase, EngineEnrollment, per_subject
from worker.algorithm.keymap import KeyMapModel, identity_loss, key_nuisance, key_rotation, prior_penalty
from worker.algorithm.mix import LayerSplit
from worker.errors import BundleError


class KeyMapEncoder(torch.nn.Module):
    """Image (B, 3, 150, 150) dlib chips -> z (B, 1, z_dim) with NO key (identity rotation, zero nuisance)."""

    def __init__(self, identity: Any, keymap: KeyMapModel) -> None:
        super().__init__()
        self.identity, self.keymap = identity, keymap
        self.input_size = keymap.input_size
        self.alignment = keymap.alignment

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        e = self.identity.embed(images, self.alignment)
        t = self.keymap.targets(e, None)
        return self.keymap(t, torch.zeros(len(t), self.keymap.nuisance_dim, device=t.device))[:, None, :]


class KeymapEngine(EngineBase):
    """Cancelable faces from a key-transformed identity target and a learned key map. One per worker process."""

    family = "keymap"
    images_independent = True  # every image runs alone (``anonymise_one``)
    matcher_kind = "keymap-whitened"

    def __init__(
        self,
        bundle: Any,
        config: EngineConfig | None = None,
        device: torch.device | str | None = None,
        prior_weight: float | None = None,
    ):
        for role in ("generator", "encoder", "identity"):
            if getattr(bundle, role, None) is None:
                raise BundleError(f"the engine needs a bundle with a {role}")
        if not isinstance(bundle.encoder, KeyMapModel):
            raise BundleError("the keymap engine needs a keymap-mlp encoder component")
        self.bundle = bundle
        self.config = config or EngineConfig()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.generator = bundle.generator
        self.keymap: KeyMapModel = bundle.encoder
        self.identity = bundle.identity
        for model in (self.generator, self.keymap, self.identity):
            model.to(self.device).eval().requires_grad_(False)
        if int(self.generator.z_dim) != self.keymap.z_dim:
            raise BundleError(f"key map gives z of {self.keymap.z_dim}; the generator takes {self.generator.z_dim}")
        if int(self.identity.embedding_dim) != self.keymap.emb_dim:
            raise BundleError("key map and identity model disagree on the embedding size")
        self.prior_weight = float(prior_weight if prior_weight is not None else self.keymap.prior_weight)
        self.encoder = KeyMapEncoder(self.identity, self.keymap)
        self.split = LayerSplit(n_latent=1, from_key=(), trainable=(0,), name="keymap")
        self.input_size = int(self.keymap.input_size)
        self.output_size = int(self.generator.resolution)
        self.embedding_dim = int(self.identity.embedding_dim)

    @property
    def fingerprint(self) -> str:
        knobs: dict[str, Any] = {
            "config": self.config.result_fields(),
            "keymap": self.keymap.config(),
            "prior": self.prior_weight,
        }
        digest = hashlib.sha256(json.dumps(knobs, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return f"{getattr(self.bundle, 'bundle_id', 'unknown')}:{digest}"

    def match_coords(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Embeddings or templates (N, D) -> whitened generator coordinates (N, k): ``score`` is their cosine.

        dlib puts every face in a narrow cone (raw cosine ~0.9 between different people) and the generator's faces
        share more still, so raw cosines between cancelable faces are dominated by what all of them have in common.
        The key map aims each face at a target in the generator's whitened coordinates ``c_g``; comparing there
        discards the shared mean direction and weighs each identity direction by how much generated faces vary
        along it (one enrolment photo, same-key impostors at FAR 0.1 %: see docs/evaluation.md)."""
        with torch.no_grad():
            return self.keymap.cpu_gen_coords(embeddings)

    # --- steps ----------------------------------------------------------------------------------------------------
    def start_latents(self, faces: torch.Tensor, seeds: Sequence[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-3 for one image per seed: (z0 (B, z_dim), targets (B, k))."""
        km = self.keymap
        with torch.no_grad():
            e = self.identity.embed(faces.to(self.device), km.alignment).float()
            rots = torch.stack([key_rotation(s, km.k) for s in seeds]).to(self.device)
            nu = torch.stack([key_nuisance(s, km.nuisance_dim) for s in seeds]).to(self.device)
            t = km.targets(e, rots)
            return km(t, nu), t

    def refine(self, z0: torch.Tensor, t: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """Step 4: per-sample Adam on z (the loss is a sum of per-sample terms: batch-independent)."""
        steps = self.config.steps if steps is None else steps
        z = z0.detach().clone().requires_grad_(True)
        if steps <= 0:
            return z.detach()
        sched = self.config.schedule()
        opt = torch.optim.Adam([z], lr=self.config.lr)
        marks = {int(round(m * steps)) for m in sched.milestones}
        for i in range(steps):
            if i in marks:
                for group in opt.param_groups:
                    group["lr"] *= sched.decay
            img = self.generator(z)
            e = self.identity.embed(img, self.generator.alignment)
            per = identity_loss(self.keymap, e, t) + self.prior_weight * prior_penalty(z)
            loss = per.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return z.detach()

    def _run(self, subjects: list[tuple[torch.Tensor, bytes]]) -> list[EngineEnrollment]:
        """Every image of every subject runs on its own, as a batch of one (``anonymise_one``): its output depends
        only on its photo and its seed, never on batch mates nor on the other photos of its subject."""
        if not subjects:
            return []
        counts = [len(f) for f, _ in subjects]
        outs = [self.anonymise_one(face[None], seed) for faces, seed in subjects for face in faces]
        images = torch.cat([img for img, _ in outs])
        emb = torch.cat([e for _, e in outs])
        return per_subject(images, emb, counts)

    def anonymise_one(self, face: torch.Tensor, seed: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-5 for ONE aligned face (1, 3, R, R) under ``seed`` -> (image (1, 3, G, G) in [-1, 1], unit
        embedding (1, D)), both float32 on the CPU.

        Always a batch of exactly one, with its own Adam state and schedule: float32 CPU kernels (GEMM blocking in
        the key map's linear layers and the recognizer's convolutions) round differently with the batch size, and
        the Adam steps amplify a 1e-7 difference into tens of grey levels. Fixed shape, fixed kernels: bit-identical
        results whatever else the worker runs in the same call."""
        seeds = [seed]
        z0, t = self.start_latents(face, seeds)
        z = self.refine(z0, t)
        with torch.no_grad():
            image = self.generator(z).float().clamp(-1.0, 1.0)
            emb = F.normalize(self.identity.embed(image, self.generator.alignment).float(), dim=-1)
        return image.cpu(), emb.cpu()
