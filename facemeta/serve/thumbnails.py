"""Aligned-face pictures for the web page: small JPEGs of the face the model saw, and a per-person store.

The store keeps one JPEG per person in ``<gallery>/thumbnails/<identity id>.jpg``, written atomically
(temporary file, fsync, rename). It is keyed by the gallery's identity id, not the name: ids are never
reused and survive a rename, so a rename touches no file and a removed person's picture can never
show up for someone enrolled later. The gallery itself knows nothing of these files.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
from pathlib import Path

import numpy as np

from facemeta.atomic import atomic_write
from facemeta.errors import GalleryError
from facemeta.gallery.files import open_regular

FOLDER = "thumbnails"
SIDE = 112  # pixels of a stored or returned aligned face (the model's chip is resized to this)
QUALITY = 85


def aligned_jpeg(image: np.ndarray, landmarks: np.ndarray, size: int, chip: str, side: int = SIDE) -> bytes:
    """The face at ``landmarks`` of an RGB image, warped as the model sees it (``size``, ``chip``) and
    resized to ``side`` pixels, as JPEG bytes."""

    from facemeta.align.warp import warp_face

    return crop_jpeg(warp_face(image, np.asarray(landmarks, np.float32), size, chip), side)


def crop_jpeg(crop: np.ndarray, side: int = SIDE) -> bytes:
    """An aligned face crop (uint8 RGB, as the model saw it) resized to ``side`` pixels, as JPEG bytes."""
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(crop))
    if im.size != (side, side):
        im = im.resize((side, side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=QUALITY)
    return buf.getvalue()


def preview_jpeg(image: np.ndarray, side: int = 640) -> bytes:
    """An RGB image shrunk to fit ``side`` pixels (never enlarged), as JPEG bytes: what the page draws boxes on
    (the server's decoded, upright image, so boxes and picture always agree, in any format the server reads)."""
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(image))
    im.thumbnail((side, side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=QUALITY)
    return buf.getvalue()


def data_url(jpeg: bytes) -> str:
    """JPEG bytes as a data: URL (for an <img> without a second request)."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


class Thumbnails:
    """One aligned-face JPEG per identity id under ``<gallery>/thumbnails``."""

    def __init__(self, gallery: str | os.PathLike) -> None:
        self.folder = Path(gallery) / FOLDER

    def path(self, identity_id: int) -> Path:
        """Where the picture of an identity id lives."""
        return self.folder / f"{int(identity_id)}.jpg"

    def get(self, identity_id: int) -> bytes | None:
        """The stored JPEG, or None (missing, a link, or unreadable: the page then shows initials)."""
        try:
            with open_regular(self.path(identity_id)) as fh:
                return fh.read(1 << 20)
        except (OSError, GalleryError):
            return None

    def has(self, identity_id: int) -> bool:
        """Whether a picture is stored for an identity id."""
        return self.path(identity_id).is_file()

    def put(self, identity_id: int, jpeg: bytes) -> None:
        """Store a picture atomically (a crash leaves the old one or none, never half a file)."""
        with atomic_write(self.path(identity_id), "wb") as fh:
            fh.write(jpeg)

    def drop(self, identity_id: int) -> None:
        """Delete an identity's picture if there is one."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(identity_id))
