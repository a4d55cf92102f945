"""Similarity warp of a face onto a 5-point template: DESIGN.md's (112x112, scaled for other sizes), or dlib's chip.

Two chips (``chip`` argument): ``arcface``, the template of DESIGN.md used by every model facemeta trains from
scratch, and ``dlib``, the framing of dlib's 150x150 face chip (padding 0.25) that dlib's face encoder, the
prior, was trained on.
"""

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

# Where MTCNN's five points fall in dlib's face chip (get_face_chip_details with padding 0.25), as fractions of
# the chip's side. dlib places its chip by its own 5-point model (eye corners, base of the nose), which MTCNN does
# not give, so the layout was measured: tools/derive_dlib_chip_template.py ran MTCNN and dlib's 5-point predictor
# (in MTCNN's box) on 324 faces of the shared sets (up to 100 per set), mapped MTCNN's points into dlib's chip and
# took the median. dlib's published mean face shape, read with MTCNN's definitions (eye centres, nose tip, mouth
# corners), puts the eyes 7% closer together; warping 60 LFW and MFR2 faces with the measured layout gave chips
# nearer dlib's own (mean absolute pixel difference 17 vs 22).
DLIB_CHIP_LAYOUT = np.array(
    [[0.3164, 0.3100],
     [0.6907, 0.3086],
     [0.5018, 0.5201],
     [0.3384, 0.7030],
     [0.6630, 0.7040]], dtype=np.float32)
CHIPS = ("arcface", "dlib")


def template(size: int = 112, chip: str = "arcface") -> np.ndarray:
    """The 5x2 template for a square output of `size` pixels: TEMPLATE_112 scaled by size/112 (``arcface``),
    or DLIB_CHIP_LAYOUT times size (``dlib``)."""
    if size < 16:
        raise ValueError(f"aligned face size must be at least 16 pixels, not {size}")
    if chip == "arcface":
        return (TEMPLATE_112 * (size / 112.0)).astype(np.float32)
    if chip == "dlib":
        return (DLIB_CHIP_LAYOUT * size).astype(np.float32)
    raise ValueError(f"chip must be one of {', '.join(CHIPS)}, not {chip!r}")


def template_digest(chip: str = "arcface") -> str:
    """First 12 hex digits of the sha256 of a chip's template (at 112 px, float32 bytes): recorded in the
    aligned-face caches and in checkpoints, so that faces or models made with another template are noticed."""
    import hashlib

    return hashlib.sha256(template(112, chip).astype("<f4").tobytes()).hexdigest()[:12]


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


def alignment_matrix(landmarks: np.ndarray, size: int = 112, chip: str = "arcface") -> np.ndarray:
    """The 2x3 similarity that maps five detected landmarks onto the template of `size` (and `chip`)."""
    return estimate_similarity(landmarks, template(size, chip))


def warp_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112, chip: str = "arcface") -> np.ndarray:
    """Warp `image` so its five `landmarks` land on the template: a size x size x 3 uint8 face."""
    matrix = alignment_matrix(landmarks, size, chip)
    img = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
    return cv2.warpAffine(np.ascontiguousarray(img), matrix, (size, size),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def template_crop(image: np.ndarray, size: int = 112, layout: np.ndarray | None = None,
                  chip: str = "arcface") -> np.ndarray:
    """No-landmark fallback for pre-cropped faces: warp as if the points sat at `layout`.

    `layout` gives the five points as fractions of width and height (default PRECROPPED_LAYOUT,
    measured on Extended Yale B); the pipeline passes a better per-identity estimate when it has one.
    """
    h, w = image.shape[:2]
    frac = PRECROPPED_LAYOUT if layout is None else np.asarray(layout, dtype=np.float32)
    return warp_face(image, frac * np.array([w, h], dtype=np.float32), size, chip)
