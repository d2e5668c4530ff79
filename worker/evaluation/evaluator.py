"""The independent judge: YuNet detection, 5-point similarity alignment, MobileFaceNet ONNX embeddings.

This recognizer takes no part in making cancelable faces (the engine's identity loss uses dlib / ArcFace); it only
scores results, the way the paper judges with other systems. Models live outside the repo (``../shared/models/eval``
by default, or ``CANCELABLE_EVAL_MODELS``); nothing here ships weights.

Pipeline per image (RGB uint8 (H, W, 3)):
1. YuNet (``cv2.FaceDetectorYN``) on the BGR image. Small images (generator outputs, e.g. 64 px dlib-chip crops)
   are upscaled so the short side is at least ``min_side`` and, if nothing is found, padded with a reflected border
   (tight crops leave YuNet no context) and tried again. The highest-scoring face is kept.
2. A similarity transform (``cv2.estimateAffinePartial2D``) maps YuNet's 5 landmarks (right eye, left eye, nose,
   right and left mouth corner; "right" is the subject's right, i.e. the image's left) onto the ArcFace 112x112
   template, and the image is warped to (112, 112).
3. MobileFaceNet: input (N, 3, 112, 112) RGB, (x - 127.5) / 128; the embedding of the image and of its horizontal
   flip are summed and L2-normalised -> (128,). Scores are cosines.

A face YuNet cannot find is a failure to acquire: :meth:`Evaluator.embed` returns ``None`` and callers count it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)
RECOGNIZER_FILE = "mobilefacenet-arcface-128d.onnx"
DETECTOR_FILE = "yunet_n_dynamic.onnx"


def default_model_dir() -> Path | None:
    """``$CANCELABLE_EVAL_MODELS``, else ``<repo>/../shared/models/eval`` when it exists, else None."""
    env = os.environ.get("CANCELABLE_EVAL_MODELS")
    if env:
        return Path(env)
    candidate = Path(__file__).resolve().parents[3] / "shared" / "models" / "eval"
    return candidate if candidate.is_dir() else None


@dataclass(frozen=True)
class Detection:
    """One face: box (x, y, w, h), landmarks (5, 2) in image pixels, detector score."""

    box: np.ndarray
    landmarks: np.ndarray
    score: float


class Evaluator:
    """Independent face recognizer. Not thread-safe (cv2 detector state); make one per process.

    ``model_dir`` holds ``mobilefacenet-arcface-128d.onnx`` and ``yunet_n_dynamic.onnx``.
    """

    embedding_dim = 128

    def __init__(
        self,
        model_dir: str | Path | None = None,
        score_threshold: float = 0.6,
        min_side: int = 160,
        threads: int = 1,
    ):
        import cv2
        import onnxruntime as ort

        model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        if model_dir is None or not (model_dir / RECOGNIZER_FILE).is_file():
            raise FileNotFoundError(
                f"evaluation models not found (looked in {model_dir}); pass --eval-models or set CANCELABLE_EVAL_MODELS"
            )
        self.model_dir = model_dir
        self.min_side = min_side
        self._cv2 = cv2
        self._detector = cv2.FaceDetectorYN.create(
            str(model_dir / DETECTOR_FILE), "", (320, 320), score_threshold, 0.3, 5000
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            str(model_dir / RECOGNIZER_FILE), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name

    # --- detection ------------------------------------------------------------------------------------------------
    def _detect_raw(self, bgr: np.ndarray) -> list[Detection]:
        h, w = bgr.shape[:2]
        self._detector.setInputSize((w, h))
        _, faces = self._detector.detect(bgr)
        if faces is None:
            return []
        return [Detection(f[0:4].copy(), f[4:14].reshape(5, 2).copy(), float(f[14])) for f in faces]

    def detect(self, image_rgb: np.ndarray) -> Detection | None:
        """RGB uint8 (H, W, 3) -> the highest-scoring face in original pixel coordinates, or None."""
        cv2 = self._cv2
        _check_image(image_rgb)
        bgr = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
        scale = max(1.0, self.min_side / min(bgr.shape[:2]))
        if scale > 1.0:
            bgr = cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        pad = 0
        found = self._detect_raw(bgr)
        if not found:
            pad = int(round(0.25 * max(bgr.shape[:2])))
            padded = cv2.copyMakeBorder(bgr, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
            found = self._detect_raw(padded)
            if not found:
                return None
        best = max(found, key=lambda d: d.score)
        box = best.box.copy()
        box[:2] = (box[:2] - pad) / scale
        box[2:] = box[2:] / scale
        return Detection(box, (best.landmarks - pad) / scale, best.score)

    # --- alignment and embedding ----------------------------------------------------------------------------------
    def align(self, image_rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """RGB uint8 (H, W, 3) + landmarks (5, 2) -> aligned RGB uint8 (112, 112, 3)."""
        cv2 = self._cv2
        matrix, _ = cv2.estimateAffinePartial2D(landmarks.astype(np.float32), ARCFACE_TEMPLATE_112, method=cv2.LMEDS)
        if matrix is None:
            raise ValueError("could not fit a similarity transform to the landmarks")
        return cv2.warpAffine(image_rgb, matrix, (112, 112), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    def embed_aligned(self, crops: np.ndarray, batch: int = 32) -> np.ndarray:
        """Aligned RGB uint8 (N, 112, 112, 3) -> L2-normalised embeddings (N, 128), image + flip summed.

        Runs ``batch`` crops at a time (activations of a few thousand crops at once would take many GB).
        """
        parts = []
        for start in range(0, crops.shape[0], batch):
            x = (crops[start : start + batch].astype(np.float32) - 127.5) / 128.0
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
            both = np.ascontiguousarray(np.concatenate([x, x[:, :, :, ::-1]], axis=0))
            out = self._session.run(None, {self._input: both})[0]
            n = x.shape[0]
            parts.append(out[:n] + out[n:])
        emb = np.concatenate(parts) if parts else np.zeros((0, self.embedding_dim), np.float32)
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

    def aligned_face(self, image_rgb: np.ndarray) -> np.ndarray | None:
        """RGB uint8 (H, W, 3) -> aligned (112, 112, 3) crop, or None when no face is found."""
        det = self.detect(image_rgb)
        if det is None:
            return None
        return self.align(image_rgb, det.landmarks)

    def embed(self, image_rgb: np.ndarray) -> np.ndarray | None:
        """RGB uint8 (H, W, 3) -> embedding (128,) float32, or None (failure to acquire)."""
        crop = self.aligned_face(image_rgb)
        if crop is None:
            return None
        return self.embed_aligned(crop[None])[0]

    def embed_many(self, images: list[np.ndarray], batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """List of RGB uint8 images -> (embeddings (N, 128) with NaN rows for misses, found mask (N,) bool)."""
        out = np.full((len(images), self.embedding_dim), np.nan, dtype=np.float32)
        found = np.zeros(len(images), dtype=bool)
        crops: list[np.ndarray] = []
        index: list[int] = []
        for i, img in enumerate(images):
            crop = self.aligned_face(img)
            if crop is not None:
                crops.append(crop)
                index.append(i)
        for start in range(0, len(crops), batch):
            part = np.stack(crops[start : start + batch])
            out[index[start : start + batch]] = self.embed_aligned(part, batch)
        found[index] = True
        return out, found

    def embed_with_fallback(
        self, images: list[np.ndarray], unit_landmarks: np.ndarray, batch: int = 32
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like ``embed_many``, but a face YuNet misses is aligned from known landmark positions instead.

        For images whose crop convention is known (generator outputs): ``unit_landmarks`` (5, 2) are the 5 points in
        unit coordinates of the square image (``pixel = unit * side``), in YuNet's order. Returns (embeddings (N, 128),
        detected (N,) bool): rows with ``detected`` False used the fallback. An attacker who knows the convention
        can do the same, so this is the conservative choice for protection measurements.
        """
        out, found = self.embed_many(images, batch)
        missed = np.flatnonzero(~found)
        if missed.size:
            crops = []
            for i in missed:
                img = images[i]
                side = np.array([img.shape[1], img.shape[0]], dtype=np.float32)
                crops.append(self.align(img, unit_landmarks.astype(np.float32) * side))
            out[missed] = self.embed_aligned(np.stack(crops), batch)
        return out, found

    @staticmethod
    def score(a: np.ndarray, b: np.ndarray) -> float:
        """Cosine of two embeddings (128,)."""
        return float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError("expected an RGB uint8 array (H, W, 3)")


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
