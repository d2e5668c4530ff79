"""Layer splits (presets and their scaling) and the hard layer swap."""

from __future__ import annotations

import pytest
import torch

from worker.algorithm.mix import LayerSplit, assemble, group_bounds, mix, preset_split, resolve_split


def test_presets_on_18_layers_are_the_published_ones() -> None:
    code = preset_split("code", 18)
    assert code.from_key == (0, 1, 2) and code.trainable == (3, 4, 5, 6, 7)
    assert code.from_real == tuple(range(3, 18))
    readme = preset_split("readme", 18)
    assert readme.from_key == (3, 4, 5, 6, 7) and readme.trainable == (3, 4, 5, 6, 7)
    assert readme.from_real == (0, 1, 2, *range(8, 18))
    assert code.describe() == "code n=18: key 0-2 frozen | real 3-7 trainable | real 8-17 frozen"


@pytest.mark.parametrize(("n", "bounds"), [(8, (1, 4)), (3, (1, 2)), (6, (1, 3)), (9, (3, 8)), (10, (3, 8))])
def test_scaling_rule(n: int, bounds: tuple[int, int]) -> None:
    assert group_bounds(n) == bounds


@pytest.mark.parametrize("n", range(3, 30))
def test_every_depth_gets_three_non_empty_groups(n: int) -> None:
    b1, b2 = group_bounds(n)
    assert 0 < b1 < b2 < n
    for name in ("code", "readme"):
        split = preset_split(name, n)
        assert split.n_latent == n and split.trainable == tuple(range(b1, b2))


def test_small_or_unknown_presets_are_rejected() -> None:
    with pytest.raises(ValueError):
        preset_split("code", 2)
    with pytest.raises(ValueError):
        preset_split("other", 18)
    with pytest.raises(ValueError):
        resolve_split(preset_split("code", 18), 8)
    assert resolve_split("readme", 8) == preset_split("readme", 8)


@pytest.mark.parametrize(("key", "train"), [((0, 0), (1,)), ((8,), (1,)), ((1,), ()), ((2, 1), (3,)), ((0,), (-1,))])
def test_invalid_custom_splits_are_rejected(key: tuple[int, ...], train: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        LayerSplit(8, from_key=key, trainable=train)


def _codes(b: int = 2, n: int = 8, d: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    real = torch.arange(b * n * d, dtype=torch.float32).view(b, n, d)
    key = -1.0 - torch.arange(b * n * d, dtype=torch.float32).view(b, n, d)
    return real, key


@pytest.mark.parametrize("name", ["code", "readme"])
def test_mix_copies_each_layer_from_exactly_one_source(name: str) -> None:
    real, key = _codes()
    split = preset_split(name, 8)
    mixed, train = mix(real, key, split)
    for i in range(8):
        src = key if i in split.from_key else real
        assert torch.equal(mixed[:, i], src[:, i])
    assert torch.equal(train, mixed[:, list(split.trainable)])
    assert torch.equal(assemble(mixed, train, split), mixed)


def test_assemble_sends_gradients_only_to_the_trainable_layers() -> None:
    real, key = _codes()
    split = LayerSplit(8, from_key=(0, 5), trainable=(2, 5), name="custom")
    mixed, train = mix(real, key, split)
    train = (train + 1.0).requires_grad_(True)
    out = assemble(mixed, train, split)
    assert torch.equal(out[:, 5], key[:, 5] + 1.0) and torch.equal(out[:, 2], real[:, 2] + 1.0)
    assert torch.equal(out[:, 0], key[:, 0]) and torch.equal(out[:, 7], real[:, 7])
    (out * torch.randn_like(out)).sum().backward()
    assert train.grad is not None and train.grad.abs().sum() > 0
    assert not mixed.requires_grad


def test_mix_checks_shapes() -> None:
    real, key = _codes()
    with pytest.raises(ValueError):
        mix(real, key[:, :7], preset_split("code", 8))
    with pytest.raises(ValueError):
        mix(real, key, preset_split("code", 9))
