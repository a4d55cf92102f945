"""Robust image loading: any common format and mode in, RGB uint8 HxWx3 out, one-line errors for bad files."""

from __future__ import annotations

import os
import re
import warnings
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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w <= 0 or h <= 0:
                    raise ImageReadError(f"{path}: header gives an empty size {w}x{h}")
                if w * h > max_pixels:
                    raise ImageReadError(
                        f"{path}: header claims {w}x{h} pixels, over the limit of {max_pixels:,}; refused before decoding")
                im.load()
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard fires in Image.open, from the header alone, for huge claims.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        claim = f"{int(found[1]):,} pixels" if found else "too many pixels"
        raise ImageReadError(f"{path}: header claims {claim}, over the limit of {max_pixels:,}; "
                             "refused before decoding") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not an image (format not recognised)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "truncated" in msg.lower():
            raise ImageReadError(f"{path}: truncated image file ({msg})") from None
        raise ImageReadError(f"{path}: cannot decode image ({msg})") from None


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
