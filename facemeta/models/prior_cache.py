"""Where a prior's weights, converted from an installed package's file, are kept: the facemeta cache's
``prior/<name>-v<converter version>-<sha of the source file>.safetensors``, converted on first use (never
committed). Shared by the dlib and SFace ports."""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from pathlib import Path


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, remembered per (path, size, modification time): the file is read once per process."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def converted_weights(src: Path, name: str, version: int, convert: Callable[[Path, Path], Path],
                      cache: str | os.PathLike | None = None) -> Path:
    """The cached conversion of a prior's source file `src` (``convert(src, dst)`` writes it when missing)."""
    from facemeta.paths import cache_root

    st = src.stat()
    digest = _sha256(str(src), st.st_size, st.st_mtime_ns)
    dst = cache_root(cache) / "prior" / f"{name}-v{version}-{digest[:16]}.safetensors"
    if not dst.is_file():
        convert(src, dst)
    return dst
