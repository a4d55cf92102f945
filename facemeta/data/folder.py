"""Generic reader: a folder tree of images, as identity/... or domain/identity/..."""

from __future__ import annotations

import os
from pathlib import Path

from facemeta.data.manifest import ManifestRow

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".pbm", ".tif", ".tiff", ".webp", ".gif"}


def is_image_name(name: str) -> bool:
    """True when the file name has an image suffix that facemeta reads."""
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def image_folder(root: str | os.PathLike, domain: str | None = None, layout: str = "auto") -> list[ManifestRow]:
    """List the images under `root` as manifest rows (path relative to `root` kept in extra['relpath']).

    layout: ``identity`` (root/identity/img), ``domain`` (root/domain/identity/img), or ``auto``
    (domain layout when any image sits two folders deep). Images directly in `root` get the
    identity ``unknown``. `domain` overrides the domain name (default: the root folder's name).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"not a folder: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and is_image_name(p.name))
    if layout == "auto":
        layout = "domain" if any(len(p.relative_to(root).parts) >= 3 for p in files) else "identity"
    if layout not in ("identity", "domain"):
        raise ValueError(f"layout must be auto, identity or domain, not {layout!r}")
    rows = []
    for p in files:
        parts = p.relative_to(root).parts
        if layout == "domain" and len(parts) >= 3:
            dom, ident = parts[0], parts[1]
        else:
            dom, ident = root.name, (parts[0] if len(parts) >= 2 else "unknown")
        rows.append(ManifestRow(str(p), ident, domain or dom, {"relpath": p.relative_to(root).as_posix()}))
    return rows
