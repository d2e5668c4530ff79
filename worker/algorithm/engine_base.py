"""What every engine family shares: the public API the service calls, input checks, batch packing, result types.

A family (``pipeline.Engine``: FaceAnonyMixer layer mixing; ``keymap_engine.KeymapEngine``: the key map) subclasses
``EngineBase`` and provides ``_run`` (one batch of checked subjects -> results in order) and ``fingerprint``; it sets
``encoder`` (with ``alignment``), ``input_size``, ``embedding_dim``, ``dtype`` and ``config`` in its constructor.
Seeds are secrets: never logged, never in exception messages.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from worker.algorithm.config import EngineConfig
from worker.algorithm.keylatent import SEED_BYTES
from worker.errors import InvalidTensorError, KeyError_

Subject = tuple[torch.Tensor, bytes]
"""One subject: its aligned faces (N, 3, R, R) in [-1, 1] and its 32-byte key seed."""


@dataclass
class EngineEnrollment:
    """One subject's engine output (CPU, float32 in either engine dtype): images (N, 3, G, G) in [-1, 1], embeddings
    (N, D), template (D,). The service turns it into a template version; the job's wire result is
    ``worker.contracts.EnrollResult``."""

    images: torch.Tensor
    embeddings: torch.Tensor
    template: torch.Tensor


@dataclass
class ProbeResult:
    """One probe's result (CPU, float32): image (3, G, G) in [-1, 1], embedding (D,)."""

    image: torch.Tensor
    embedding: torch.Tensor


class EngineBase:
    """The engine API: ``prepare``, ``enroll``, ``probe``, ``enroll_many``, ``score``, ``__call__``. One engine per
    worker process (not thread-safe)."""

    config: EngineConfig
    encoder: Any
    input_size: int
    embedding_dim: int
    dtype: torch.dtype = torch.float32
    matcher_kind: str = "cosine"
    """How ``score`` compares embeddings (the last part of a template's matcher name): cosine of the raw embeddings."""
    images_independent: bool = False
    """True when each image's output depends only on that image and its seed (not on the subject's other photos nor
    on batch mates): an n-photo template is then the normalised mean of n single-photo embeddings."""

    @property
    def fingerprint(self) -> str:
        """``<bundle_id>:<digest of what changes results>``. A probe must use the template's fingerprint."""
        raise NotImplementedError

    def _run(self, subjects: list[Subject]) -> list[EngineEnrollment]:
        """One batch of checked subjects -> one result per subject, in order."""
        raise NotImplementedError

    def prepare(self, image_rgb_uint8: np.ndarray) -> torch.Tensor:
        """Detect exactly one face and align it to the engine's input crop: (H, W, 3) uint8 -> (3, R, R) in [-1, 1].

        Raises InvalidTensorError / InvalidImageError (bad array), NoFaceError, MultipleFacesError.
        """
        from worker.models.dlib_face import prepare_face  # dlib is only needed on this path

        crop = prepare_face(image_rgb_uint8, self.input_size, self.encoder.alignment)
        return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).to(torch.float32) / 127.5 - 1.0

    def enroll(self, faces: torch.Tensor, seed: bytes) -> EngineEnrollment:
        """All images of one subject in one call. faces (N, 3, R, R)."""
        return self([(faces, seed)])[0]

    def probe(self, face: torch.Tensor, seed: bytes) -> ProbeResult:
        """One face captured later, anonymised alone under the subject's key. face (3, R, R)."""
        if not isinstance(face, torch.Tensor) or face.dim() != 3:
            raise InvalidTensorError(f"probe face must be a (3, {self.input_size}, {self.input_size}) tensor")
        result = self([(face[None], seed)])[0]
        return ProbeResult(image=result.images[0], embedding=result.embeddings[0])

    def enroll_many(self, subjects: Sequence[Subject]) -> list[EngineEnrollment]:
        """Many subjects, packed into as few batches as ``config.max_batch_images`` allows; results in input order,
        equal (to float rounding) to what ``enroll`` gives each subject alone."""
        checked = [(self._check_faces(f), check_seed(s)) for f, s in subjects]
        results: list[EngineEnrollment] = []
        for chunk in pack_subjects(checked, self.config.max_batch_images):
            results.extend(self._run(chunk))
        return results

    def match_coords(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The matcher's linear map, (N, D) -> (N, D') float32 on the CPU: here the embeddings themselves."""
        return embeddings.detach().float().cpu()

    def match_space(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Embeddings or templates (N, D) -> the unit vectors (N, D') whose dot product is ``score``: the normalised
        ``match_coords`` of the normalised embeddings (cosine of the raw embeddings here)."""
        unit = F.normalize(embeddings.detach().float().cpu(), dim=-1)
        return F.normalize(self.match_coords(unit), dim=-1)

    def score(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """Similarity of two embeddings or templates (D,): the dot product of their ``match_space`` vectors."""
        for t in (a, b):
            if not isinstance(t, torch.Tensor) or t.shape != (self.embedding_dim,) or not t.is_floating_point():
                raise InvalidTensorError(f"score expects two float ({self.embedding_dim},) tensors")
        u = self.match_space(torch.stack([a.detach().float().cpu(), b.detach().float().cpu()]))
        return float(u[0] @ u[1])

    def __call__(self, subjects: Sequence[Subject]) -> list[EngineEnrollment]:
        """ONE batch of subjects (no packing; see ``enroll_many``)."""
        return self._run([(self._check_faces(f), check_seed(s)) for f, s in subjects])

    def _check_faces(self, faces: object) -> torch.Tensor:
        return check_faces(faces, self.input_size, self.config.input_tolerance, self.dtype)


def per_subject(images: torch.Tensor, embeddings: torch.Tensor, counts: list[int]) -> list[EngineEnrollment]:
    """Split a batch's outputs (images (B, 3, G, G), L2-normalised embeddings (B, D), on the CPU) back into
    subjects of ``counts`` images each; template = the re-normalised mean of a subject's embeddings."""
    out: list[EngineEnrollment] = []
    start = 0
    for n in counts:
        e = embeddings[start : start + n]
        out.append(EngineEnrollment(images[start : start + n].clone(), e.clone(), F.normalize(e.mean(0), dim=0)))
        start += n
    return out


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


def pack_subjects(subjects: list[Subject], limit: int) -> Iterator[list[Subject]]:
    """Whole subjects, in order, packed greedily into batches of at most ``limit`` images."""
    chunk: list[Subject] = []
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
