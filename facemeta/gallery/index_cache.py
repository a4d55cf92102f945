"""A gallery's FAISS index kept as the cache of its records: loaded from the stamped file and checked
against the database, brought up to date by id, rebuilt when its kind needs it, saved atomically.

The database is the source of truth (records.py); the index file is a cache of it, written at close
and at most every ``save_interval`` seconds (index_file.py). Embedding ids are never reused, so an
index that lags the database is brought up to date by id on open: missing ids are added from the
stored vectors and stale ones removed. An index file that is not this database's (damaged, foreign,
stale, another dimension or model) is refused with a one-line GalleryError pointing to ``facemeta
gallery repair``; repair sets it aside and rebuilds from the database, recomputing the digest.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import faiss
import numpy as np

from facemeta.errors import GalleryError
from facemeta.gallery import index_file
from facemeta.gallery.faiss_index import (
    BuiltIndex,
    IndexSpec,
    add_vectors,
    build_index,
    empty_index,
    live_ids,
    needs_rebuild,
    remove_ids,
    search_vectors,
    set_search_params,
    stored_vectors,
    to_gpu,
)
from facemeta.gallery.index_base import IndexBase
from facemeta.gallery.ranking import IdMap
from facemeta.gallery.records import Records
from facemeta.gallery.schema import hex_digest

SQ8_TOLERANCE = 0.02  # largest per-component error of an 8-bit code that check() accepts as the same vector


class IndexCache(IndexBase):
    """The FAISS backend of one open gallery: the index (``built``, None until loaded) and what keeping
    it needs beyond IndexBase: the index file's path (its generation is ``saved_generation``) and a GPU
    copy."""

    name = "faiss"

    def __init__(self, records: Records, path: Path, writable: bool, save_interval: float,
                 use_gpu: bool | None) -> None:
        super().__init__(records, writable, save_interval)
        self.path = path
        self.use_gpu = use_gpu
        self.built: BuiltIndex | None = None  # None until loaded (see Gallery.open(load_index=False))
        self.gpu: faiss.Index | None = None

    # ------------------------------------------------------------------ loading

    def repair_hint(self, problem: str) -> GalleryError:
        """The error for an index file that cannot serve (remembered for ``status``)."""
        self.error = problem
        return GalleryError(f"{problem}; the database is intact: `facemeta gallery repair "
                            f"{shlex.quote(str(self.path.parent))}` rebuilds the index from it")

    def header_problem(self, header: dict, generation: int, digests: dict[int, str]) -> str | None:
        """Why the index file with this header is not the cache of this database at ``generation``
        (None when it is): ``index_file.header_problem`` with this gallery's dimension, model and id."""
        r = self.records
        return index_file.header_problem(self.path, header, dim=r.dim, fingerprint=r.fingerprint,
                                         gallery_id=r.gallery_id, generation=generation, digests=digests)

    def load(self, repair: bool) -> None:
        """Load the index file, check that it is this database's (index_file.py), and bring it up to
        date; with ``repair`` set the file aside and rebuild from the database instead."""
        if self.writable:
            index_file.remove_temp_files(self.path)
        present = os.path.lexists(self.path)
        built, header, problem = None, None, None
        if present:
            try:
                built, header = index_file.load_index(self.path)
            except GalleryError as exc:
                problem = str(exc)
                if not repair:
                    raise self.repair_hint(problem) from None
        # The database is read after the file, so it is at least as new as the file's generation.
        gen, eids, idents, digests = self.records.state(None if header is None else int(header["generation"]))
        self.records.generation, self.ids = gen, IdMap(eids, idents)
        if self.writable:
            self.records.digest = int(digests[gen], 16)  # Records.upgrade made sure it is recorded
        if header is not None:
            problem = self.header_problem(header, gen, digests)
        legacy = problem == f"{self.path} {index_file.UNBOUND}"
        if repair:
            if present:
                aside = index_file.set_aside(self.path, damaged=problem is not None and not legacy)
                self.repaired = {"aside": str(aside), "problem": problem, "digest_fixed": False}
            built = None
        elif problem and legacy and self.writable:
            built = None  # an index from before binding existed: the upgraded writer rebuilds it
        elif problem:
            raise self.repair_hint(problem)
        if built is not None and (built.spec.kind != self.spec.kind or built.spec.m != self.spec.m
                                  or built.spec.nlist != self.spec.nlist):
            built = None  # settings changed: rebuild
        if built is None:
            self.rebuild(fix_digest=repair)
            changed = True
        else:
            changed = self._reconcile(built, int(header["generation"]), eids)
        self.error = None
        if self.writable and needs_rebuild(self.built):
            self.rebuild()
            changed = True
        if self.writable and changed:
            self.save()

    def _reconcile(self, built: BuiltIndex, saved_generation: int, eids: np.ndarray) -> bool:
        """Adopt a loaded index that is this database's cache and bring it up to date by id: ids the
        database no longer holds are removed, missing ones added from the stored vectors. True when
        the index changed."""
        built.spec = self.spec  # search-time knobs follow the database
        set_search_params(built, self.spec)
        self.built = built
        self.saved_generation = saved_generation
        present_ids = live_ids(built)
        extra = np.setdiff1d(present_ids, eids, assume_unique=True)
        missing = np.setdiff1d(eids, present_ids, assume_unique=True)
        changed = False
        if len(extra):
            remove_ids(built, extra)
            changed = True
        if len(missing):
            add_vectors(built, self.records.fetch_vectors(missing), missing)
            changed = True
        if built.count != len(eids):
            self.rebuild()  # should not happen; the database wins
            changed = True
        return changed

    def ensure(self) -> BuiltIndex:
        """The loaded index (loading and checking it now if the gallery was opened without it)."""
        if self.built is None:
            self.load(repair=False)
        return self.built

    def catch_up(self) -> bool:
        """A reader: apply a writer's committed changes to the id map (and the index, when loaded) by id;
        True when the database had moved on."""
        if self.records.current_generation() == self.records.generation:
            return False
        gen, eids, idents, _ = self.records.state()
        if self.built is not None:
            present = self.ids.eids
            extra = np.setdiff1d(present, eids, assume_unique=True)
            missing = np.setdiff1d(eids, present, assume_unique=True)
            remove_ids(self.built, extra)
            if len(missing):
                add_vectors(self.built, self.records.fetch_vectors(missing), missing)
        self.ids = IdMap(eids, idents)
        self.records.generation = gen
        return True

    # ------------------------------------------------------------------ changing and saving

    def create_empty(self) -> None:
        """A new gallery's empty index, saved."""
        self.built = empty_index(self.spec, self.records.dim)
        self.save()

    def rebuild(self, spec: IndexSpec | None = None, fix_digest: bool = False) -> None:
        """Build the index from the database (``fix_digest``: see IndexBase.rows_for_rebuild)."""
        ids, vecs = self.rows_for_rebuild(fix_digest)
        self.built = build_index(spec or self.spec, self.records.dim, vecs, ids)
        self.drop_caches()

    def add(self, vectors: np.ndarray, eids: np.ndarray, idents: np.ndarray) -> None:
        """Add committed embeddings (unit vectors) of the given identities to the index and the id map."""
        add_vectors(self.built, vectors, eids)
        self.ids.add(eids, idents)

    def remove(self, eids: list[int]) -> None:
        """Drop removed embeddings from the index and the id map."""
        remove_ids(self.built, eids)
        self.ids.remove(np.array(eids, np.int64))

    def save(self) -> None:
        """Write the index file now, stamped with the gallery's id, generation and digest."""
        r = self.records
        index_file.save_index(self.built, self.path, r.generation, r.fingerprint,
                              gallery=r.gallery_id, digest=hex_digest(r.digest))
        self.mark_saved()

    def save_now(self) -> None:
        """Save now, first rebuilding when the index kind needs it (HNSW tombstones, IVF growth)."""
        if needs_rebuild(self.built):
            self.rebuild()
        self.save()

    def after_change(self) -> None:
        """After a committed change: rebuild when the index kind needs it, then IndexBase.after_change."""
        if needs_rebuild(self.built):
            self.rebuild()
        super().after_change()

    def drop_caches(self) -> None:
        """Forget the GPU copy and the cached identity vectors (they no longer match)."""
        self.gpu = None
        super().drop_caches()

    # ------------------------------------------------------------------ searching and checking

    def gpu_index(self) -> faiss.Index | None:
        """The GPU copy of the index to search (None: search on the CPU); made on first use."""
        if self.use_gpu is False:
            return None
        if self.gpu is None:
            self.gpu = to_gpu(self.built)
            if self.gpu is None and self.use_gpu:
                raise GalleryError("GPU search was asked for but FAISS has no GPU here")
        return self.gpu

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k stored embeddings per query (ranking.SearchFn), on the GPU copy when there is one."""
        return search_vectors(self.built, queries, k, self.gpu_index())

    def held_count(self) -> int:
        """Live vectors in the loaded index."""
        return self.built.count

    def describe(self, status: str) -> dict:
        """What ``Gallery.info`` reports about this backend (whose ``status()`` is ``status``): kind built,
        lists, file size, GPU."""
        built, header = self.built, {}
        if built is None and status == "ok":
            header = index_file.read_index_header(self.path)
        return {"backend": self.name,
                "index_built": built.kind if built is not None else header.get("kind"),
                "index_settings": json.loads(self.spec.to_json()),
                "nlist": (built.nlist if built is not None else header.get("nlist")) or None,
                "gpu": self.gpu is not None,
                "index_bytes": os.lstat(self.path).st_size if os.path.lexists(self.path) else 0}

    def status(self) -> str:
        """"ok", or why the index cannot serve searches ("needs repair: ..."). An index not loaded yet
        is judged by its file without loading it: length, checksum, and the header's binding to this
        database, dimension and model."""
        hint = f"; `facemeta gallery repair {shlex.quote(str(self.path.parent))}` rebuilds it from the database"
        if self.built is not None:
            return "ok"
        if self.error:
            return f"needs repair: {self.error}{hint}"
        if not os.path.lexists(self.path):
            return "missing (it is rebuilt from the database when the gallery is opened)"
        try:
            header = index_file.read_index_header(self.path, verify=True)
            gen, digests = self.records.generation_digests(int(header["generation"]))
            problem = self.header_problem(header, gen, digests)
        except GalleryError as exc:
            problem = str(exc)
        return "ok" if problem is None else f"needs repair: {problem}{hint}"

    def matches(self, eids: np.ndarray) -> bool:
        """Whether the loaded index holds exactly the database's ids ``eids``, each with the database's
        vector (8-bit codes within SQ8_TOLERANCE)."""
        built = self.built
        if not np.array_equal(live_ids(built), np.sort(eids)):
            return False
        for ids, held in stored_vectors(built, eids):
            stored = self.records.fetch_vectors(ids)
            if built.kind == "ivf_sq8":
                if len(ids) and float(np.abs(held - stored).max()) > SQ8_TOLERANCE:
                    return False
            elif not np.array_equal(held, stored):
                return False
        return True
