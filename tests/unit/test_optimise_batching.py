"""Batched optimisation == per-subject optimisation (the acceptance criterion), and the Adam/schedule itself."""

from __future__ import annotations

import pytest
import torch
from tiny_models import person_faces, tiny_bundle

from worker.algorithm.config import EngineConfig
from worker.algorithm.optimise import AdamSchedule, adam_optimise
from worker.algorithm.pipeline import Engine

SEEDS = [bytes([i + 1]) * 32 for i in range(3)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _subjects() -> list[tuple[torch.Tensor, bytes]]:
    return [(person_faces(3, 0), SEEDS[0]), (person_faces(1, 1), SEEDS[1]), (person_faces(2, 2), SEEDS[2])]


@pytest.mark.parametrize("key_target", [False, True])
def test_many_subjects_in_one_batch_equal_each_subject_alone(key_target: bool) -> None:
    engine = Engine(tiny_bundle(), EngineConfig(key_target=key_target))
    subjects = _subjects()
    together = engine(subjects)  # A (3 images), B (1), C (2): one optimisation of 6 images
    for (faces, seed), joint in zip(subjects, together, strict=True):
        alone = engine.enroll(faces, seed)
        assert joint.images.shape == alone.images.shape
        torch.testing.assert_close(joint.images, alone.images, atol=1e-5, rtol=0)
        torch.testing.assert_close(joint.embeddings, alone.embeddings, atol=1e-5, rtol=0)
        torch.testing.assert_close(joint.template, alone.template, atol=1e-5, rtol=0)
    # and the optimisation did something: outputs differ from the un-optimised mix
    unoptimised = Engine(tiny_bundle(), EngineConfig(steps=0))(subjects)
    assert (together[0].images - unoptimised[0].images).abs().max() > 1e-3


def test_order_and_chunking_do_not_change_results() -> None:
    subjects = _subjects()
    reference = Engine(tiny_bundle(), EngineConfig())(subjects)
    chunked = Engine(tiny_bundle(), EngineConfig(max_batch_images=3)).enroll_many(subjects[::-1])[::-1]
    for ref, other in zip(reference, chunked, strict=True):
        torch.testing.assert_close(other.images, ref.images, atol=1e-5, rtol=0)


def test_a_subject_is_never_split_across_chunks() -> None:
    engine = Engine(tiny_bundle(), EngineConfig(max_batch_images=2))
    chunks = list(engine._chunks([(torch.zeros(3, 3, 16, 16), SEEDS[0]), (torch.zeros(1, 3, 16, 16), SEEDS[1])]))
    assert [[len(f) for f, _ in c] for c in chunks] == [[3], [1]]
    chunks = list(engine._chunks([(torch.zeros(1, 3, 16, 16), s) for s in SEEDS]))
    assert [[len(f) for f, _ in c] for c in chunks] == [[1, 1], [1]]


def test_schedule_milestones() -> None:
    s = AdamSchedule(steps=50, lr=0.01)
    assert [s.lr_at(i) for i in (0, 36, 37, 44, 45, 49)] == pytest.approx([0.01, 0.01, 0.008, 0.008, 0.0064, 0.0064])
    with pytest.raises(ValueError):
        AdamSchedule(lr=0.0)


def test_adam_matches_torch_adam_with_multistep_lr() -> None:
    """An independent implementation of the same update: torch.optim.Adam + MultiStepLR(gamma 0.8)."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(4, 3, 5, generator=g)
    start = torch.randn(4, 3, 5, generator=g)
    scale = torch.rand(4, 3, 5, generator=g) + 0.5

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        return (scale * (x - target) ** 2).sum() + (x**3).sum() * 0.01

    ours = adam_optimise(start, loss_fn, AdamSchedule(steps=40, lr=0.05), record_losses=True)
    x = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[30, 36], gamma=0.8)
    for _ in range(40):
        opt.zero_grad()
        loss_fn(x).backward()
        opt.step()
        sched.step()
    torch.testing.assert_close(ours.latents, x.detach(), atol=1e-5, rtol=1e-5)
    assert len(ours.losses) == 40 and ours.losses[-1] < ours.losses[0]


def test_adam_per_sample_rows_are_independent() -> None:
    g = torch.Generator().manual_seed(1)
    target = torch.randn(5, 7, generator=g)
    start = torch.randn(5, 7, generator=g)

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        return ((x - target[: len(x)]) ** 4).sum()

    full = adam_optimise(start, loss_fn, AdamSchedule(steps=20)).latents
    first_two = adam_optimise(start[:2], loss_fn, AdamSchedule(steps=20)).latents
    assert torch.equal(full[:2], first_two)
