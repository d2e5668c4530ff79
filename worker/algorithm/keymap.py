"""Key transform and learned key map of the "keymap" generator family (the embedded DCGAN bundle).

A face's identity is its embedding ``e`` by the in-loss recognizer (dlib's ResNet, 128-D). dlib puts every face in a
narrow cone around one mean direction ``m`` (cosine ~0.91), so identity lives in the component orthogonal to it:
``u = e - (e . m) m``. Two principal bases of that component are fitted once (``scripts/train_keymap.py``):

- on real faces (``V_r``, standard deviations ``s_r``): ``c_r = V_r^T u / s_r`` is a face's identity in *whitened*
  real coordinates (roughly isotropic, so any rotation of it is again a typical face);
- on the generator's own samples (``V_g``, ``s_g``): ``c_g = V_g^T u / s_g``, the identity of a generated face in
  whitened coordinates of what the generator can actually produce.

Key transform (distribution preserving): ``t = Q_key c_r / |Q_key c_r|`` with ``Q_key`` a key-seeded Haar rotation
of the k whitened coordinates. ``t`` is read as a direction in the generator's whitened coordinates: a key sends
each real identity to a typical *generator* identity, cosines between people are kept (photos of one person land
close, other people stay apart) and different keys send one person to unrelated targets. The component of ``u``
outside the top-k subspace is dropped (it carries identity the generator cannot reproduce and would otherwise leak
across keys).

Key map: an MLP ``(t, nuisance_key) -> z`` trained against the frozen generator so that ``c_g(G(z))`` points along
``t`` (plus an in-batch InfoNCE term against collapse onto one average face and a prior term on ``|z|``); the
engine then refines ``z`` a few Adam steps on the same loss. ``nuisance_key`` is a key-seeded Gaussian that lets a
key choose the non-identity look (pose, background, hair) of its faces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.algorithm.keylatent import key_orthogonal, seeded_normal
from worker.errors import CheckpointLayoutError

ROTATION_LABEL = "keymap-rotation"
NUISANCE_LABEL = "keymap-nuisance"
FORMAT_VERSION = 1


def key_rotation(seed: bytes, k: int) -> torch.Tensor:
    """(k, k) key-seeded Haar rotation of the whitened identity coordinates (float32, CPU)."""
    return key_orthogonal(seed, k, ROTATION_LABEL)


def key_nuisance(seed: bytes, dim: int) -> torch.Tensor:
    """(dim,) key-seeded N(0, I) nuisance code (float32, CPU)."""
    return seeded_normal(seed, (dim,), NUISANCE_LABEL).to(torch.float32)


def prior_penalty(z: torch.Tensor) -> torch.Tensor:
    """Per-sample (|z|^2 / d - 1)^2: keeps z on the shell where N(0, I) codes of the generator live."""
    return (z.pow(2).mean(-1) - 1.0).pow(2)


def info_nce(pred: torch.Tensor, target: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """In-batch InfoNCE: each output must be closer to its own target than to the other targets of the batch."""
    logits = F.normalize(pred, dim=-1) @ F.normalize(target, dim=-1).T / tau
    return F.cross_entropy(logits, torch.arange(len(pred), device=pred.device))


def identity_component(e: torch.Tensor, mean_dir: torch.Tensor) -> torch.Tensor:
    """Embeddings (B, D) -> their normalised component orthogonal to the unit direction ``mean_dir`` (D,)."""
    e = F.normalize(e.float(), dim=-1)
    return e - (e @ mean_dir)[:, None] * mean_dir[None, :]


class KeyMapModel(nn.Module):
    """Identity-space statistics + the MLP key map. The bundle's ``encoder`` component (format ``keymap-mlp``).

    The engine wraps it with the identity model (``KeyMapEncoder``) to read images; on its own it maps targets.
    """

    input_size = 150  # the engine's input crop: dlib chip, 150 px (what the identity model reads)
    alignment = "dlib-chip"
    mean_dir: torch.Tensor  # registered buffers (state_dict entries), declared for the type checker
    real_basis: torch.Tensor
    real_std: torch.Tensor
    gen_basis: torch.Tensor
    gen_std: torch.Tensor

    def __init__(
        self,
        emb_dim: int = 128,
        k: int = 32,
        nuisance_dim: int = 16,
        hidden: int = 512,
        depth: int = 3,
        z_dim: int = 100,
        nuisance_scale: float = 1.0,
        prior_weight: float = 0.05,
    ) -> None:
        super().__init__()
        self.emb_dim, self.k, self.nuisance_dim, self.hidden, self.depth, self.z_dim = (
            emb_dim,
            k,
            nuisance_dim,
            hidden,
            depth,
            z_dim,
        )
        self.nuisance_scale = float(nuisance_scale)
        self.prior_weight = float(prior_weight)
        self.register_buffer("mean_dir", F.normalize(torch.ones(emb_dim), dim=0))
        self.register_buffer("real_basis", torch.eye(emb_dim)[:, :k].clone())
        self.register_buffer("real_std", torch.ones(k))
        self.register_buffer("gen_basis", torch.eye(emb_dim)[:, :k].clone())
        self.register_buffer("gen_std", torch.ones(k))
        layers: list[nn.Module] = []
        d_in = k + nuisance_dim
        for _ in range(depth):
            layers += [nn.Linear(d_in, hidden), nn.LeakyReLU(0.2)]
            d_in = hidden
        layers.append(nn.Linear(d_in, z_dim))
        self.mlp = nn.Sequential(*layers)

    def config(self) -> dict[str, Any]:
        return {
            "emb_dim": self.emb_dim,
            "k": self.k,
            "nuisance_dim": self.nuisance_dim,
            "hidden": self.hidden,
            "depth": self.depth,
            "z_dim": self.z_dim,
            "nuisance_scale": self.nuisance_scale,
            "prior_weight": self.prior_weight,
        }

    # --- identity space -----------------------------------------------------------------------------------------
    def identity_component(self, e: torch.Tensor) -> torch.Tensor:
        """Embedding (B, D) -> its component orthogonal to the mean direction (B, D)."""
        return identity_component(e, self.mean_dir)

    def real_coords(self, e: torch.Tensor) -> torch.Tensor:
        """(B, D) embeddings of real faces -> whitened top-k real coordinates (B, k)."""
        return (self.identity_component(e) @ self.real_basis) / self.real_std

    def gen_coords(self, e: torch.Tensor) -> torch.Tensor:
        """(B, D) embeddings of generated faces -> whitened top-k generator coordinates (B, k)."""
        return (self.identity_component(e) @ self.gen_basis) / self.gen_std

    def cpu_gen_coords(self, e: torch.Tensor) -> torch.Tensor:
        """Linear ``gen_coords`` (no normalisation of ``e``) on the CPU in float64: (B, D) -> (B, k) float32. For unit
        ``e`` it equals ``gen_coords``; being linear, the coordinates of a mean of embeddings are the mean of theirs."""
        mean_dir, basis, std = (t.detach().cpu().double() for t in (self.mean_dir, self.gen_basis, self.gen_std))
        e = e.detach().cpu().double()
        u = e - (e @ mean_dir)[:, None] * mean_dir[None, :]
        return ((u @ basis) / std).float()

    def targets(self, e_real: torch.Tensor, rotations: torch.Tensor | None) -> torch.Tensor:
        """Key transform: real embeddings (B, D), rotations (B, k, k) or None (identity) -> unit targets (B, k)."""
        c = self.real_coords(e_real).to(torch.float64)
        if rotations is not None:
            r = rotations.to(device=c.device, dtype=torch.float64)
            c = (r * c[:, None, :]).sum(-1)  # per-row R c, independent of the batch size
        return F.normalize(c, dim=-1).to(torch.float32)

    # --- key map ------------------------------------------------------------------------------------------------
    def forward(self, target: torch.Tensor, nuisance: torch.Tensor) -> torch.Tensor:
        """Unit targets (B, k), nuisance codes (B, nuisance_dim) -> z (B, z_dim) with |z| = sqrt(z_dim)."""
        x = torch.cat([target * (self.k**0.5) / 3.0, nuisance * self.nuisance_scale], dim=-1)
        return F.normalize(self.mlp(x), dim=-1) * (self.z_dim**0.5)  # on the shell |z| = sqrt(d) of N(0, I)


def identity_loss(model: KeyMapModel, e_out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample 1 - cos(c_g(output), target)."""
    return 1.0 - F.cosine_similarity(model.gen_coords(e_out), target, dim=-1)


def save_keymap(model: KeyMapModel, path: Path, extra: dict[str, Any] | None = None) -> None:
    state = {k: v.detach().cpu().float() for k, v in model.state_dict().items()}
    torch.save(
        {"format_version": FORMAT_VERSION, "config": model.config(), "state": state, "meta": dict(extra or {})}, path
    )


def load_keymap(path: Path, config: dict | None = None) -> KeyMapModel:
    """``keymap.pt`` (written by ``save_keymap``) -> ``KeyMapModel``. ``config`` (the manifest component's) may set
    the runtime knobs ``nuisance_scale`` and ``prior_weight`` (the engine's refinement prior)."""
    from worker.models.bundle import load_strict, read_checkpoint, sub_dict

    ckpt = read_checkpoint(Path(path))
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointLayoutError(f"{Path(path).name}: not a keymap checkpoint (format_version {FORMAT_VERSION})")
    cfg = dict(sub_dict(ckpt, "config", Path(path)))
    for knob in ("nuisance_scale", "prior_weight"):
        if config and knob in config:
            cfg[knob] = float(config[knob])
    model = KeyMapModel(**cfg)
    return load_strict(model, sub_dict(ckpt, "state", Path(path)), Path(path), "keymap")
