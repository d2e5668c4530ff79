"""The strongest re-inversion attack on the keymap engine family, for the evaluation harness.

``protocols.reinversion_attack`` is built for layer mixing (it swaps W+ layers); a keymap engine has one latent z
and a key map, so its attacker works in the key map's identity coordinates instead. ``protocols`` picks this
attack for a ``KeymapEngine``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from worker.algorithm.keymap import key_rotation

if TYPE_CHECKING:
    from worker.algorithm.keymap_engine import KeymapEngine


def keymap_reinversion_attack(
    engine: KeymapEngine, cancel_images: torch.Tensor, seeds: Sequence[bytes], steps: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cancelable faces (B, 3, 64, 64) in [-1, 1] and their subjects' seeds -> (no_key, key_known), images
    (B, 3, 64, 64) on the CPU.

    - no key: read the cancelable face's identity with the in-loss recognizer and decode it through the key map
      without a key (the engine's ``encoder``): ``G(E(x_c))``.
    - key known: the attacker holds the seed, hence the rotation: the cancelable face's generator coordinates
      ``c_g(x_c)`` (~ the key target) are rotated back, ``Q^T c_g``, which estimates the ORIGINAL identity's
      direction; decode it through the key map without a key, then refine ``steps`` steps toward it (the engine's
      own refinement).
    """
    km = engine.keymap
    x = cancel_images.to(engine.device).float()
    with torch.no_grad():
        e = engine.identity.embed(x, engine.generator.alignment).float()
        zero = torch.zeros(len(x), km.nuisance_dim, device=engine.device)
        no_key = engine.generator(km(km.targets(e, None), zero))
        rots = torch.stack([key_rotation(s, km.k) for s in seeds]).to(engine.device, torch.float64)
        c = km.gen_coords(e).to(torch.float64)
        back = F.normalize((rots.transpose(1, 2) * c[:, None, :]).sum(-1), dim=-1).float()
        z0 = km(back, zero)
    z = engine.refine(z0, back, steps)
    with torch.no_grad():
        key_known = engine.generator(z)
    return no_key.float().clamp(-1, 1).cpu(), key_known.float().clamp(-1, 1).cpu()
