"""From embedding hits to identities: the gallery answers with people, not images.

An identity scores its best-matching embedding (``"best"``) or the mean cosine over all its
embeddings (``"mean"``). The index is searched for more embeddings than identities asked for, and
deeper (4x each round) for the queries whose top k identities the hits do not settle yet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from facemeta.errors import GalleryError

SCORINGS = ("best", "mean")

# One ranked identity: (identity id, score, best-matching embedding id).
Ranked = tuple[int, float, int]
# A backend's embedding search: (queries [n, dim], k) -> (scores [n, k], embedding ids [n, k]; id -1 where
# fewer exist), best first.
SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def check_scoring(scoring: str) -> str:
    """A scoring the gallery knows (one of ``SCORINGS``), else a one-line GalleryError."""
    if scoring not in SCORINGS:
        raise GalleryError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")
    return scoring


@dataclass(frozen=True)
class Match:
    """A search answer: identity name (or UNKNOWN), its score (cosine, best or mean match),
    its database id and best-matching embedding id, whether it passed the threshold, and, for an
    unknown answer, the nearest identity it did not reach."""

    name: str
    score: float
    identity_id: int | None
    embedding_id: int | None
    known: bool = True
    nearest: str | None = None


class IdMap:
    """Embedding id -> identity id as two sorted numpy arrays (compact for 10^6 embeddings)."""

    def __init__(self, eids: np.ndarray, idents: np.ndarray) -> None:
        order = np.argsort(eids, kind="stable")
        self.eids = np.asarray(eids, np.int64)[order]
        self.idents = np.asarray(idents, np.int64)[order]

    def __len__(self) -> int:
        return len(self.eids)

    def lookup(self, eids: np.ndarray) -> np.ndarray:
        """Identity ids of eids (-1 where unknown)."""
        eids = np.asarray(eids, np.int64)
        if not len(self.eids):
            return np.full(eids.shape, -1, np.int64)
        pos = np.clip(np.searchsorted(self.eids, eids), 0, len(self.eids) - 1)
        return np.where(self.eids[pos] == eids, self.idents[pos], -1)

    def add(self, eids: np.ndarray, idents: np.ndarray) -> None:
        """Add pairs (fast path: new ids are larger than all present, as AUTOINCREMENT makes them)."""
        eids, idents = np.asarray(eids, np.int64), np.asarray(idents, np.int64)
        if len(self.eids) and len(eids) and eids.min() <= self.eids[-1]:
            self.__init__(np.concatenate([self.eids, eids]), np.concatenate([self.idents, idents]))
        else:
            self.eids = np.concatenate([self.eids, eids])
            self.idents = np.concatenate([self.idents, idents])

    def remove(self, eids: np.ndarray) -> None:
        """Drop the given embedding ids."""
        keep = ~np.isin(self.eids, np.asarray(eids, np.int64))
        self.eids, self.idents = self.eids[keep], self.idents[keep]


def rank_identities(scores: np.ndarray, ids: np.ndarray, identity_of: dict[int, int], k: int) -> list[Ranked]:
    """Best-match ranking: the first k distinct identities among hits sorted by score.

    Returns (identity_id, score, embedding_id) tuples; an identity's score is its best embedding's.
    """
    out: list[Ranked] = []
    seen: set[int] = set()
    for score, eid in zip(scores.tolist(), ids.tolist(), strict=True):
        if eid < 0:
            continue
        ident = identity_of.get(eid)
        if ident is None or ident in seen:
            continue
        seen.add(ident)
        out.append((ident, float(score), int(eid)))
        if len(out) == k:
            break
    return out


def mean_scores(query: np.ndarray, vectors_by_identity: dict[int, tuple[np.ndarray, np.ndarray]]
                ) -> list[Ranked]:
    """Mean-match scores: each identity's mean cosine over all its embeddings (and its best embedding id)."""
    out = []
    for ident, (eids, vecs) in vectors_by_identity.items():
        sims = vecs @ query
        out.append((ident, float(sims.mean()), int(eids[int(np.argmax(sims))])))
    out.sort(key=lambda t: -t[1])
    return out


def rank_hits(query: np.ndarray, sims: np.ndarray, ids: np.ndarray, k: int, scoring: str, id_map: IdMap,
              identity_vectors: Callable[[int], tuple[np.ndarray, np.ndarray]], exhausted: bool) -> list[Ranked] | None:
    """One query's top k identities from its embedding hits (best first), or None when the hits do not
    settle them yet and the index must be searched deeper (never once ``exhausted``: every embedding
    was searched). ``identity_vectors`` gives an identity's (embedding ids, vectors) for mean scoring."""
    idents = id_map.lookup(ids)
    valid = ids >= 0
    if scoring == "best":
        identity_of = dict(zip(ids[valid].tolist(), idents[valid].tolist(), strict=True))
        ranked = rank_identities(sims[valid], ids[valid], identity_of, k)
        return None if len(ranked) < k and not exhausted else ranked
    cands = {int(i) for i in idents[valid] if i >= 0}
    ranked = mean_scores(query, {c: identity_vectors(c) for c in cands})[:k]
    # Unseen identities score at most the last hit's similarity: exact once the k-th mean beats it
    # (or every embedding was searched).
    last = float(sims[valid][-1]) if valid.any() else -1.0
    if not exhausted and (len(ranked) < k or ranked[-1][1] < last):
        return None
    return ranked


def rank_queries(search: SearchFn, total: int, queries: np.ndarray, k: int, scoring: str, id_map: IdMap,
                 identity_vectors: Callable[[int], tuple[np.ndarray, np.ndarray]]) -> list[list[Ranked]]:
    """Top-k identities for each (unit) query, best first: ``search`` (any backend) is asked for more
    embeddings than k, then 4x deeper for the queries ``rank_hits`` could not settle, until all ``total``
    embeddings were searched."""
    results: list[list[Ranked] | None] = [None] * len(queries)
    todo = np.arange(len(queries))
    kk = min(total, max(4 * k, k + 16))
    while len(todo):
        sims, hits = search(queries[todo], kk)
        again = []
        for row, qi in enumerate(todo):
            ranked = rank_hits(queries[qi], sims[row], hits[row], k, scoring, id_map, identity_vectors,
                               exhausted=kk >= total)
            if ranked is None:
                again.append(qi)
            else:
                results[qi] = ranked
        todo = np.array(again, dtype=np.int64)
        kk = min(total, kk * 4)
    return [r or [] for r in results]


def to_matches(results: list[list[Ranked]], names: dict[int, str], threshold: float | None) -> list[list[Match]]:
    """Ranked identities as Matches (identities without a name are dropped); a score below ``threshold``
    is ``known=False``."""
    return [[Match(names[i], s, i, e, threshold is None or s >= threshold) for i, s, e in res if i in names]
            for res in results]
