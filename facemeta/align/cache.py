"""The aligned-face cache of the shared sets, and the one data preparation that fills it: read a set, keep the
rows a caller asks for (:class:`RowSelection`), align them into the set's cache folder (the folder job of
facemeta.align.pipeline; done on first use, checked afterwards).

Training (facemeta.train.data), evaluation (facemeta.eval.sets) and the benchmark (facemeta.experiments.lodo)
all prepare their faces through :func:`prepare_set`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from facemeta.align.pipeline import align_rows
from facemeta.data.manifest import ManifestRow
from facemeta.data.matching import rows_in_pairs
from facemeta.data.sets import PRE_CROPPED_SETS


def cache_key(name: str, size: int = 112, chip: str = "arcface") -> str:
    """The name of a set's cache folder: what makes two alignments of it different (<name>-<size> for DESIGN.md's
    template, <name>-<chip><size> for another chip). Add a part here when another setting changes the faces."""
    return f"{name}-{size}" if chip == "arcface" else f"{name}-{chip}{size}"


def aligned_dir(name: str, size: int = 112, chip: str = "arcface", cache: str | os.PathLike | None = None) -> Path:
    """The cache folder of a set aligned at `size` onto `chip`: cache_root()/aligned/<cache_key> (one place that
    builds this path)."""
    from facemeta.paths import cache_root

    return cache_root(cache) / "aligned" / cache_key(name, size, chip)


@dataclass(frozen=True)
class RowSelection:
    """Which rows of a set to prepare (every filter optional; applied in this order, before alignment).

    people_folds: LFW ``people.txt`` folds to keep; pairs: only the images these pairs name
    (facemeta.data.matching's rule); min_images: identities with fewer rows are dropped; max_identities: the
    first k identities by name; limit_per_identity: the first k rows of each identity, in the set's order.
    """

    people_folds: tuple[int, ...] | None = None
    pairs: Sequence | None = None
    min_images: int = 1
    max_identities: int | None = None
    limit_per_identity: int | None = None


def group_by_identity(rows: Sequence[ManifestRow]) -> dict[str, list[ManifestRow]]:
    """Rows by identity, in their original order."""
    groups: dict[str, list[ManifestRow]] = defaultdict(list)
    for r in rows:
        groups[r.identity].append(r)
    return groups


def select_rows(rows: Sequence[ManifestRow], selection: RowSelection | None = None) -> list[ManifestRow]:
    """The rows `selection` keeps, in their order (all rows without one)."""
    sel = selection or RowSelection()
    rows = list(rows)
    if sel.people_folds:
        folds = {str(f) for f in sel.people_folds}
        rows = [r for r in rows if r.extra.get("people_fold") in folds]
    if sel.pairs is not None:
        rows = rows_in_pairs(rows, sel.pairs)
    groups = group_by_identity(rows)
    names = sorted(n for n, g in groups.items() if len(g) >= sel.min_images)
    if sel.max_identities is not None:
        names = names[:sel.max_identities]
    keep = set(names)
    seen: dict[str, int] = defaultdict(int)
    out = []
    for r in rows:
        if r.identity in keep and (not sel.limit_per_identity or seen[r.identity] < sel.limit_per_identity):
            seen[r.identity] += 1
            out.append(r)
    return out


def prepare_set(name: str, size: int = 112, chip: str = "arcface", selection: RowSelection | None = None,
                data: str | os.PathLike | None = None, cache: str | os.PathLike | None = None, workers: int = 2,
                progress: bool = False) -> tuple[list[ManifestRow], list[dict]]:
    """Read shared set `name`, keep the rows `selection` asks for, and align them into :func:`aligned_dir`
    (pre-cropped sets with the template-crop fallback). Returns (aligned rows, failure records)."""
    from facemeta.data.sets import read_set

    return align_set_rows(name, select_rows(read_set(name, data), selection), size, chip, cache, workers, progress)


def align_set_rows(name: str, rows: Sequence[ManifestRow], size: int = 112, chip: str = "arcface",
                   cache: str | os.PathLike | None = None, workers: int = 2,
                   progress: bool = False) -> tuple[list[ManifestRow], list[dict]]:
    """Align raw rows of shared set `name` into its cache folder (the set's pre-cropped rule); (aligned, failures)."""
    return align_rows(rows, aligned_dir(name, size, chip, cache), size=size, workers=workers,
                      pre_cropped=name in PRE_CROPPED_SETS, progress=progress, chip=chip)


def aligned_set(name: str, size: int = 112, data: str | os.PathLike | None = None,
                cache: str | os.PathLike | None = None, limit_per_identity: int | None = None,
                workers: int = 2, progress: bool = False, chip: str = "arcface") -> list[ManifestRow]:
    """Aligned faces of a shared set (the first `limit_per_identity` images of each identity, in the set's
    order, when given), through :func:`prepare_set`; the first call aligns, later calls only check the files."""
    aligned, _ = prepare_set(name, size, chip, RowSelection(limit_per_identity=limit_per_identity), data, cache,
                             workers, progress)
    return aligned
