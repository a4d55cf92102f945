"""The one rule that maps an image named by a pair list (LFW / MFR2 ``pairs.txt``, a user's list) onto rows.

A path matches a row's path (as written, or normalised), or a source-path extra of the row (the raw image an
aligned row came from); failing that, ``identity/stem`` or a bare file stem that only one row has (aligned
copies keep the raw image's stem, e.g. Aaron_Peirsol_0001). Choosing which raw images a pair list needs before
alignment (facemeta.align.cache) and scoring the pairs on aligned rows (facemeta.eval.pairs) both use it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from facemeta.data.manifest import ManifestRow

# Extra columns that may hold the raw image a row was aligned from (alignment keeps extras).
SOURCE_KEYS = ("source", "source_path", "src", "src_path", "original", "orig_path", "raw_path")


def _norm(path: str | os.PathLike) -> str:
    return os.path.normcase(os.path.abspath(os.path.normpath(str(path))))


class RowLookup:
    """Index of rows by path, source path and unique stem; :meth:`find` applies the rule of this module."""

    def __init__(self, rows: Sequence[ManifestRow]):
        self.by_path: dict[str, int] = {}
        self.by_stem: dict[str, int] = {}
        ambiguous: set[str] = set()
        for i, row in enumerate(rows):
            paths = [row.path] + [row.extra[k] for k in SOURCE_KEYS if row.extra.get(k)]
            for p in paths:
                self.by_path.setdefault(_norm(p), i)
                self.by_path.setdefault(str(p), i)
                for stem in (f"{row.identity}/{Path(p).stem}", Path(p).stem):
                    if stem in self.by_stem and self.by_stem[stem] != i:
                        ambiguous.add(stem)
                    self.by_stem.setdefault(stem, i)
        for key in ambiguous:  # a stem two rows share names neither
            self.by_stem.pop(key, None)

    def find(self, path: str | os.PathLike) -> int | None:
        """Index of the row `path` names, or None."""
        for key in (str(path), _norm(path)):
            if key in self.by_path:
                return self.by_path[key]
        p = Path(path)
        for key in (f"{p.parent.name}/{p.stem}", p.stem):
            if key in self.by_stem:
                return self.by_stem[key]
        return None


def rows_in_pairs(rows: Sequence[ManifestRow], pairs: Iterable) -> list[ManifestRow]:
    """The rows (in their order) that the pairs (objects with ``a`` and ``b`` paths) name."""
    lookup = RowLookup(rows)
    wanted = {i for pair in pairs for i in (lookup.find(pair.a), lookup.find(pair.b)) if i is not None}
    return [r for i, r in enumerate(rows) if i in wanted]
