"""Template, Umeyama similarity fit and the warp itself (no detector needed)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from facemeta.align.warp import (
    PRECROPPED_LAYOUT,
    TEMPLATE_112,
    alignment_matrix,
    estimate_similarity,
    template,
    template_crop,
    transform_points,
    warp_face,
)


def test_template_values_and_scaling():
    assert TEMPLATE_112.shape == (5, 2)
    assert np.allclose(TEMPLATE_112[0], (38.2946, 51.6963)) and np.allclose(TEMPLATE_112[4], (70.7299, 92.2041))
    assert np.allclose(template(112), TEMPLATE_112)
    assert np.allclose(template(224), 2 * TEMPLATE_112, atol=1e-4)
    with pytest.raises(ValueError):
        template(8)


def _similarity(angle_deg, scale, tx, ty):
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]])


def test_umeyama_recovers_exact_similarity():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, size=(5, 2))
    true = _similarity(23.0, 0.37, 12.5, -40.0)
    dst = transform_points(src, true)
    assert np.allclose(estimate_similarity(src, dst), true, atol=1e-9)


def test_umeyama_matches_opencv_least_squares_on_noisy_points():
    rng = np.random.default_rng(1)
    src = TEMPLATE_112 * 2.1 + 30
    dst = transform_points(src, _similarity(-8, 0.5, 3, 4)) + rng.normal(0, 1.0, size=(5, 2))
    ours = estimate_similarity(src, dst)
    cv, _ = cv2.estimateAffinePartial2D(src.astype(np.float32), dst.astype(np.float32), method=cv2.LMEDS)
    err_ours = ((transform_points(src, ours) - dst) ** 2).sum()
    err_cv = ((transform_points(src, cv) - dst) ** 2).sum()
    assert err_ours <= err_cv + 1e-9  # least squares is never worse on its own objective
    assert np.abs(ours - cv).max() < 0.2 * np.abs(cv).max()


def test_no_reflection_on_mirrored_points():
    mirrored = TEMPLATE_112 * np.array([-1, 1]) + np.array([112, 0])
    m = estimate_similarity(mirrored, TEMPLATE_112)
    assert np.linalg.det(m[:, :2]) > 0


def test_degenerate_points_rejected():
    with pytest.raises(ValueError):
        estimate_similarity(np.ones((5, 2)), TEMPLATE_112)


@pytest.mark.parametrize("size", [112, 160, 96])
def test_warp_puts_marked_points_on_the_template(size):
    """Draw five dots where a rotated, scaled face would have its landmarks; after the warp their
    centroids sit on the template of the output size."""
    true = _similarity(17, 2.4, 40, 10)
    landmarks = transform_points(TEMPLATE_112, true)
    canvas = np.zeros((420, 380, 3), np.uint8)
    for x, y in landmarks:
        cv2.circle(canvas, (round(x), round(y)), 6, (255, 255, 255), -1)
    face = warp_face(canvas, landmarks, size)
    assert face.shape == (size, size, 3) and face.dtype == np.uint8
    n, labels, stats, centroids = cv2.connectedComponentsWithStats((face[:, :, 0] > 127).astype(np.uint8))
    assert n - 1 == 5
    found = centroids[1:]
    expected = template(size)
    dist = np.linalg.norm(found[:, None, :] - expected[None, :, :], axis=2).min(axis=0)
    assert dist.max() < 1.0


def test_warp_grey_input_and_matrix():
    grey = np.full((100, 90), 77, np.uint8)
    face = warp_face(grey, template(112) * 0.8 + 5, 112)
    assert face.shape == (112, 112, 3)
    m = alignment_matrix(template(112), 112)
    assert np.allclose(m, [[1, 0, 0], [0, 1, 0]], atol=1e-6)


def test_template_crop_uses_layout(data_dir):
    from facemeta.images import load_image

    img = load_image(data_dir / "yaleb" / "yaleB01" / "yaleB01_P00A+000E+00.png")
    assert img.shape == (192, 168, 3)
    default = template_crop(img, 112)
    assert default.shape == (112, 112, 3)
    explicit = warp_face(img, PRECROPPED_LAYOUT * np.array([168, 192]), 112)
    assert np.array_equal(default, explicit)
    assert template_crop(img, 64).shape == (64, 64, 3)
