"""Named face-crop conventions and differentiable warps between them.

A convention is a square crop defined by where 5 reference points sit in it, in unit coordinates:
``pixel = unit * side`` with pixel centres on integers (the convention of dlib's chip template and of the ArcFace
112 px template). The common point set, in image order (the subject's right eye is on the image left):

    0 eye centre (image left), 1 eye centre (image right), 2 nose tip, 3 mouth corner (image left),
    4 mouth corner (image right)

Eye centre = mean of the 6 iBUG-68 eye contour points; nose tip = iBUG point 30; mouth corners = points 48, 54.

Conventions:
- "dlib-chip": dlib.get_face_chip with padding 0.25 (any size; the lite generator uses 64 or 128 px, dlib's
  ResNet 150 px).
- "ffhq": the FFHQ alignment (StyleGAN2-FFHQ outputs, e4e inputs).
- "arcface-112": the standard ArcFace 5-point template for 112 x 112, divided by 112.

``warp`` (torch, differentiable, any device) maps a batch from one convention to another with one similarity
transform between the two templates; ``similarity_transform`` is the numpy least-squares fit used on the numpy side.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

POINT_NAMES = ("eye_left", "eye_right", "nose_tip", "mouth_left", "mouth_right")

# ArcFace 112 px template (insightface), (x, y) pixels / 112.
_ARCFACE_112 = (
    np.array(
        [
            [38.2946, 51.6963],
            [73.5318, 51.5014],
            [56.0252, 71.7366],
            [41.5493, 92.3655],
            [70.7299, 92.2041],
        ]
    )
    / 112.0
)

# Measured (worker.models.dlib_face.measure_templates): LFW-dev, first image of every 5th identity in sorted order
# (1,000 images, 995 with a HOG detection); common points from dlib's 68-point predictor mapped into the 150 px
# dlib chip (padding 0.25) that dlib cuts from its 5-point landmarks, divided by 150, averaged. Not symmetric on
# purpose: dlib's own chip template is centred at x = 0.493 (0.490 in pixel centres).
_DLIB_CHIP = np.array(
    [
        [0.3134, 0.3086],
        [0.6676, 0.3084],
        [0.4892, 0.5009],
        [0.3304, 0.6945],
        [0.6536, 0.6947],
    ]
)

# Derived from the FFHQ alignment definition (worker.models.dlib_face.ffhq_unit_points: the square centred at
# eye_avg + 0.1 eye_to_mouth, side max(4 |eye_to_eye|, 3.6 |eye_to_mouth|), oriented by eye_to_eye and
# eye_to_mouth). Its geometry depends on each face's proportions, so the template is the mean over the same
# 995 LFW-dev faces as above. (FFHQ's crop is defined on pixel edges; the 0.5 px difference from the
# pixel-centre convention used here is below 0.002 unit at 256 px and ignored.)
_FFHQ = np.array(
    [
        [0.3790, 0.4735],
        [0.6209, 0.4739],
        [0.4988, 0.6043],
        [0.3898, 0.7364],
        [0.6110, 0.7371],
    ]
)

TEMPLATES: dict[str, np.ndarray] = {"dlib-chip": _DLIB_CHIP, "ffhq": _FFHQ, "arcface-112": _ARCFACE_112}
for _t in TEMPLATES.values():
    _t.setflags(write=False)


def template(name: str) -> np.ndarray:
    """Unit-coordinate template (5, 2) of a convention. Raises ValueError for an unknown name."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown alignment convention {name!r}; known: {sorted(TEMPLATES)}") from None


