"""Hard W+ layer swap between the real code and the key latent, with a configurable split.

A split says, for every W+ layer, where its value comes from (the key's synthetic latent or the real code) and
whether it is optimised. The two published variants are defined on StyleGAN2-1024's 18 layers:

=========  ================  ====================  =====================
preset     layers 0-2        layers 3-7            layers 8-17
=========  ================  ====================  =====================
"code"     key, frozen       real, trainable       real, frozen          (the released code)
"readme"   real, frozen      key, trainable        real, frozen          (the authors' README, FALCO)
=========  ================  ====================  =====================

Scaling to other depths. StyleGAN2-family generators (StyleGAN2 at any resolution, and the lite model, see
worker/models/lite.py) index W+ the same way, by increasing resolution, two layers per octave: 0 = 4 px conv,
1-2 = 8 px, 3-4 = 16 px, 5-6 = 32 px, 7-8 = 64 px, ... (each toRGB shares the next block's first index). So an
absolute index drives the same resolution at any depth, and the groups keep their absolute indices whenever
``n_latent >= 9``: coarse 0-2 (4-8 px), middle 3-7 (16-64 px), fine 8..n-1 (lite at 64 px, n = 10: 0-2 / 3-7 /
8-9). Shallower codes (n < 9, e.g. the 8-layer test model) use the boundaries 3/18 and 8/18 as fractions of
``n_latent``, rounded half up (``b = floor(k n / 18 + 1/2)``) and clamped so each group keeps at least one layer
(needs ``n_latent >= 3``); for n = 8 that is 0 / 1-3 / 4-7.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PRESETS = ("code", "readme")
_B1, _B2, _REF = 3, 8, 18


@dataclass(frozen=True)
class LayerSplit:
    """Per-layer source and trainability for an ``n_latent``-layer W+ code.

    ``from_key``: layers whose value comes from the key latent (all others come from the real code).
    ``trainable``: layers optimised by the engine (their starting value is whichever source they have).
    """

    n_latent: int
    from_key: tuple[int, ...]
    trainable: tuple[int, ...]
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.n_latent < 1:
            raise ValueError("n_latent must be >= 1")
        for group, idx in (("from_key", self.from_key), ("trainable", self.trainable)):
            if len(set(idx)) != len(idx) or any(not 0 <= i < self.n_latent for i in idx):
                raise ValueError(f"{group} must be distinct layer indices in [0, {self.n_latent})")
            if tuple(sorted(idx)) != tuple(idx):
                raise ValueError(f"{group} must be sorted")
        if not self.trainable:
            raise ValueError("a split needs at least one trainable layer")

    @property
    def from_real(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_latent) if i not in self.from_key)

    def describe(self) -> str:
        """One line per layer group, e.g. ``code n=8: key 0 frozen | real 1-3 trainable | real 4-7 frozen``."""
        parts: list[str] = []
        run: list[int] = []
        prev: tuple[str, bool] | None = None
        for i in range(self.n_latent):
            kind = ("key" if i in self.from_key else "real", i in self.trainable)
            if prev is not None and kind != prev:
                parts.append(_run_text(prev, run))
                run = []
            run.append(i)
            prev = kind
        if prev is not None:
            parts.append(_run_text(prev, run))
        return f"{self.name} n={self.n_latent}: " + " | ".join(parts)


def _run_text(kind: tuple[str, bool], run: list[int]) -> str:
    span = str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"
    return f"{kind[0]} {span} {'trainable' if kind[1] else 'frozen'}"


def group_bounds(n_latent: int) -> tuple[int, int]:
    """(b1, b2): coarse layers [0, b1), middle [b1, b2), fine [b2, n_latent) (rule in the module docstring)."""
    if n_latent < 3:
        raise ValueError("a preset split needs n_latent >= 3")
    if n_latent > _B2:
        return _B1, _B2
    b1 = (2 * _B1 * n_latent + _REF) // (2 * _REF)  # round half up, integer arithmetic
    b2 = (2 * _B2 * n_latent + _REF) // (2 * _REF)
    b1 = min(max(b1, 1), n_latent - 2)
    b2 = min(max(b2, b1 + 1), n_latent - 1)
    return b1, b2


def preset_split(name: str, n_latent: int) -> LayerSplit:
    """The "code" or "readme" split (module docstring) scaled to ``n_latent`` layers."""
    b1, b2 = group_bounds(n_latent)
    coarse, middle = tuple(range(b1)), tuple(range(b1, b2))
    if name == "code":
        return LayerSplit(n_latent, from_key=coarse, trainable=middle, name=name)
    if name == "readme":
        return LayerSplit(n_latent, from_key=middle, trainable=middle, name=name)
    raise ValueError(f"unknown split preset {name!r}; expected one of {PRESETS}")


def resolve_split(spec: str | LayerSplit, n_latent: int) -> LayerSplit:
    """A preset name or an explicit split, checked against the generator's depth."""
    if isinstance(spec, LayerSplit):
        if spec.n_latent != n_latent:
            raise ValueError(f"split is for {spec.n_latent} layers, generator has {n_latent}")
        return spec
    return preset_split(spec, n_latent)


def _index(layers: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(layers, dtype=torch.long, device=device)


def mix(w_real: torch.Tensor, w_key: torch.Tensor, split: LayerSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard layer swap. w_real, w_key (B, L, D) -> (w_mixed (B, L, D), trainable start (B, T, D)), T = #trainable.

    No interpolation: each layer is copied from exactly one source. The returned tensors are fresh (no grad).
    """
    if w_real.shape != w_key.shape or w_real.dim() != 3 or w_real.shape[1] != split.n_latent:
        raise ValueError("w_real and w_key must both be (B, n_latent, w_dim) for the split's n_latent")
    mixed = w_real.detach().clone()
    if split.from_key:
        idx = _index(split.from_key, w_real.device)
        mixed[:, idx] = w_key.detach()[:, idx]
    trainable = mixed[:, _index(split.trainable, w_real.device)].clone()
    return mixed, trainable


def assemble(w_mixed: torch.Tensor, w_train: torch.Tensor, split: LayerSplit) -> torch.Tensor:
    """Put the trainable layers (B, T, D) back into the mixed code (B, L, D); differentiable w.r.t. ``w_train``."""
    return torch.index_copy(w_mixed, 1, _index(split.trainable, w_mixed.device), w_train.to(w_mixed.dtype))
