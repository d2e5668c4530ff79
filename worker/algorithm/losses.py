"""The FaceAnonyMixer objective, computed per subject so that a batch of many subjects is a plain sum.

Shapes: B images in a batch, S subjects, ``groups`` (B,) long with values in [0, S) naming each image's subject.
Embeddings (B, D) are L2-normalised; tokens (B, T, C). Losses are computed in float32, or in float64 when the
embeddings are float64 (the engine's ``dtype="float64"`` mode); half-precision inputs are promoted.

Per subject s with images I_s (the reference's loss for one identity optimised alone):

    L_s = w_anon * mean_{i in I_s} L_anon(i) + w_idp * L_idp(I_s) + w_attr * mean_{i in I_s} L_attr(i)
          + w_key * mean_{i in I_s} L_key(i)

and the batch loss is ``sum_s L_s``. A sum (not a mean over the batch) keeps each subject's gradient exactly what
it would be if that subject were optimised alone, whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Accumulation precision: float64 stays float64, anything else becomes float32."""
    return t if t.dtype == torch.float64 else t.float()


@dataclass(frozen=True)
class LossWeights:
    anon: float = 10.0
    idp: float = 10.0
    attr: float = 0.15
    key: float = 0.0  # consistency-over-time term (see keylatent.key_target); 0 disables it
    anon_margin: float = 0.0
    anon_hinge: bool = False  # False: |cos - m| (as coded); True: max(0, cos - m)


def anon_loss(e_p: torch.Tensor, e_r: torch.Tensor, margin: float = 0.0, hinge: bool = False) -> torch.Tensor:
    """Protection term per image: |cos(e_p, e_r) - m| or max(0, cos - m). (B, D), (B, D) -> (B,)."""
    cos = F.cosine_similarity(_acc(e_p), _acc(e_r), dim=-1)
    return torch.relu(cos - margin) if hinge else (cos - margin).abs()


def attr_loss(tok_p: torch.Tensor, tok_r: torch.Tensor) -> torch.Tensor:
    """Attribute term per image: L1 mean over channels of each token, summed over tokens. (B, T, C) x2 -> (B,)."""
    return (_acc(tok_p) - _acc(tok_r)).abs().mean(dim=-1).sum(dim=-1)


def key_loss(e_p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Consistency term per image: 1 - cos(e_p, t) toward the key-seeded target. (B, D) x2 -> (B,)."""
    return 1.0 - F.cosine_similarity(_acc(e_p), _acc(target), dim=-1)


def group_pairs(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs (i, j), i < j, of images of the same subject. groups (B,) -> (P,), (P,) on the same device."""
    g = groups.detach().cpu()
    ii, jj = torch.triu_indices(len(g), len(g), offset=1)
    same = g[ii] == g[jj]
    return ii[same].to(groups.device), jj[same].to(groups.device)


def idp_loss(
    e_p: torch.Tensor,
    groups: torch.Tensor,
    n_groups: int,
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Identity-preservation term per subject: mean pairwise L2 distance of its protected embeddings.

    Acts only within a subject; a subject with one image gets 0. (B, D), (B,) -> (S,). ``pairs`` is
    ``group_pairs(groups)``, precomputed by callers that evaluate the loss many times (saves a device sync).
    """
    e = _acc(e_p)
    ii, jj = pairs if pairs is not None else group_pairs(groups)
    out = torch.zeros(n_groups, dtype=e.dtype, device=e.device)
    if len(ii) == 0:
        return out
    dist = (e[ii] - e[jj]).norm(dim=-1)
    pair_group = groups[ii]
    counts = torch.zeros(n_groups, dtype=e.dtype, device=e.device).index_add_(0, pair_group, torch.ones_like(dist))
    sums = out.index_add(0, pair_group, dist)
    return sums / counts.clamp_min(1.0)


def group_mean(values: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Mean of per-image values within each subject. (B,), (B,) -> (S,)."""
    v = _acc(values)
    sums = torch.zeros(n_groups, dtype=v.dtype, device=v.device).index_add(0, groups, v)
    counts = torch.zeros(n_groups, dtype=v.dtype, device=v.device).index_add(0, groups, torch.ones_like(v))
    return sums / counts.clamp_min(1.0)


@dataclass
class LossTerms:
    """Per-subject terms (S,) each, and the scalar total that is optimised."""

    anon: torch.Tensor
    idp: torch.Tensor
    attr: torch.Tensor | None
    key: torch.Tensor | None
    per_subject: torch.Tensor
    total: torch.Tensor


def total_loss(
    weights: LossWeights,
    groups: torch.Tensor,
    n_groups: int,
    e_p: torch.Tensor,
    e_r: torch.Tensor,
    tok_p: torch.Tensor | None = None,
    tok_r: torch.Tensor | None = None,
    key_target: torch.Tensor | None = None,
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LossTerms:
    """The objective of the module docstring: sum over subjects of each subject's weighted loss."""
    anon = group_mean(anon_loss(e_p, e_r, weights.anon_margin, weights.anon_hinge), groups, n_groups)
    idp = idp_loss(e_p, groups, n_groups, pairs)
    per_subject = weights.anon * anon + weights.idp * idp
    attr = None
    if tok_p is not None and tok_r is not None and weights.attr != 0.0:
        attr = group_mean(attr_loss(tok_p, tok_r), groups, n_groups)
        per_subject = per_subject + weights.attr * attr
    key = None
    if key_target is not None and weights.key != 0.0:
        key = group_mean(key_loss(e_p, key_target), groups, n_groups)
        per_subject = per_subject + weights.key * key
    return LossTerms(anon=anon, idp=idp, attr=attr, key=key, per_subject=per_subject, total=per_subject.sum())