def similarity_transform(src_pts: np.ndarray, dst_pts: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) taking src_pts to dst_pts.

    src_pts, dst_pts: (N, 2) with N >= 2. Returns the (2, 3) float64 matrix M with dst ~ M @ [x, y, 1]
    (what cv2.estimateAffinePartial2D fits, without its RANSAC; Umeyama's closed form).
    """
    src = np.asarray(src_pts, dtype=np.float64)
    dst = np.asarray(dst_pts, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"need two (N, 2) point sets with N >= 2, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s**2).sum() / len(src)
    if var_s <= 0:
        raise ValueError("source points are all equal")
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rot = u @ np.diag(sign) @ vt
    scale = (sig * sign).sum() / var_s
    a = scale * rot
    return np.hstack([a, (mu_d - a @ mu_s)[:, None]])


def convention_matrix(src: str, dst: str, src_size: float, dst_size: float) -> np.ndarray:
    """(2, 3) similarity taking pixels of a ``src_size`` crop of ``src`` to pixels of a ``dst_size`` crop of ``dst``."""
    return _convention_matrix(src, dst, float(src_size), float(dst_size)).copy()


@functools.lru_cache(maxsize=256)
def _convention_matrix(src: str, dst: str, src_size: float, dst_size: float) -> np.ndarray:
    return similarity_transform(template(src) * src_size, template(dst) * dst_size)


def _invert(m: np.ndarray) -> np.ndarray:
    a_inv = np.linalg.inv(m[:, :2])
    return np.hstack([a_inv, (-a_inv @ m[:, 2])[:, None]])


def warp_affine(images: torch.Tensor, matrix: np.ndarray, out_size: int) -> torch.Tensor:
    """Resample ``images`` (B, C, H, W) with a pixel-coordinate (2, 3) matrix taking input to output pixels.

    Returns (B, C, out_size, out_size): bilinear, border padding, differentiable w.r.t. ``images``. When the
    output is more than 2x smaller than the input, the input is first area-averaged by the integer factor (keeps
    the result from aliasing; plain bilinear sampling would skip pixels).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    b, _, h, w = images.shape
    inv = _invert(np.asarray(matrix, dtype=np.float64))  # output pixel -> input pixel
    # normalised (align_corners=False) output coords -> output pixels -> input pixels -> normalised input coords
    out_from_norm = np.array([[out_size / 2, 0, (out_size - 1) / 2], [0, out_size / 2, (out_size - 1) / 2], [0, 0, 1]])
    norm_from_in = np.array([[2 / w, 0, 1 / w - 1], [0, 2 / h, 1 / h - 1], [0, 0, 1]])
    theta = norm_from_in @ np.vstack([inv, [0, 0, 1]]) @ out_from_norm
    shrink = float(np.sqrt(abs(np.linalg.det(inv[:, :2]))))  # input pixels per output pixel
    factor = int(np.floor(shrink))
    if factor >= 2 and min(h, w) // factor >= 1:
        # Area pooling keeps the image borders where they were, so theta (normalised coords) stays valid.
        images = F.adaptive_avg_pool2d(images, (max(1, round(h / factor)), max(1, round(w / factor))))
    dtype = images.dtype if images.is_floating_point() else torch.float32
    th = torch.as_tensor(theta[:2], dtype=dtype, device=images.device).unsqueeze(0).expand(b, 2, 3)
    grid = F.affine_grid(th, [b, images.shape[1], out_size, out_size], align_corners=False)
    return F.grid_sample(images.to(dtype), grid, mode="bilinear", padding_mode="border", align_corners=False)


def warp(images: torch.Tensor, src: str, dst: str, out_size: int) -> torch.Tensor:
    """Map crops of convention ``src`` (B, C, H, W) to crops of convention ``dst`` (B, C, out_size, out_size).

    Differentiable, device-agnostic; src == dst with H == W == out_size returns ``images`` unchanged.
    Non-square inputs are treated as a square crop stretched to (H, W).
    """
    template(src), template(dst)
    h, w = images.shape[-2:]
    if src == dst and h == w == out_size:
        return images
    m = convention_matrix(src, dst, 1.0, out_size)
    # src unit coords -> src pixels is diag(w, h); fold it into the matrix.
    m = m @ np.array([[1 / w, 0, 0], [0, 1 / h, 0], [0, 0, 1]])
    return warp_affine(images, m, out_size)
