"""Crop conventions and differentiable warps (worker.models.alignment)."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest
import torch

from worker.models import alignment

torch.set_num_threads(1)

NAMES = sorted(alignment.TEMPLATES)
PAIRS = [(s, d) for s, d in itertools.permutations(NAMES, 2)]


def _blobs(points_px: np.ndarray, size: int, sigma: float = 1.5) -> torch.Tensor:
    """One image per point, (N, 3, size, size): a Gaussian dot centred on the point (pixel-centre coordinates)."""
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    imgs = [np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)) for x, y in points_px]
    t = torch.tensor(np.stack(imgs), dtype=torch.float32)
    return t[:, None].expand(-1, 3, -1, -1).contiguous()


def _centroids(images: torch.Tensor) -> np.ndarray:
    """Intensity centroids (N, 2) x, y of channel 0 of (N, C, H, W) non-negative images."""
    img = images[:, 0].double().numpy()
    img = np.where(img > 0.05 * img.max(axis=(1, 2), keepdims=True), img, 0.0)
    yy, xx = np.mgrid[: img.shape[1], : img.shape[2]]
    w = img / img.sum(axis=(1, 2), keepdims=True)
    return np.stack([(w * xx).sum(axis=(1, 2)), (w * yy).sum(axis=(1, 2))], axis=1)


def test_templates_are_five_points_in_the_unit_square_in_image_order():
    for name in NAMES:
        t = alignment.template(name)
        assert t.shape == (5, 2)
        assert np.all((t > 0.05) & (t < 0.95))
        assert t[0, 0] < t[2, 0] < t[1, 0]  # eyes either side of the nose
        assert t[3, 0] < t[4, 0] and t[2, 1] < t[3, 1]  # mouth corners below the nose
    np.testing.assert_allclose(alignment.template("arcface-112")[0] * 112, [38.2946, 51.6963])


def test_unknown_convention_is_rejected():
    with pytest.raises(ValueError, match="unknown alignment convention"):
        alignment.template("nope")
    with pytest.raises(ValueError):
        alignment.warp(torch.zeros(1, 3, 8, 8), "nope", "ffhq", 8)


def test_similarity_transform_recovers_a_known_similarity_and_matches_opencv():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, size=(5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -40.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ rot.T + shift
    m = alignment.similarity_transform(src, dst)
    np.testing.assert_allclose(m, np.hstack([rot, shift[:, None]]), atol=1e-9)
    # noisy points: the same least-squares fit as OpenCV's when every point is an inlier (LM-refined)
    noisy = dst + rng.normal(0, 2.0, size=dst.shape)
    ours = alignment.similarity_transform(src, noisy)
    cv, inliers = cv2.estimateAffinePartial2D(src, noisy, method=cv2.RANSAC, ransacReprojThreshold=1e4, refineIters=200)
    assert inliers.all()
    np.testing.assert_allclose(ours, cv, atol=1e-4)


def test_similarity_transform_never_reflects():
    src = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    mirrored = src * [-1.0, 1.0]
    m = alignment.similarity_transform(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0


@pytest.mark.parametrize(("src", "dst"), PAIRS)
def test_warp_lands_source_template_dots_on_destination_points(src, dst):
    in_size, out_size = 128, 112
    pts_in = alignment.template(src) * in_size
    out = alignment.warp(_blobs(pts_in, in_size), src, dst, out_size)
    assert out.shape == (5, 3, out_size, out_size)
    found = _centroids(out)
    # exactly where the similarity puts them
    m = alignment.convention_matrix(src, dst, in_size, out_size)
    expected = pts_in @ m[:, :2].T + m[:, 2]
    assert np.abs(found - expected).max() < 0.5
    # and where the destination template says (the least-squares residual between the templates: dlib-chip and
    # ffhq come from the same landmarks and agree to 0.1 px; ArcFace's template has its own proportions, ~2 px)
    tol = 1.0 if "arcface-112" not in (src, dst) else 2.5
    assert np.abs(found - alignment.template(dst) * out_size).max() < tol


def test_warp_round_trip_is_identity_in_the_centre():
    rng = np.random.default_rng(1)
    # a smooth random image (a real-looking, band-limited signal) so bilinear resampling is near lossless
    small = torch.tensor(rng.uniform(-1, 1, size=(2, 3, 8, 8)), dtype=torch.float32)
    img = torch.nn.functional.interpolate(small, size=(128, 128), mode="bicubic", align_corners=False)
    there = alignment.warp(img, "dlib-chip", "ffhq", 160)
    back = alignment.warp(there, "ffhq", "dlib-chip", 128)
    centre = slice(32, 96)
    err = (back - img)[..., centre, centre].abs()
    assert err.max() < 0.05 and err.mean() < 0.01


def test_same_convention_same_size_is_a_no_op_and_resizing_keeps_points():
    img = torch.rand(1, 3, 64, 64)
    assert alignment.warp(img, "dlib-chip", "dlib-chip", 64) is img
    pts = alignment.template("dlib-chip") * 64
    up = alignment.warp(_blobs(pts, 64, sigma=1.0), "dlib-chip", "dlib-chip", 150)
    assert np.abs(_centroids(up) - alignment.template("dlib-chip") * 150).max() < 0.6


def test_large_downscale_is_antialiased():
    # a 1-pixel checkerboard averages to 0.5 when shrunk 8x; bilinear sampling alone would give 0s and 1s
    board = torch.tensor(np.indices((512, 512)).sum(0) % 2, dtype=torch.float32)[None, None].expand(1, 3, -1, -1)
    out = alignment.warp(board, "ffhq", "ffhq", 64)
    assert (out - 0.5).abs().max() < 0.05


def test_warp_is_differentiable():
    img = torch.rand(2, 3, 64, 64, requires_grad=True)
    out = alignment.warp(img, "ffhq", "arcface-112", 112)
    out.square().sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    assert torch.isfinite(img.grad).all()


def test_warp_keeps_dtype_and_batch_independence():
    img = torch.rand(3, 3, 96, 96, dtype=torch.float64)
    out = alignment.warp(img, "arcface-112", "dlib-chip", 150)
    assert out.dtype == torch.float64 and out.shape == (3, 3, 150, 150)
    single = alignment.warp(img[1:2], "arcface-112", "dlib-chip", 150)
    torch.testing.assert_close(out[1:2], single)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_warp_on_cuda_matches_cpu():
    img = torch.rand(2, 3, 128, 128)
    cpu = alignment.warp(img, "ffhq", "dlib-chip", 150)
    gpu = alignment.warp(img.cuda(), "ffhq", "dlib-chip", 150)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
