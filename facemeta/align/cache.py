"""The aligned-face cache of the shared sets: one folder per set, size and chip, filled by the folder job of
facemeta.align.pipeline on first use and checked (not redone) afterwards."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from facemeta.align.pipeline import align_rows
from facemeta.data.manifest import ManifestRow
from facemeta.data.sets import PRE_CROPPED_SETS


def aligned_dir(name: str, size: int = 112, chip: str = "arcface", cache: str | os.PathLike | None = None) -> Path:
    """The cache folder of a set aligned at `size` onto `chip`: cache_root()/aligned/<name>-<size> for DESIGN.md's
    template, <name>-dlib<size> for dlib's chip (one place that builds this path)."""
    from facemeta.paths import cache_root

    return cache_root(cache) / "aligned" / (f"{name}-{size}" if chip == "arcface" else f"{name}-{chip}{size}")


def aligned_set(name: str, size: int = 112, data: str | os.PathLike | None = None,
                cache: str | os.PathLike | None = None, limit_per_identity: int | None = None,
                workers: int = 2, progress: bool = False, chip: str = "arcface") -> list[ManifestRow]:
    """Aligned faces of a shared set (lfw, yaleb, mfr2, orl), cached in :func:`aligned_dir`.

    The first call aligns (yaleb and orl as pre-cropped sets); later calls only check the files.
    `limit_per_identity` keeps the first k images of each identity (in the set's order).
    """
    from facemeta.data.sets import read_set

    rows = read_set(name, data)
    if limit_per_identity is not None:
        seen: Counter = Counter()
        kept = []
        for r in rows:
            if seen[r.identity] < limit_per_identity:
                seen[r.identity] += 1
                kept.append(r)
        rows = kept
    aligned, _ = align_rows(rows, aligned_dir(name, size, chip, cache), size=size, workers=workers,
                            pre_cropped=name in PRE_CROPPED_SETS, progress=progress, chip=chip)
    return aligned
