"""The objective's terms, and that the batch loss is a sum of independent per-subject losses."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from worker.algorithm.losses import (
    LossWeights,
    anon_loss,
    attr_loss,
    group_mean,
    idp_loss,
    key_loss,
    total_loss,
)


def _unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_anon_loss_abs_and_hinge() -> None:
    e_r = _unit([1, 0], [1, 0], [1, 0])
    e_p = _unit([0, 1], [1, 0], [-1, 1])  # cos 0, 1, -0.707
    torch.testing.assert_close(anon_loss(e_p, e_r), torch.tensor([0.0, 1.0, 0.5**0.5]))
    torch.testing.assert_close(anon_loss(e_p, e_r, hinge=True), torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(anon_loss(e_p, e_r, margin=0.2), torch.tensor([0.2, 0.8, 0.5**0.5 + 0.2]))
    torch.testing.assert_close(anon_loss(e_p, e_r, margin=0.2, hinge=True), torch.tensor([0.0, 0.8, 0.0]))


def test_idp_loss_is_mean_pairwise_distance_within_each_subject() -> None:
    g = torch.Generator().manual_seed(0)
    e = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    groups = torch.tensor([0, 1, 0, 2, 0, 2])
    out = idp_loss(e, groups, 3)
    for s in range(3):
        idx = [i for i in range(6) if groups[i] == s]
        pairs = list(itertools.combinations(idx, 2))
        want = sum(float((e[i] - e[j]).norm()) for i, j in pairs) / len(pairs) if pairs else 0.0
        assert float(out[s]) == pytest.approx(want, abs=1e-6)
    assert float(out[1]) == 0.0  # one image: nothing to tie


def test_idp_loss_ignores_other_subjects() -> None:
    g = torch.Generator().manual_seed(1)
    e = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    groups = torch.tensor([0, 0, 1, 1])
    moved = e.clone()
    moved[2:] = F.normalize(torch.randn(2, 8, generator=g), dim=-1)
    assert float(idp_loss(e, groups, 2)[0]) == float(idp_loss(moved, groups, 2)[0])


def test_idp_loss_has_finite_gradients_for_identical_embeddings() -> None:
    e = _unit([1, 0], [1, 0]).requires_grad_(True)
    idp_loss(e, torch.tensor([0, 0]), 1).sum().backward()
    assert e.grad is not None and torch.isfinite(e.grad).all()


def test_attr_loss_is_token_l1_mean_summed_over_tokens() -> None:
    a = torch.zeros(2, 3, 4)
    b = torch.zeros(2, 3, 4)
    b[0, 0] = 1.0  # token 0 differs by 1 in all 4 channels -> mean 1
    b[0, 2, :2] = 2.0  # token 2: mean of (2, 2, 0, 0) = 1
    torch.testing.assert_close(attr_loss(a, b), torch.tensor([2.0, 0.0]))


def test_key_loss() -> None:
    torch.testing.assert_close(key_loss(_unit([1, 0], [0, 1]), _unit([1, 0], [1, 0])), torch.tensor([0.0, 1.0]))


def test_group_mean() -> None:
    v = torch.tensor([1.0, 2.0, 3.0, 10.0])
    torch.testing.assert_close(group_mean(v, torch.tensor([0, 0, 0, 1]), 2), torch.tensor([2.0, 10.0]))


def _terms(seed: int, n: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (
        F.normalize(torch.randn(n, 8, generator=g), dim=-1),
        F.normalize(torch.randn(n, 8, generator=g), dim=-1),
        torch.randn(n, 5, 3, generator=g),
        torch.randn(n, 5, 3, generator=g),
        F.normalize(torch.randn(n, 8, generator=g), dim=-1),
    )


def test_total_is_the_weighted_sum_of_per_subject_terms() -> None:
    w = LossWeights(anon=10, idp=10, attr=0.15, key=2.0)
    e_p, e_r, tp, tr, t = _terms(2, 3)
    groups = torch.tensor([0, 0, 1])
    terms = total_loss(w, groups, 2, e_p, e_r, tp, tr, t)
    assert terms.attr is not None and terms.key is not None
    want = (
        10 * group_mean(anon_loss(e_p, e_r), groups, 2)
        + 10 * idp_loss(e_p, groups, 2)
        + 0.15 * group_mean(attr_loss(tp, tr), groups, 2)
        + 2.0 * group_mean(key_loss(e_p, t), groups, 2)
    )
    torch.testing.assert_close(terms.per_subject, want)
    torch.testing.assert_close(terms.total, want.sum())
    off = total_loss(LossWeights(key=0.0), groups, 2, e_p, e_r, tp, tr, t)
    assert off.key is None
    assert total_loss(LossWeights(), groups, 2, e_p, e_r).attr is None


def test_gradient_of_a_subject_does_not_depend_on_the_rest_of_the_batch() -> None:
    """The property batching relies on: d(total)/d(subject A's embeddings) is the same alone or in a batch."""
    w = LossWeights(key=1.0)
    a = _terms(3, 3)
    b = _terms(4, 2)

    def grad_of_a(batch: tuple[torch.Tensor, ...], groups: torch.Tensor, n: int) -> torch.Tensor:
        e_p = batch[0].clone().requires_grad_(True)
        total_loss(w, groups, n, e_p, *batch[1:]).total.backward()
        assert e_p.grad is not None
        return e_p.grad[groups == 0]

    alone = grad_of_a(a, torch.tensor([0, 0, 0]), 1)
    joint = tuple(torch.cat([x, y]) for x, y in zip(a, b, strict=True))
    together = grad_of_a(joint, torch.tensor([0, 0, 0, 1, 1]), 2)
    torch.testing.assert_close(together, alone, atol=0, rtol=0)
