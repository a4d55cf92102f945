"""Similarity warp of a face onto the 5-point template of DESIGN.md (112x112, scaled for other sizes)."""

from __future__ import annotations

import cv2
import numpy as np

# (x, y) of left eye, right eye, nose tip, left and right mouth corners in a 112x112 face (DESIGN.md).
TEMPLATE_112 = np.array(
    [[38.2946, 51.6963],
     [73.5318, 51.5014],
     [56.0252, 71.7366],
     [41.5493, 92.3655],
     [70.7299, 92.2041]], dtype=np.float32)

# Where the five points sit, as fractions of width and height, in a tightly pre-cropped frontal face.
# Median of MTCNN's landmarks over 170 Extended Yale B images (168x192 crops, lit within 60 deg
# azimuth / 45 deg elevation) found by the direct and padded routes;
# used by template_crop when no landmarks can be found and no better per-set estimate is at hand.
PRECROPPED_LAYOUT = np.array(
    [[0.2212, 0.2445],
     [0.7901, 0.2425],
     [0.4987, 0.5048],
     [0.2663, 0.7878],
     [0.7189, 0.7917]], dtype=np.float32)


def template(size: int = 112) -> np.ndarray:
    """The 5x2 template for a square output of `size` pixels (TEMPLATE_112 scaled by size/112)."""
    if size < 16:
        raise ValueError(f"aligned face size must be at least 16 pixels, not {size}")
    return (TEMPLATE_112 * (size / 112.0)).astype(np.float32)


def estimate_similarity(src_pts: np.ndarray, dst_pts: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping src to dst.

    Umeyama's closed form (IEEE TPAMI 1991). Returns the 2x3 matrix for cv2.warpAffine.
    """
    src = np.asarray(src_pts, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst_pts, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"need two matching point sets of at least 2 points, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s_c, d_c = src - mu_s, dst - mu_d
    var_s = (s_c ** 2).sum() / len(src)
    if var_s <= 1e-12:
        raise ValueError("source points are all at one place")
    cov = d_c.T @ s_c / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = (sig * d).sum() / var_s
    matrix = np.zeros((2, 3), dtype=np.float64)
    matrix[:, :2] = scale * rot
    matrix[:, 2] = mu_d - scale * rot @ mu_s
    return matrix


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to (N, 2) points."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts @ np.asarray(matrix)[:, :2].T + np.asarray(matrix)[:, 2]


def alignment_matrix(landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """The 2x3 similarity that maps five detected landmarks onto the template of `size`."""
    return estimate_similarity(landmarks, template(size))


def warp_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp `image` so its five `landmarks` land on the template: a size x size x 3 uint8 face."""
    matrix = alignment_matrix(landmarks, size)
    img = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
    return cv2.warpAffine(np.ascontiguousarray(img), matrix, (size, size),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def template_crop(image: np.ndarray, size: int = 112, layout: np.ndarray | None = None) -> np.ndarray:
    """No-landmark fallback for pre-cropped faces: warp as if the points sat at `layout`.

    `layout` gives the five points as fractions of width and height (default PRECROPPED_LAYOUT,
    measured on Extended Yale B); the pipeline passes a better per-identity estimate when it has one.
    """
    h, w = image.shape[:2]
    frac = PRECROPPED_LAYOUT if layout is None else np.asarray(layout, dtype=np.float32)
    return warp_face(image, frac * np.array([w, h], dtype=np.float32), size)
