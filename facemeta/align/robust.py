"""Alignment that survives occluded landmarks (issue 25, item 4): which of MTCNN's five points to trust.

Under a scarf or a mask MTCNN still returns two mouth corners, but they are guesses: fitted with the eyes and the
nose they tilt, shrink or shift the chip. dlib places its chip from the eyes and the nose. The rules here keep
the five-point similarity of ``align.warp`` and change only the points it is fitted to:

- ``five``: the points as found (today's alignment).
- ``eyes-nose``: always fit the similarity to the eyes and the nose; the mouth corners are replaced by where that
  fit puts the template's mouth corners, so the five-point least squares returns exactly the three-point fit.
- ``plausible``: fit the eyes and the nose; keep the detected mouth corners only when they lie within
  ``MOUTH_TOLERANCE`` (a share of the template's eye distance) of where that fit expects them, else replace them
  as ``eyes-nose`` does.
"""

from __future__ import annotations

import numpy as np

from facemeta.align.warp import estimate_similarity, template, transform_points

RULES = ("five", "eyes-nose", "plausible")
MOUTH_TOLERANCE = 0.25  # mouth-corner residual, as a share of the template's eye distance, above which they are guesses
EYES_NOSE = (0, 1, 2)


def mouth_residual(landmarks: np.ndarray, chip: str = "arcface") -> float:
    """How far the detected mouth corners lie from where the eyes and nose put them: the larger of the two
    distances in template space, as a share of the template's eye distance."""
    pts = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    ref = template(112, chip).astype(np.float64)
    matrix = estimate_similarity(pts[list(EYES_NOSE)], ref[list(EYES_NOSE)])
    mapped = transform_points(pts[3:], matrix)
    eye = float(np.linalg.norm(ref[1] - ref[0]))
    return float(np.linalg.norm(mapped - ref[3:], axis=1).max() / eye)


def robust_landmarks(landmarks: np.ndarray, rule: str = "plausible", chip: str = "arcface",
                     tolerance: float = MOUTH_TOLERANCE) -> np.ndarray:
    """The five points to fit the alignment to, by `rule` (see the module docstring) -> float32 [5, 2]."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, not {rule!r}")
    pts = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    if not np.isfinite(pts).all():
        raise ValueError("landmarks must be finite")
    if rule == "five" or (rule == "plausible" and mouth_residual(pts, chip) <= tolerance):
        return pts.astype(np.float32)
    ref = template(112, chip).astype(np.float64)
    forward = estimate_similarity(pts[list(EYES_NOSE)], ref[list(EYES_NOSE)])
    inverse = np.linalg.inv(np.vstack([forward, [0.0, 0.0, 1.0]]))[:2]
    out = pts.copy()
    out[3:] = transform_points(ref[3:], inverse)
    return out.astype(np.float32)
