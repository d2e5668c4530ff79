"""The independent evaluator on real photos from ../shared (skipped without it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from worker.evaluation.evaluator import ARCFACE_TEMPLATE_112, Evaluator, load_rgb


@pytest.fixture(scope="module")
def evaluator(shared_dir: Path) -> Evaluator:
    model_dir = shared_dir / "models" / "eval"
    if not (model_dir / "mobilefacenet-arcface-128d.onnx").is_file():
        pytest.skip(f"evaluation models not found in {model_dir}")
    return Evaluator(model_dir)


def _lfw(shared_dir: Path, person: str, number: int) -> np.ndarray:
    return load_rgb(shared_dir / "data" / "lfw-dev" / person / f"{person}_{number:04d}.jpg")


def test_same_person_scores_higher_than_different_person(evaluator: Evaluator, smoke_faces: dict[str, Path]):
    emb = {name: evaluator.embed(load_rgb(path)) for name, path in smoke_faces.items()}
    assert all(e is not None and e.shape == (128,) for e in emb.values())
    assert all(abs(np.linalg.norm(e) - 1.0) < 1e-4 for e in emb.values())
    mated = [evaluator.score(emb["obama"], emb[o]) for o in ("obama2", "obama3")]
    non_mated = [evaluator.score(emb[o], emb["biden"]) for o in ("obama", "obama2", "obama3")]
    assert min(mated) > max(non_mated) + 0.2
    assert min(mated) > 0.5


def test_lfw_mated_pairs_beat_non_mated_pairs(evaluator: Evaluator, shared_dir: Path):
    rows = (shared_dir / "data" / "lfw-dev-pairs.tsv").read_text().splitlines()[1:]
    mated, non_mated = [], []
    for row in rows[:40] + rows[300:340]:  # fold 0: first 300 rows mated, next 300 non-mated
        _, is_mated, left, right = row.split("\t")
        a = evaluator.embed(load_rgb(shared_dir / "data" / "lfw-dev" / left))
        b = evaluator.embed(load_rgb(shared_dir / "data" / "lfw-dev" / right))
        assert a is not None and b is not None
        (mated if is_mated == "1" else non_mated).append(evaluator.score(a, b))
    assert len(mated) == 40 and len(non_mated) == 40
    assert np.median(mated) > np.median(non_mated) + 0.3
    assert np.mean(np.array(mated)[:, None] > np.array(non_mated)[None, :]) > 0.95


def test_small_tight_crop_is_still_detected(evaluator: Evaluator, shared_dir: Path):
    import cv2

    full = _lfw(shared_dir, "AJ_Cook", 1)
    small = np.ascontiguousarray(cv2.resize(full[60:190, 60:190], (64, 64), interpolation=cv2.INTER_AREA))
    det = evaluator.detect(small)
    assert det is not None
    assert det.landmarks[0, 0] < det.landmarks[1, 0]  # subject's right eye is on the image's left
    assert evaluator.score(evaluator.embed(full), evaluator.embed(small)) > 0.6


def test_alignment_puts_landmarks_on_the_template(evaluator: Evaluator, smoke_faces: dict[str, Path]):
    img = load_rgb(smoke_faces["obama"])
    det = evaluator.detect(img)
    crop = evaluator.align(img, det.landmarks)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    again = evaluator.detect(np.ascontiguousarray(crop))
    assert again is not None
    assert np.abs(again.landmarks - ARCFACE_TEMPLATE_112).max() < 10.0  # a mirrored or swapped fit is off by ~35 px


def test_no_face_is_a_miss_not_an_error(evaluator: Evaluator):
    blank = np.full((128, 128, 3), 127, dtype=np.uint8)
    assert evaluator.embed(blank) is None
    emb, found = evaluator.embed_many([blank, blank])
    assert not found.any() and np.isnan(emb).all()


def test_rejects_non_rgb_uint8(evaluator: Evaluator):
    with pytest.raises(ValueError):
        evaluator.embed(np.zeros((64, 64), dtype=np.uint8))


def test_fallback_alignment_from_a_known_crop_convention(evaluator: Evaluator, shared_dir: Path):
    from worker.models.alignment import template
    from worker.models.dlib_face import prepare_face

    unit = np.asarray(template("dlib-chip"), dtype=np.float32)
    chip = prepare_face(_lfw(shared_dir, "Aaron_Eckhart", 1), 64, "dlib-chip")
    detected = evaluator.embed(chip)
    by_template = evaluator.embed_aligned(evaluator.align(chip, unit * 64)[None])[0]
    assert detected is not None
    assert evaluator.score(detected, by_template) > 0.8  # same points, same order as YuNet's
    blank = np.full((64, 64, 3), 127, dtype=np.uint8)
    emb, found = evaluator.embed_with_fallback([chip, blank], unit)
    assert found.tolist() == [True, False]
    assert np.isfinite(emb).all()
    assert evaluator.score(emb[0], detected) > 0.999
