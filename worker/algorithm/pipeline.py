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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from worker.algorithm.config import EngineConfig
from worker.algorithm.keylatent import SEED_BYTES, key_latents, key_orthogonal, key_rotation_about, key_target
from worker.algorithm.losses import group_pairs, total_loss
from worker.algorithm.mix import LayerSplit, assemble, mix, resolve_split
from worker.algorithm.optimise import adam_optimise
from worker.errors import BundleError, InvalidTensorError, KeyError_
from worker.models.base import AttributeModel, Encoder, Generator, IdentityModel

KEY_TARGET_LABEL = "identity-target"


class BundleLike(Protocol):
    """What the engine needs from worker.models.bundle.ModelBundle."""

    generator: Generator
    encoder: Encoder
    identity: IdentityModel
    attribute: AttributeModel | None


@dataclass
class EnrollResult:
    """One subject's result (CPU, float32 in either engine dtype): images (N, 3, G, G) in [-1, 1], embeddings
    (N, D), template (D,)."""

    images: torch.Tensor
    embeddings: torch.Tensor
    template: torch.Tensor


@dataclass
class ProbeResult:
    """One probe's result (CPU, float32): image (3, G, G) in [-1, 1], embedding (D,)."""

    image: torch.Tensor
    embedding: torch.Tensor


class Engine:
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

    # --- public API ---------------------------------------------------------------------------------------------
    def prepare(self, image_rgb_uint8: np.ndarray) -> torch.Tensor:
        """Detect exactly one face and align it to the encoder's crop: (H, W, 3) uint8 -> (3, R, R) in [-1, 1].

        Raises InvalidTensorError / InvalidImageError (bad array), NoFaceError, MultipleFacesError.
        """
        from worker.models.dlib_face import prepare_face  # dlib is only needed on this path

        crop = prepare_face(image_rgb_uint8, self.input_size, self.encoder.alignment)
        return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).to(torch.float32) / 127.5 - 1.0

    def enroll(self, faces: torch.Tensor, seed: bytes) -> EnrollResult:
        """All images of one subject, optimised together (L_idp ties them). faces (N, 3, R, R)."""
        return self([(faces, seed)])[0]

    def probe(self, face: torch.Tensor, seed: bytes) -> ProbeResult:
        """One face captured later, anonymised alone under the subject's key. face (3, R, R)."""
        if not isinstance(face, torch.Tensor) or face.dim() != 3:
            raise InvalidTensorError(f"probe face must be a (3, {self.input_size}, {self.input_size}) tensor")
        result = self([(face[None], seed)])[0]
        return ProbeResult(image=result.images[0], embedding=result.embeddings[0])

    def enroll_many(self, subjects: Sequence[tuple[torch.Tensor, bytes]]) -> list[EnrollResult]:
        """Many subjects, packed into as few optimisation batches as ``config.max_batch_images`` allows.

        Results are in input order and equal (to fp32 rounding) what ``enroll`` gives each subject alone.
        """
        checked = [(self._check_faces(f), self._check_seed(s)) for f, s in subjects]
        results: list[EnrollResult] = []
        for chunk in self._chunks(checked):
            results.extend(self._run(chunk))
        return results

    def score(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """Cosine similarity of two embeddings or templates (D,)."""
        for t in (a, b):
            if not isinstance(t, torch.Tensor) or t.shape != (self.embedding_dim,) or not t.is_floating_point():
                raise InvalidTensorError(f"score expects two float ({self.embedding_dim},) tensors")
        return float(F.cosine_similarity(a.detach().float().cpu(), b.detach().float().cpu(), dim=0))

    def __call__(self, subjects: Sequence[tuple[torch.Tensor, bytes]]) -> list[EnrollResult]:
        """Run steps 1-6 on ONE batch of subjects (no chunking; see ``enroll_many``)."""
        return self._run([(self._check_faces(f), self._check_seed(s)) for f, s in subjects])

    # --- the numbered steps -------------------------------------------------------------------------------------
    def _run(self, subjects: list[tuple[torch.Tensor, bytes]]) -> list[EnrollResult]:
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
        out: list[EnrollResult] = []
        start = 0
        for n in counts:
            e = emb[start : start + n]
            out.append(EnrollResult(images[start : start + n].clone(), e.clone(), F.normalize(e.mean(0), dim=0)))
            start += n
        return out

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

    def _check_faces(self, faces: object) -> torch.Tensor:
        return check_faces(faces, self.input_size, self.config.input_tolerance, self.dtype)

    @staticmethod
    def _check_seed(seed: object) -> bytes:
        return check_seed(seed)

    def _chunks(self, subjects: list[tuple[torch.Tensor, bytes]]) -> Iterator[list[tuple[torch.Tensor, bytes]]]:
        return pack_subjects(subjects, self.config.max_batch_images)


# --- input checks and packing, shared by every engine family ---------------------------------------------------
def check_faces(faces: object, size: int, tolerance: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Validate aligned faces (N, 3, size, size) in [-1, 1] (``tolerance`` outside is clamped) -> ``dtype``."""
    if not isinstance(faces, torch.Tensor):
        raise InvalidTensorError(f"faces must be a torch tensor, got {type(faces).__name__}")
    if not faces.is_floating_point():
        raise InvalidTensorError(f"faces must be a float tensor in [-1, 1], got {faces.dtype}")
    if faces.dim() != 4 or faces.shape[0] < 1 or tuple(faces.shape[1:]) != (3, size, size):
        raise InvalidTensorError(f"faces must have shape (N, 3, {size}, {size}), got {tuple(faces.shape)}")
    faces = faces.detach().to(dtype)
    if not bool(torch.isfinite(faces).all()):
        raise InvalidTensorError("faces contain NaN or infinite values")
    if float(faces.min()) < -1.0 - tolerance or float(faces.max()) > 1.0 + tolerance:
        raise InvalidTensorError("faces must have values in [-1, 1]")
    return faces.clamp(-1.0, 1.0)


def check_seed(seed: object) -> bytes:
    """A 32-byte key seed (never echoed in the error: it is secret)."""
    if not isinstance(seed, bytes | bytearray) or len(seed) != SEED_BYTES:
        raise KeyError_(f"a key seed must be {SEED_BYTES} bytes")
    return bytes(seed)


def pack_subjects(
    subjects: list[tuple[torch.Tensor, bytes]], limit: int
) -> Iterator[list[tuple[torch.Tensor, bytes]]]:
    """Whole subjects, in order, packed greedily into batches of at most ``limit`` images."""
    chunk: list[tuple[torch.Tensor, bytes]] = []
    size = 0
    for item in subjects:
        n = len(item[0])
        if chunk and size + n > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += n
    if chunk:
        yield chunk
