"""What every search backend of a gallery shares: the records it caches, the map from embedding ids to
identities, each identity's vectors for mean scoring, and the clock that spaces its saves.

A backend (index_cache.IndexCache for FAISS, milvus_index.MilvusIndex for Milvus) is a *cache* of the
gallery's records (records.py, the source of truth): it holds every stored embedding id with its vector,
is brought up to date by id when it lags, and can always be rebuilt from the database. The Gallery
(store.py) talks to a backend through these methods only:

    create_empty()  load(repair)  read_ids()  ensure()  catch_up()  count  search(queries, k)
    add(vectors, eids, idents)  remove(eids)  after_change()  save()  save_now()  rebuild(spec)
    identity_vectors(ident)  drop_caches()  status()  matches(eids)  describe()  release()  close()
"""

from __future__ import annotations

import logging
import time

import numpy as np

from facemeta.atomic import DiskFullError
from facemeta.gallery.faiss_index import IndexSpec
from facemeta.gallery.ranking import IdMap
from facemeta.gallery.records import Records

log = logging.getLogger("facemeta.gallery")

MEAN_CACHE_LIMIT = 10_000  # identities whose vectors are kept for mean scoring before the cache is dropped


class IndexBase:
    """The part of a backend that does not depend on the search engine. ``records`` carries the gallery's
    dimension, model, id, generation and digest; ``spec`` is the index settings the database holds (set by
    the Gallery)."""

    def __init__(self, records: Records, writable: bool, save_interval: float) -> None:
        self.records = records
        self.writable = writable
        self.save_interval = save_interval
        self.spec: IndexSpec | None = None
        self.ids = IdMap(np.empty(0, np.int64), np.empty(0, np.int64))
        self.mean_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.dirty = False
        self.last_save = time.monotonic()
        self.saved_generation: int | None = None  # generation the backend is known to hold durably (writer)
        self.error: str | None = None  # why the backend could not be loaded, if it could not
        self.repaired: dict | None = None  # what load(repair=True) did with the old index

    @property
    def count(self) -> int:
        """Embeddings the database holds (what a search can find)."""
        return len(self.ids)

    def read_ids(self) -> None:
        """Read the generation and the embedding -> identity map without loading the index."""
        gen, eids, idents, _ = self.records.state()
        self.records.generation, self.ids = gen, IdMap(eids, idents)

    def identity_vectors(self, ident: int) -> tuple[np.ndarray, np.ndarray]:
        """An identity's (embedding ids, vectors) for mean scoring, cached until the next change."""
        hit = self.mean_cache.get(ident)
        if hit is None:
            hit = self.records.identity_vectors(ident)
            if len(self.mean_cache) > MEAN_CACHE_LIMIT:
                self.mean_cache.clear()
            self.mean_cache[ident] = hit
        return hit

    def drop_caches(self) -> None:
        """Forget what no longer matches after a change (cached identity vectors)."""
        self.mean_cache.clear()

    def rows_for_rebuild(self, fix_digest: bool) -> tuple[np.ndarray, np.ndarray]:
        """Every stored (id, vector) to rebuild from; ``fix_digest`` (repair) also stores the digest of the
        rows read when the recorded one differs (and forgets the older recorded digests)."""
        ids, vecs, digest = self.records.all_vectors()
        if fix_digest and digest != self.records.digest:
            self.records.reset_digests(digest)
            if self.repaired is not None:
                self.repaired["digest_fixed"] = True
        return ids, vecs

    def mark_saved(self) -> None:
        """The backend now holds the database's generation durably."""
        self.saved_generation = self.records.generation
        self.dirty = False
        self.last_save = time.monotonic()

    def after_change(self) -> None:
        """After a committed change: drop the caches and save when ``save_interval`` has passed."""
        self.dirty = True
        self.drop_caches()
        if time.monotonic() - self.last_save >= self.save_interval:
            try:
                self.save()
            except DiskFullError as exc:  # the change is committed; the index is a cache, saved at close
                self.last_save = time.monotonic()
                log.warning("facemeta: warning: %s; the change is committed in the gallery database", exc)

    def save(self) -> None:  # pragma: no cover - every backend defines it
        """Make the backend's state durable (the FAISS file; a Milvus flush)."""
        raise NotImplementedError

    def release(self) -> None:
        """Let go of what the backend holds open without saving (a failed open); nothing for a file index."""

    def close(self) -> None:
        """Save what changed (writer)."""
        if self.writable and self.dirty:
            try:
                self.save()
            except DiskFullError as exc:  # the database has every change: the next open catches the index up
                log.warning("facemeta: warning: %s; every change is committed in the gallery database, and the "
                            "next open brings the index up to date", exc)
