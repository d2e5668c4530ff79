"""The shipped keymap bundle in float32 as deployed: a subject's images, embeddings and template are bit-identical
whether it runs alone or in one call with 1 or 7 batch mates (cross-job micro-batching puts unrelated subjects in
one engine call). Also that the check can fail: the former batched computation moved the same subject's images by
whole grey levels.

Needs ../shared (faces), the installed gan-face-generate package and the committed bundle; skips otherwise."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[3]
BUNDLE = REPO / "worker" / "bundles" / "keymap"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gan_face_generate") is None or not (BUNDLE / "manifest.json").is_file(),
    reason="gan-face-generate not installed (scripts/bootstrap.sh installs it with --no-deps) or no keymap bundle",
)


@pytest.fixture(scope="module")
def engine_and_subjects(smoke_faces):
    from worker.algorithm.factory import build_engine
    from worker.bundle_config import deployed_config
    from worker.evaluation.evaluator import load_rgb
    from worker.models.bundle import load_bundle

    torch.set_num_threads(1)
    engine = build_engine(load_bundle(BUNDLE), deployed_config(BUNDLE, None, None), "cpu")
    assert engine.dtype == torch.float32
    faces = [engine.prepare(load_rgb(smoke_faces[n])) for n in ("obama", "biden", "obama2", "obama3")]
    # 8 subjects: the subject under test (one photo) and 7 mates (other photos, other keys, one with two photos)
    subjects = [(faces[0][None], bytes([1]) * 32), (torch.stack(faces[1:3]), bytes([2]) * 32)]
    subjects += [(faces[i % 4][None], bytes([3 + i]) * 32) for i in range(1, 7)]
    return engine, subjects


@pytest.mark.parametrize("mates", [1, 7])
def test_subject_alone_equals_subject_with_batch_mates(engine_and_subjects, mates: int) -> None:
    engine, subjects = engine_and_subjects
    alone = engine(subjects[:1])[0]
    together = engine(subjects[: 1 + mates])
    assert len(together) == 1 + mates
    assert torch.equal(together[0].images, alone.images)  # max pixel difference 0
    assert torch.equal(together[0].embeddings, alone.embeddings)
    assert torch.equal(together[0].template, alone.template)
    # the mate with two photos: each photo's output equals that photo run alone under the same key
    two_alone = engine([(subjects[1][0][1:], subjects[1][1])])[0]
    assert torch.equal(together[1].images[1:], two_alone.images)


def test_the_former_batched_computation_is_caught(engine_and_subjects) -> None:
    """Running the same steps on a batch of 8 at once (shared kernels) moves the subject's output: the exact
    comparison above would fail on it."""
    engine, subjects = engine_and_subjects
    faces = torch.cat([f for f, _ in subjects])
    seeds = [s for f, s in subjects for _ in range(len(f))]
    z0, t = engine.start_latents(faces, seeds)
    z = engine.refine(z0, t)
    with torch.no_grad():
        batched = engine.generator(z).float().clamp(-1, 1)[:1]
        emb = F.normalize(engine.identity.embed(batched, engine.generator.alignment).float(), dim=-1)
    alone = engine(subjects[:1])[0]
    assert not torch.equal(batched, alone.images)
    assert float((emb[0] - alone.embeddings[0]).abs().max()) > 0
