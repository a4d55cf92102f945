"""Pair protocols: every pair of a labelled set, or a pair list (LFW / MFR2 pairs.txt) mapped onto rows.

Scores of many pairs are computed from the Gram matrix when it fits in memory (2,452 YaleB images give
3.0 M pairs from a 24 MB matrix), else in chunks, never by gathering [pairs, E] at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from facemeta.data.manifest import ManifestRow
from facemeta.data.matching import SOURCE_KEYS, RowLookup  # noqa: F401  (SOURCE_KEYS: re-exported)


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


def match_pairs(rows: Sequence[ManifestRow], pairs: Sequence) -> PairMatch:
    """Map pairs (objects with a, b, same, fold; e.g. facemeta.data.sets.Pair) onto row indices.

    A pair path matches a row by facemeta.data.matching's rule (its path, a source-path extra, or a file stem
    that only one row has; the same rule chooses the images a pair list needs before alignment). Pairs with an image absent from the rows (failed alignment) are listed
    in `missing`, not silently scored.
    """
    find = RowLookup(rows).find  # the one rule (facemeta.data.matching)

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
