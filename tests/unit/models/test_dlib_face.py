"""Detection, landmarks and aligned crops with dlib (worker.models.dlib_face)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from worker.errors import InvalidImageError, InvalidTensorError, MultipleFacesError, NoFaceError
from worker.models import alignment, dlib_face


def _load(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def lfw(shared_dir: Path) -> list[np.ndarray]:
    """First image of every 250th LFW-dev identity (21 images)."""
    people = sorted(p for p in (shared_dir / "data" / "lfw-dev").iterdir() if p.is_dir())
    return [_load(sorted(p.glob("*.jpg"))[0]) for p in people[::250]]


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ([[0, 0, 0]], InvalidTensorError),
        (np.zeros((64, 64, 3), np.float32), InvalidTensorError),
        (np.zeros((64, 64), np.uint8), InvalidTensorError),
        (np.zeros((64, 64, 4), np.uint8), InvalidTensorError),
        (np.zeros((3, 64, 64), np.uint8), InvalidTensorError),
        (np.zeros((8, 64, 3), np.uint8), InvalidImageError),
    ],
)
def test_bad_arrays_are_rejected(bad, error):
    with pytest.raises(error):
        dlib_face.detect_faces(bad)
    with pytest.raises(error):
        dlib_face.prepare_face(bad, 112)


def test_no_face():
    blank = np.full((200, 300, 3), 127, np.uint8)
    assert dlib_face.detect_faces(blank) == []
    with pytest.raises(NoFaceError):
        dlib_face.prepare_face(blank, 150)


def test_unknown_convention_fails_before_detection():
    with pytest.raises(ValueError, match="unknown alignment convention"):
        dlib_face.prepare_face(np.zeros((64, 64, 3), np.uint8), 112, convention="vggface")


def test_smoke_faces_detect_one_face_each_and_chip_is_dlibs(smoke_faces):
    import dlib

    detector = dlib.get_frontal_face_detector()
    sp5 = dlib.shape_predictor(str(dlib_face._model_path("shape_predictor_5_face_landmarks.dat")))
    for name, path in smoke_faces.items():
        rgb = _load(path)
        faces = dlib_face.detect_faces(rgb)
        assert len(faces) == 1, name
        face = faces[0]
        left, top, right, bottom = face.box
        assert face.score > 0 and right - left > 80
        assert np.all((face.landmarks >= [left - 5, top - 5]) & (face.landmarks <= [right + 5, bottom + 5]))
        chip = dlib_face.face_chip(rgb, face, size=150)
        assert chip.shape == (150, 150, 3) and chip.dtype == np.uint8
        # the same as plain dlib when dlib itself finds the face at full resolution
        if max(rgb.shape[:2]) <= dlib_face.DETECT_MAX_SIDE:
            rects = detector(rgb, 0 if max(rgb.shape[:2]) > dlib_face.UPSAMPLE_BELOW_SIDE else 1)
            assert len(rects) == 1
            ref = np.asarray(dlib.get_face_chip(rgb, sp5(rgb, rects[0]), size=150, padding=0.25))
            np.testing.assert_array_equal(chip, ref)
        out = dlib_face.prepare_face(rgb, 150)
        np.testing.assert_array_equal(out, chip)


def test_two_similar_faces_raise_and_a_small_background_face_is_ignored(lfw):
    a, b = lfw[0], lfw[4]
    with pytest.raises(MultipleFacesError):
        dlib_face.prepare_face(np.concatenate([a, b], axis=1), 112, "arcface-112")
    small = cv2.resize(b, None, fx=0.4, fy=0.4, interpolation=cv2.INTER_AREA)
    canvas = np.full((250, 250 + small.shape[1], 3), 128, np.uint8)
    canvas[:, :250] = a
    canvas[: small.shape[0], 250:] = small
    faces = dlib_face.detect_faces(canvas)
    assert len(faces) == 2
    assert dlib_face.select_face(faces, canvas.shape[:2]) is faces[0]
    np.testing.assert_array_equal(dlib_face.prepare_face(canvas, 150), dlib_face.face_chip(canvas, faces[0]))


def test_a_central_face_beside_a_smaller_background_face_is_the_subject(lfw):
    """The case the area-only rule refused: a background face with more than 25 % of the subject's area (here about
    40 %) no longer blocks a large central face; it only does when it is comparable."""
    a, b = lfw[0], lfw[4]
    side = cv2.resize(b, None, fx=0.65, fy=0.65, interpolation=cv2.INTER_AREA)
    canvas = np.full((250, 250 + 2 * side.shape[1], 3), 128, np.uint8)
    x0 = side.shape[1]
    canvas[:, x0 : x0 + 250] = a  # the subject in the middle
    canvas[: side.shape[0], x0 + 250 :] = side  # a smaller face at the edge
    faces = dlib_face.detect_faces(canvas)
    assert len(faces) == 2 and faces[1].area >= 0.25 * faces[0].area  # the old rule's "competing face"
    chosen = dlib_face.select_face(faces, canvas.shape[:2])
    left, _, right, _ = chosen.box
    assert x0 <= left and right <= x0 + 250  # the central face was chosen
    np.testing.assert_array_equal(dlib_face.prepare_face(canvas, 150), dlib_face.face_chip(canvas, chosen))


def _face(cx: float, cy: float, side: float) -> dlib_face.DetectedFace:
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    return dlib_face.DetectedFace(box=box, score=1.0, landmarks=np.zeros((5, 2)))


@pytest.mark.parametrize(
    ("others", "expect_subject"),
    [
        ([], True),  # one face
        ([(60, 60, 40)], True),  # a small face in a corner
        ([(300, 200, 70)], True),  # 70 % of the side, at the edge: clearly dominated
        ([(200, 200, 100)], False),  # the same size and as central: comparable
        ([(320, 200, 95)], False),  # nearly the same size, half-way to the edge: still comparable
        ([(200, 200, 60)], True),  # exactly central but much smaller: the larger face next to it dominates
        ([(200, 200, 80)], False),  # exactly central and 80 % of the side: comparable
    ],
)
def test_selection_rule_refuses_only_comparable_faces(others, expect_subject):
    """Image 400 x 400; the candidate subject: side 100, centred at (180, 200) (near the middle)."""
    subject = _face(180, 200, 100)
    faces = [subject, *(_face(*o) for o in others)]
    if expect_subject:
        assert dlib_face.select_face(faces, (400, 400)) is subject
    else:
        with pytest.raises(MultipleFacesError, match="none of them is clearly the subject"):
            dlib_face.select_face(faces, (400, 400))
    with pytest.raises(NoFaceError):
        dlib_face.select_face([], (400, 400))


def test_a_larger_face_off_centre_does_not_win_over_a_central_one():
    """Prominence, not area alone: a slightly larger face near the border loses to a central one of similar size
    when the central one clearly dominates, and is refused when they are comparable; never silently chosen."""
    central, big_edge = _face(200, 200, 100), _face(370, 370, 110)
    assert dlib_face.select_face([big_edge, central], (400, 400)) is central
    close = _face(290, 200, 105)
    with pytest.raises(MultipleFacesError):
        dlib_face.select_face([close, central], (400, 400))


@pytest.mark.parametrize(("convention", "size"), [("ffhq", 256), ("dlib-chip", 200), ("arcface-112", 224)])
def test_aligned_crops_put_the_landmarks_on_the_template(lfw, convention, size):
    """Re-detect the 68 landmarks inside each aligned crop: their common points sit on the convention's template.

    Precisely: where the similarity from the dlib-chip template puts them (ArcFace's template has slightly different
    proportions than dlib's landmarks, a least-squares residual of up to 0.018 unit; dlib-chip and ffhq: < 0.001).
    """
    m = alignment.convention_matrix("dlib-chip", convention, 1.0, 1.0)
    expected = alignment.template("dlib-chip") @ m[:, :2].T + m[:, 2]
    assert np.abs(expected - alignment.template(convention)).max() < 0.02
    errors, found_pts = [], []
    for rgb in lfw:
        crop = dlib_face.prepare_face(rgb, size, convention)
        assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
        found = dlib_face.detect_faces(crop)
        if not found:  # tight crops (arcface) can cut the face below what HOG detects
            continue
        pts = dlib_face.points_from_68(dlib_face.landmarks_68(crop, found[0])) / size
        errors.append(np.abs(pts - expected).max(axis=1).mean())
        found_pts.append(pts)
    assert len(errors) >= 12
    # a per-face spread of a few percent is expected (the template is a mean face: faces differ in proportions,
    # and dlib aligns on eye corners and the nose base only) ...
    assert np.median(errors) < 0.04
    # ... but on average the points sit on the template
    assert np.abs(np.mean(found_pts, axis=0) - expected).max() < 0.025  # nose x varies most (head yaw)


def test_stored_templates_reproduce_from_measurement(shared_dir):
    # every 50th identity, its last photo (another photo than the measurement used, where the person has several)
    people = sorted(p for p in (shared_dir / "data" / "lfw-dev").iterdir() if p.is_dir())[::50]
    images = [_load(sorted(p.glob("*.jpg"))[-1]) for p in people]
    measured = dlib_face.measure_templates(images)
    assert int(measured["n"]) >= 100
    for name in ("dlib-chip", "ffhq"):
        np.testing.assert_allclose(measured[name], alignment.template(name), atol=0.012)


def test_large_images_are_detected_on_a_downscaled_copy(smoke_faces):
    rgb = _load(smoke_faces["obama"])
    big = cv2.resize(rgb, None, fx=2.0, fy=2.0, interpolation=cv2.INTER_CUBIC)
    assert max(big.shape[:2]) > dlib_face.DETECT_MAX_SIDE
    (face,) = dlib_face.detect_faces(rgb)
    (face_big,) = dlib_face.detect_faces(big)
    # same face, landmarks refined at full resolution (within a few pixels of 2x the small image's)
    assert np.abs(face_big.landmarks - 2 * face.landmarks).max() < 12


def test_image_to_chip_matrix_is_dlibs_chip_geometry(lfw):
    # warping with our matrix reproduces dlib's chip (LFW faces need no downscaling, so both are plain bilinear);
    # what is left is rounding: dlib rounds its bilinear result differently from OpenCV's fixed-point sampler
    for rgb in lfw[:5]:
        face = dlib_face.detect_faces(rgb)[0]
        m = dlib_face.image_to_chip_matrix(face, 150)
        ours = cv2.warpAffine(rgb, m, (150, 150), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        ref = dlib_face.face_chip(rgb, face, 150)
        diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))[10:-10, 10:-10]
        assert diff.mean() < 0.7 and np.percentile(diff, 99) <= 1


def test_prepare_face_from_many_threads_equals_one_thread(lfw: list[np.ndarray], monkeypatch) -> None:
    """The threads pool aligns several jobs' photos at once: same crops (or the same errors) as one by one."""
    from concurrent.futures import ThreadPoolExecutor

    pool4 = dlib_face.DetectorPool(4)  # four detections at once whatever this machine's CPU count
    monkeypatch.setattr(dlib_face, "DETECTORS", pool4)
    images = lfw[:8]

    def one(rgb: np.ndarray) -> np.ndarray | str:
        try:
            return dlib_face.prepare_face(rgb, 64, "dlib-chip")
        except (NoFaceError, MultipleFacesError) as e:
            return type(e).__name__

    alone = [one(im) for im in images]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            together = list(pool.map(one, images * 2))
            for a, b in zip(alone * 2, together, strict=True):
                assert type(a) is type(b)
                if isinstance(a, np.ndarray):
                    assert np.array_equal(a, b)
                else:
                    assert a == b
    assert 1 <= pool4.created <= 4


def test_detector_pool_lends_each_detector_to_one_thread_and_creates_at_most_limit() -> None:
    from concurrent.futures import ThreadPoolExecutor

    pool = dlib_face.DetectorPool(3)
    lock = threading.Lock()
    holders: dict[int, int] = {}  # id(detector) -> threads holding it now
    peak = {"at_once": 0, "same_detector": 0}

    def use(_: int) -> None:
        with pool.detector() as det:
            with lock:
                holders[id(det)] = holders.get(id(det), 0) + 1
                peak["at_once"] = max(peak["at_once"], sum(holders.values()))
                peak["same_detector"] = max(peak["same_detector"], holders[id(det)])
            time.sleep(0.01)
            with lock:
                holders[id(det)] -= 1

    with ThreadPoolExecutor(16) as ex:
        list(ex.map(use, range(64)))
    assert peak["same_detector"] == 1 and peak["at_once"] <= 3
    assert 1 <= pool.created <= 3  # 16 threads, 64 detections: never more detectors than the limit


def test_detector_pool_fill_creates_the_limit_up_front_and_detection_then_creates_none() -> None:
    pool = dlib_face.DetectorPool(2)
    pool.fill()
    pool.fill()  # idempotent
    assert pool.created == 2
    with pool.detector() as a, pool.detector() as b:
        assert a is not b
    assert pool.created == 2
