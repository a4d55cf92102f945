"""Pair protocols: every pair of a labelled set, or a pair list (LFW / MFR2 pairs.txt) mapped onto rows.

Scores of many pairs are computed from the Gram matrix when it fits in memory (2,452 YaleB images give
3.0 M pairs from a 24 MB matrix), else in chunks, never by gathering [pairs, E] at once.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facemeta.data.manifest import ManifestRow

# Extra columns that may hold the raw image a row was aligned from (alignment keeps extras).
SOURCE_KEYS = ("source", "source_path", "src", "src_path", "original", "orig_path", "raw_path")


def all_pairs(identities: Sequence[str] | np.ndarray, max_pairs: int = 50_000_000
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every unordered pair (i < j) of labelled rows -> (idx_a, idx_b, same).

    Same-identity pairs are positives and all cross-identity pairs negatives. Indices are int32 to
    halve memory; more than `max_pairs` pairs (LFW's 13k images would give 87 M) is refused.
    """
    ids = np.asarray(identities)
    n = ids.size
    total = n * (n - 1) // 2
    if total == 0:
        raise ValueError("all_pairs needs at least two rows")
    if total > max_pairs:
        raise ValueError(f"{n} rows give {total:,} pairs, above max_pairs={max_pairs:,}; "
                         "use a pair list or a subset")
    _, codes = np.unique(ids, return_inverse=True)
    ia, ib = np.triu_indices(n, k=1)
    ia, ib = ia.astype(np.int32), ib.astype(np.int32)
    return ia, ib, codes[ia] == codes[ib]


def pair_scores(emb: np.ndarray, ia: np.ndarray, ib: np.ndarray, chunk: int = 8192,
                gram_limit_bytes: int = 512 << 20) -> np.ndarray:
    """Cosine similarity (dot product of unit vectors) of each pair -> float32 [P]."""
    e = np.asarray(emb, dtype=np.float32)
    ia, ib = np.asarray(ia), np.asarray(ib)
    if e.shape[0] * e.shape[0] * 4 <= gram_limit_bytes:
        return (e @ e.T)[ia, ib].astype(np.float32, copy=False)
    out = np.empty(ia.size, dtype=np.float32)
    for i in range(0, ia.size, chunk):
        a, b = e[ia[i:i + chunk]], e[ib[i:i + chunk]]
        out[i:i + chunk] = np.einsum("ij,ij->i", a, b)
    return out


@dataclass
class PairMatch:
    """A pair list mapped onto rows: indices, labels, folds, and the pairs that could not be mapped."""

    ia: np.ndarray
    ib: np.ndarray
    same: np.ndarray
    fold: np.ndarray
    missing: list[tuple[str, str]]


def _norm(path: str | os.PathLike) -> str:
    return os.path.normcase(os.path.abspath(os.path.normpath(str(path))))


def _row_index(rows: Sequence[ManifestRow]) -> tuple[dict[str, int], dict[str, int]]:
    """Lookups path -> row and unique file stem -> row (stems shared by rows are left out)."""
    by_path: dict[str, int] = {}
    by_stem: dict[str, int] = {}
    ambiguous: set[str] = set()
    for i, row in enumerate(rows):
        paths = [row.path] + [row.extra[k] for k in SOURCE_KEYS if row.extra.get(k)]
        for p in paths:
            by_path.setdefault(_norm(p), i)
            by_path.setdefault(str(p), i)
            stem = f"{row.identity}/{Path(p).stem}"
            if stem in by_stem and by_stem[stem] != i:
                ambiguous.add(stem)
            by_stem.setdefault(stem, i)
            bare = Path(p).stem
            if bare in by_stem and by_stem[bare] != i:
                ambiguous.add(bare)
            by_stem.setdefault(bare, i)
    for key in ambiguous:
        by_stem.pop(key, None)
    return by_path, by_stem


def match_pairs(rows: Sequence[ManifestRow], pairs: Sequence) -> PairMatch:
    """Map pairs (objects with a, b, same, fold; e.g. facemeta.data.sets.Pair) onto row indices.

    A pair path matches a row's path, a source-path extra (the raw image an aligned row came from),
    or, failing that, a file stem that only one row has (aligned copies keep the raw image's stem,
    e.g. Aaron_Peirsol_0001). Pairs with an image absent from the rows (failed alignment) are listed
    in `missing`, not silently scored.
    """
    by_path, by_stem = _row_index(rows)

    def find(p: str) -> int | None:
        for key in (str(p), _norm(p)):
            if key in by_path:
                return by_path[key]
        path = Path(p)
        for key in (f"{path.parent.name}/{path.stem}", path.stem):
            if key in by_stem:
                return by_stem[key]
        return None

    ia, ib, same, fold, missing = [], [], [], [], []
    for pair in pairs:
        a, b = find(pair.a), find(pair.b)
        if a is None or b is None:
            missing.append((str(pair.a), str(pair.b)))
            continue
        ia.append(a)
        ib.append(b)
        same.append(bool(pair.same))
        fold.append(int(getattr(pair, "fold", 0) or 0))
    return PairMatch(np.asarray(ia, dtype=np.int64), np.asarray(ib, dtype=np.int64),
                     np.asarray(same, dtype=bool), np.asarray(fold, dtype=np.int64), missing)


def pair_indices(rows: Sequence[ManifestRow], pairs: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ia, ib, same) of the pairs whose two images are among `rows`; warns with the count of the others."""
    m = match_pairs(rows, pairs)
    if m.missing:
        warnings.warn(f"{len(m.missing)} of {len(pairs)} pairs have an image missing from the rows "
                      f"(e.g. {m.missing[0][0]}); they are left out", stacklevel=2)
    return m.ia, m.ib, m.same
