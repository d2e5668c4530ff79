"""Batched optimisation == per-subject optimisation (the acceptance criterion), and the Adam/schedule itself.

What "equal" means: in float32 a subject's result moves in its last bits with the size of its batch, because
oneDNN/MKL pick kernels by CPU and problem size (measured: 2.7e-6 on one Intel machine, 2.9e-5 on an AVX-512/AMX
Xeon, 2.6e-5 on AMD EPYC; Adam amplifies the noise where a gradient component is near zero). That is rounding, not
coupling, but a float32 tolerance wide enough for every CPU would also hide a small real coupling. So the
equivalence checks run the engine in its exact mode (``dtype="float64"``), where kernel choice moves results by
~1e-13, and compare at EXACT_ATOL: the float32 outputs then differ by at most one float32 rounding step (<= 1.2e-7
for values in [-1, 1]). A real coupling between subjects (a batch mean, a shared normalisation) moves results by
orders of magnitude more, as ``test_coupling_is_detected`` shows.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import person_faces, tiny_bundle

from worker.algorithm.config import EngineConfig
from worker.algorithm.engine_base import pack_subjects
from worker.algorithm.optimise import AdamSchedule, adam_optimise
from worker.algorithm.pipeline import Engine

SEEDS = [bytes([i + 1]) * 32 for i in range(3)]
EXACT_ATOL = 1e-6


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _subjects() -> list[tuple[torch.Tensor, bytes]]:
    return [(person_faces(3, 0), SEEDS[0]), (person_faces(1, 1), SEEDS[1]), (person_faces(2, 2), SEEDS[2])]


@pytest.mark.parametrize("key_target", [False, True])
def test_many_subjects_in_one_batch_equal_each_subject_alone(key_target: bool) -> None:
    engine = Engine(tiny_bundle(), EngineConfig(key_target=key_target, dtype="float64"))
    subjects = _subjects()
    together = engine(subjects)  # A (3 images), B (1), C (2): one optimisation of 6 images
    for (faces, seed), joint in zip(subjects, together, strict=True):
        alone = engine.enroll(faces, seed)
        assert joint.images.shape == alone.images.shape
        torch.testing.assert_close(joint.images, alone.images, atol=EXACT_ATOL, rtol=0)
        torch.testing.assert_close(joint.embeddings, alone.embeddings, atol=EXACT_ATOL, rtol=0)
        torch.testing.assert_close(joint.template, alone.template, atol=EXACT_ATOL, rtol=0)
    # and the optimisation did something: outputs differ from the un-optimised mix
    unoptimised = Engine(tiny_bundle(), EngineConfig(steps=0, dtype="float64"))(subjects)
    assert (together[0].images - unoptimised[0].images).abs().max() > 1e-3


def test_order_and_chunking_do_not_change_results() -> None:
    subjects = _subjects()
    reference = Engine(tiny_bundle(), EngineConfig(dtype="float64"))(subjects)
    chunked = Engine(tiny_bundle(), EngineConfig(max_batch_images=3, dtype="float64")).enroll_many(subjects[::-1])
    for ref, other in zip(reference, chunked[::-1], strict=True):
        torch.testing.assert_close(other.images, ref.images, atol=EXACT_ATOL, rtol=0)


def test_coupling_is_detected() -> None:
    """The tolerance above is tight enough to catch a loss that couples subjects (a mean over the batch)."""
    engine = Engine(tiny_bundle(), EngineConfig(dtype="float64"))
    subjects = _subjects()
    alone = engine.enroll(*subjects[1])
    original = engine._loss_fn

    def coupled(*args, **kwargs):  # type: ignore[no-untyped-def]
        inner = original(*args, **kwargs)
        return lambda w: inner(w) + 1e-3 * w.mean() ** 2 * len(w)  # a batch statistic: the classic coupling bug

    engine._loss_fn = coupled  # type: ignore[method-assign]
    joint = engine(subjects)[1]
    assert (joint.images - alone.images).abs().max() > 100 * EXACT_ATOL


def test_a_subject_is_never_split_across_chunks() -> None:
    """``enroll_many`` packs whole subjects into batches of at most ``max_batch_images`` images."""
    two = [(torch.zeros(3, 3, 16, 16), SEEDS[0]), (torch.zeros(1, 3, 16, 16), SEEDS[1])]
    assert [[len(f) for f, _ in c] for c in pack_subjects(two, 2)] == [[3], [1]]
    ones = [(torch.zeros(1, 3, 16, 16), s) for s in SEEDS]
    assert [[len(f) for f, _ in c] for c in pack_subjects(ones, 2)] == [[1, 1], [1]]


def test_schedule_milestones() -> None:
    s = AdamSchedule(steps=50, lr=0.01)
    assert s.milestone_steps() == [37, 45]
    assert [s.lr_at(i) for i in (0, 36, 37, 44, 45, 49)] == pytest.approx([0.01, 0.01, 0.008, 0.008, 0.0064, 0.0064])
    assert AdamSchedule(steps=1).milestone_steps() == []  # a milestone at step 0 never fires (as in MultiStepLR)
    with pytest.raises(ValueError):
        AdamSchedule(lr=0.0)


def test_adam_optimise_follows_the_schedule() -> None:
    """The lr actually used at each step is ``lr_at``: with a constant gradient g, Adam moves each step by
    lr_t * m_hat / (sqrt(v_hat) + eps) = lr_t * sign(g) (up to eps), so the path is the sum of the lrs."""
    s = AdamSchedule(steps=50, lr=0.01, eps=1e-12)
    out = adam_optimise(torch.zeros(2, 1, 3, dtype=torch.float64), lambda x: x.sum(), s, record_losses=True)
    expected = -sum(s.lr_at(i) for i in range(50))
    torch.testing.assert_close(out.latents, torch.full((2, 1, 3), expected, dtype=torch.float64), atol=1e-9, rtol=0)
    assert len(out.losses) == 50 and out.losses[-1] < out.losses[0]


def test_adam_per_sample_rows_are_independent() -> None:
    g = torch.Generator().manual_seed(1)
    target = torch.randn(5, 7, generator=g)
    start = torch.randn(5, 7, generator=g)

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        return ((x - target[: len(x)]) ** 4).sum()

    full = adam_optimise(start, loss_fn, AdamSchedule(steps=20)).latents
    first_two = adam_optimise(start[:2], loss_fn, AdamSchedule(steps=20)).latents
    assert torch.equal(full[:2], first_two)
    assert full.dtype == torch.float32


def test_exact_mode_config() -> None:
    assert EngineConfig(dtype="float64").fingerprint() == EngineConfig().fingerprint()  # precision, not algorithm
    with pytest.raises(ValueError):
        EngineConfig(dtype="float16")
