"""Robust image loading: any common format and mode in, RGB uint8 HxWx3 out, one-line errors for bad files.

The one gate for untrusted image bytes: files (load_image) and images packed inside data files
(check_encoded_size, for insightface's .bin and .rec) pass the same header checks and pixel cap.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from facemeta.errors import ImageReadError

DEFAULT_MAX_PIXELS = 40_000_000


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3), upright by its EXIF orientation.

    Grey, grey+alpha, RGBA, palette, CMYK, 16-bit and float images are converted (alpha is
    composited on white, 16-bit is scaled to 8 bit). The pixel count claimed by the header is
    checked *before* decoding, so a file claiming 20000x20000 pixels is refused without
    allocating it. Missing, empty, truncated or non-image files raise ImageReadError.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: file not found")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a folder, not an image")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: empty file")
    with _reading(path, max_pixels):
        with Image.open(path) as im:
            _check_size(im, path, max_pixels)
            im.load()
            return _to_rgb(ImageOps.exif_transpose(im))


def check_encoded_size(data: bytes, what: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) that encoded image bytes claim, read from the header only; ImageReadError when the
    bytes are not an image or claim more than ``max_pixels`` (checked before anyone decodes them)."""
    if not data:
        raise ImageReadError(f"{what}: empty image")
    with _reading(what, max_pixels):
        with Image.open(io.BytesIO(data)) as im:
            _check_size(im, what, max_pixels)
            return im.size


def _check_size(im: Image.Image, what: object, max_pixels: int) -> None:
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageReadError(f"{what}: header gives an empty size {w}x{h}")
    if w * h > max_pixels:
        raise ImageReadError(f"{what}: header claims {w}x{h} pixels, over the limit of {max_pixels:,}; "
                             "refused before decoding")


@contextlib.contextmanager
def _reading(what: object, max_pixels: int) -> Iterator[None]:
    """Turn Pillow's errors while opening and decoding into one-line ImageReadErrors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own check follows
            yield
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard fires in Image.open, from the header alone, for huge claims.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        claim = f"{int(found[1]):,} pixels" if found else "too many pixels"
        raise ImageReadError(f"{what}: header claims {claim}, over the limit of {max_pixels:,}; "
                             "refused before decoding") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{what}: not an image (format not recognised)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "truncated" in msg.lower():
            raise ImageReadError(f"{what}: truncated image file ({msg})") from None
        raise ImageReadError(f"{what}: cannot decode image ({msg})") from None


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Convert a decoded PIL image of any mode to a contiguous RGB uint8 array."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im).astype(np.float64)
        if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 16-bit range 0..65535 -> 0..255
        elif mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    rgb = im.convert("RGB")
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
