"""Synthetic source domains: a shared set seen through a fixed kind of nuisance (a "style").

A source spec with ``style: NAME`` (facemeta.train.config.SourceSpec) adds the set once more as its own domain,
``<set>+<style>``, whose every training image goes through the style before the usual augmentation. The same
person keeps one class across the natural and the styled domain, so the margin loss asks for one embedding
under both, and the meta methods see one more domain shift between meta-train and meta-test. Styles are made
from SOURCE sets only (DESIGN.md's protocol: never from a target).

Styles (on an aligned RGB face chip, uint8 in and out; every random choice comes from the generator given):
- ``harsh_light``: a grey sensor and one strong light from the side: the face is shaded by a smooth ramp from a
  random direction (ambient 2-30% of full light on the dark side), then a random exposure and gamma.
- ``mask``: the lower face covered from between the nose tip and the eyes down to the chin, as by a surgical or
  cloth mask: one flat colour with a soft shading, a curved lower edge, placed from where the chip puts the
  five landmarks (``layout``: eyes, nose tip, mouth corners as fractions of the side; facemeta.align.warp).
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

STYLE_SEP = "+"


def _harsh_light(image: np.ndarray, rng: np.random.Generator, layout: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ambient = rng.uniform(0.02, 0.3)
    sharpness = rng.uniform(2.0, 10.0)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    t = ((xs - w / 2) * np.cos(angle) + (ys - h / 2) * np.sin(angle)) / (w / 2)
    shade = ambient + (1.0 - ambient) / (1.0 + np.exp(-sharpness * t))
    exposure = rng.uniform(0.7, 1.4)
    gamma = rng.uniform(0.8, 1.6)
    out = np.clip(grey * shade * exposure, 0.0, 1.0) ** gamma
    out8 = (out * 255.0 + 0.5).astype(np.uint8)
    return np.repeat(out8[:, :, None], 3, axis=2)


_MASK_COLOURS = np.array([[235, 235, 235], [170, 200, 225], [40, 40, 45], [120, 125, 130], [95, 150, 200],
                          [210, 190, 170]], dtype=np.float32)


def _mask(image: np.ndarray, rng: np.random.Generator, layout: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    pts = np.asarray(layout, dtype=np.float32) * np.float32(w)
    eye_y = float(pts[:2, 1].mean())
    nose_x, nose_y = float(pts[2, 0]), float(pts[2, 1])
    mouth_y = float(pts[3:, 1].mean())
    top = nose_y - rng.uniform(0.0, 0.45) * (nose_y - eye_y)
    half_width = rng.uniform(0.9, 1.15) * (pts[1, 0] - pts[0, 0])
    bottom = min(h - 1.0, mouth_y + rng.uniform(1.3, 2.0) * (mouth_y - nose_y))
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    # an ellipse-like lower edge (the chin) and a gently arched upper edge over the nose
    dx = (xs - nose_x) / half_width
    upper = top + 0.12 * (mouth_y - eye_y) * dx ** 2
    lower = upper + (bottom - top) * np.sqrt(np.clip(1.0 - dx ** 2, 0.0, 1.0))
    inside = (ys >= upper) & (ys <= lower) & (np.abs(dx) <= 1.0)
    colour = _MASK_COLOURS[rng.integers(len(_MASK_COLOURS))] * rng.uniform(0.85, 1.1)
    shading = 1.0 - 0.25 * np.abs(dx) + rng.normal(0.0, 0.02, size=(h, w)).astype(np.float32)
    cloth = np.clip(colour[None, None, :] * shading[:, :, None], 0, 255)
    out = image.astype(np.float32)
    out[inside] = cloth[inside]
    return (out + 0.5).astype(np.uint8)


STYLES: dict[str, Callable[[np.ndarray, np.random.Generator, np.ndarray], np.ndarray]] = {
    "harsh_light": _harsh_light,
    "mask": _mask,
}


def apply_style(name: str, image: np.ndarray, rng: np.random.Generator, layout: np.ndarray) -> np.ndarray:
    """The style `name` applied to an aligned square HxWx3 uint8 RGB face chip whose five landmarks sit at
    `layout` (5x2, fractions of the side: ``facemeta.align.warp.template(size, chip) / size``)."""
    try:
        style = STYLES[name]
    except KeyError:
        raise ValueError(f"unknown style {name!r} (styles: {', '.join(STYLES)})") from None
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"styles take HxWx3 uint8 RGB images, got {image.dtype} {image.shape}")
    if np.shape(layout) != (5, 2):
        raise ValueError(f"layout must be 5x2 landmark fractions, got shape {np.shape(layout)}")
    return style(image, rng, layout)


def domain_name(set_name: str, style: str | None) -> str:
    """The domain of a source spec: its set, or ``<set>+<style>`` for a styled one."""
    return f"{set_name}{STYLE_SEP}{style}" if style else set_name


def source_set(domain: str) -> str:
    """The shared set a domain is made from (``lfw+mask`` -> ``lfw``)."""
    return domain.split(STYLE_SEP, 1)[0]
