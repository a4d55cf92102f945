"""An on-disk face gallery: SQLite holds the records (the source of truth), FAISS the search index;
the Gallery joins them.

Layout of a gallery folder::

    gallery.sqlite   identities, one row per enrolled image (source path, sha256 of the source file's
                     bytes, detector score, model fingerprint, time) with the float32 embedding as a
                     BLOB; meta (format, gallery id, dimension, fingerprint, index settings, scoring,
                     threshold, generation); index_digests (the embeddings digest of recent generations)
    index.faiss      the FAISS index of every embedding id, stamped with the generation, a crc32, and
                     the gallery id and embeddings digest it was saved with
    writer.lock      flock'd by the one writer

The package docstring (``facemeta/gallery/__init__.py``) lists the modules that do each part.

Durability: every change is one SQLite transaction (WAL, synchronous=FULL) that also bumps the
generation (records.py). The index file is a cache of the database, written atomically at close and
at most every ``save_interval`` seconds, and brought up to date by id on open (index_cache.py). A
process killed anywhere therefore loses at most the transaction in flight.

Binding: the index must be the cache of *this* database, not a copy from another gallery or from
another moment of this one: the gallery id, generation and embeddings digest its file carries are
checked on open (index_file.py; records.py keeps the digest). A damaged, foreign or stale index file
makes open raise a one-line GalleryError pointing to ``facemeta gallery repair`` and leaves every file
as it was; ``repair=True`` always rebuilds the index from the database (and recomputes the digest),
keeping the old file beside it. ``check`` compares the index's vectors with the database's.

Readers open the database read-only and take no lock; WAL gives each read a consistent snapshot.
A single writer at a time is enforced by ``writer.lock``. ``Gallery.open(load_index=False)`` reads
the database only (list, info work with a damaged index) and loads the index on the first search.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from facemeta.checks import check_threshold
from facemeta.errors import GalleryError
from facemeta.gallery.backends import DB_NAME, backend_meta, empty_folder, open_backend
from facemeta.gallery.faiss_index import IndexSpec
from facemeta.gallery.files import check_plain_files
from facemeta.gallery.lock import WriterLock
from facemeta.gallery.ranking import Match, check_scoring, rank_queries, to_matches
from facemeta.gallery.records import Change, Identity, Record, Records, fault
from facemeta.gallery.schema import check_sqlite_header, connect, create_database, db_errors
from facemeta.gallery.validate import UNKNOWN, check_name, check_unlike, check_vectors, stored_threshold

LOCK_NAME = "writer.lock"
def _kept_by(part: str, name: str, doc: str) -> property:
    """A Gallery attribute kept by one of its parts (``_records`` or ``_index``), read and written through."""
    return property(lambda self: getattr(getattr(self, part), name),
                    lambda self, value: setattr(getattr(self, part), name, value), doc=doc)


class Gallery:
    """A face gallery folder: enroll, remove, rename, list, and search identities by embedding.

    Open with :meth:`create` or :meth:`open` (``mode="r"`` read-only, ``"w"`` the single writer).
    Not shared between threads without care: calls are serialised by an internal lock.
    """

    format = _kept_by("_records", "format", "Format of the gallery database (records.FORMAT_VERSION once opened by a writer).")
    gallery_id = _kept_by("_records", "gallery_id", "The gallery's random id (None for an old gallery not yet upgraded).")
    dim = _kept_by("_records", "dim", "Dimension of the stored embeddings.")
    fingerprint = _kept_by("_records", "fingerprint", "Fingerprint of the model whose embeddings the gallery holds.")
    generation = _kept_by("_records", "generation", "The database's generation (bumped by every change) as last read.")
    digest = _kept_by("_records", "digest", "The embeddings digest at ``generation`` (writer).")
    spec = _kept_by("_index", "spec", "The index settings the gallery stores.")
    save_interval = _kept_by("_index", "save_interval", "Most seconds between index saves while changing.")
    repaired = _kept_by("_index", "repaired", "What open(repair=True) did with the old index file.")

    def __init__(self, path: Path, conn: sqlite3.Connection, writable: bool, lock: WriterLock | None,
                 save_interval: float, use_gpu: bool | None) -> None:
        self.path = path
        self._conn = conn
        self._records = Records(conn, path / DB_NAME)
        meta = self._records.read_meta()
        self._index = open_backend(self._records, path, meta, writable, save_interval, use_gpu)
        self.backend = self._index.name
        self.writable = writable
        self._lock = lock
        self._mutex = threading.RLock()
        self._closed = False
        self._apply_meta(meta)

    def _apply_meta(self, meta: dict[str, str]) -> None:
        self.format = int(meta["format"])
        self.gallery_id = meta.get("gallery_id") or None
        self.dim = int(meta["dim"])
        self.fingerprint = meta["fingerprint"]
        self.spec = IndexSpec.from_json(meta["index"])
        self.scoring = meta.get("scoring", "best")
        self.threshold = stored_threshold(meta.get("threshold"), self.path / DB_NAME)
        self.generation = int(meta["generation"])
        self.created = float(meta.get("created", 0.0))

    # ------------------------------------------------------------------ opening and closing

    @classmethod
    def create(cls, path: str | os.PathLike, dim: int, fingerprint: str, index: IndexSpec | str = "flat",
               scoring: str = "best", threshold: float | None = None, save_interval: float = 30.0,
               use_gpu: bool | None = None, backend: str = "faiss", milvus_uri: str | None = None) -> Gallery:
        """Create an empty gallery folder for ``dim``-d embeddings of the model ``fingerprint``
        and return it open for writing. The folder must not exist or be empty. ``backend`` is where its
        embeddings are searched: "faiss" (an index file in the folder) or "milvus" (a Milvus Lite file in
        the folder, or the Milvus server at ``milvus_uri``, e.g. http://host:19530)."""
        path = Path(path)
        spec = IndexSpec(kind=index) if isinstance(index, str) else index
        extra = backend_meta(backend, milvus_uri)
        if not isinstance(dim, int | np.integer) or not 1 <= int(dim) <= 65536:
            raise GalleryError(f"embedding dimension must be an integer in 1..65536, got {dim!r}")
        if not fingerprint or not isinstance(fingerprint, str):
            raise GalleryError("a gallery needs the model fingerprint of its embeddings")
        if threshold is not None:
            threshold = check_threshold(threshold)
        check_scoring(scoring)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise GalleryError(f"{path} already exists and is not an empty folder")
        path.mkdir(parents=True, exist_ok=True)
        lock = WriterLock(path / LOCK_NAME)
        lock.acquire(0)
        try:
            conn = create_database(path / DB_NAME, dim=int(dim), fingerprint=fingerprint, index=spec.to_json(),
                                   scoring=scoring, threshold=threshold, extra=extra)
            g = cls(path, conn, True, lock, save_interval, use_gpu)
        except BaseException:
            lock.release()
            raise
        g.digest = 0
        try:
            g._index.create_empty()
        except BaseException:
            g.close()
            empty_folder(path)  # it was empty before: leave no half gallery (e.g. Milvus unreachable)
            raise
        return g

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r", lock_timeout: float = 10.0, repair: bool = False,
             save_interval: float = 30.0, use_gpu: bool | None = None, load_index: bool = True) -> Gallery:
        """Open an existing gallery read-only (``mode="r"``) or as its one writer (``"w"``).

        The index is checked against the database (same gallery, same embeddings: see the module
        docstring) and brought up to date (a crash between a commit and an index save loses nothing).
        A damaged, foreign or stale index file, or a corrupt database, raise GalleryError and leave
        every file as it was; ``repair=True`` (writer only) always rebuilds the index from the database.
        ``load_index=False`` (reader only) reads the database alone: listing and info work whatever
        the index file holds, and the index is loaded and checked on the first search.
        """
        path = Path(path)
        if mode not in ("r", "w"):
            raise GalleryError(f"gallery mode must be 'r' or 'w', got {mode!r}")
        if repair and mode != "w":
            raise GalleryError("repair needs the gallery open for writing (mode='w')")
        if not load_index and mode != "r":
            raise GalleryError("a writer keeps the index up to date, so it always loads it (load_index=True)")
        db = path / DB_NAME
        if not os.path.lexists(db):
            raise GalleryError(f"no gallery at {path} (missing {DB_NAME})")
        check_plain_files(db)
        check_sqlite_header(db)
        lock = None
        if mode == "w":
            lock = WriterLock(path / LOCK_NAME)
            lock.acquire(lock_timeout)
        conn = g = None
        try:
            with db_errors(db):
                conn = connect(db, writable=mode == "w")
                g = cls(path, conn, mode == "w", lock, save_interval, use_gpu)
                if mode == "w" and g._records.upgrade():
                    g._apply_meta(g._records.read_meta())
                if load_index:
                    g._index.load(repair)
                else:
                    g._index.read_ids()
            return g
        except BaseException:
            if g is not None:
                g._index.release()
            if conn is not None:
                conn.close()
            if lock is not None:
                lock.release()
            raise

    def close(self) -> None:
        """Save the index if it changed, release the writer lock, close the database."""
        with self._mutex:
            if self._closed:
                return
            try:
                self._index.close()
            finally:
                self._closed = True
                self._conn.close()
                if self._lock is not None:
                    self._lock.release()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        """Number of stored embeddings."""
        return len(self._index.ids)

    # ------------------------------------------------------------------ saving

    def save(self) -> None:
        """Write the index file now (it is also written at close and every ``save_interval`` s)."""
        with self._mutex:
            self._check_open(write=True)
            self._index.save_now()

    @contextlib.contextmanager
    def _change(self) -> Iterator[Change]:
        """One write transaction that also bumps the stored generation and records the new embeddings
        digest (``Records.change``); the in-memory generation follows only once the commit has happened."""
        with self._records.change(self._index.saved_generation) as tx:
            yield tx

    def _check_open(self, write: bool = False) -> None:
        if self._closed:
            raise GalleryError(f"gallery {self.path} is closed")
        if write and not self.writable:
            raise GalleryError(f"gallery {self.path} is open read-only; open it with mode='w' to change it")

    # ------------------------------------------------------------------ changes

    def enroll(self, name: str, vectors: np.ndarray, *, fingerprint: str, sources: Sequence[str | None] | None = None,
               scores: Sequence[float | None] | None = None,
               content_hashes: Sequence[str | None] | None = None) -> list[int]:
        """Add one or more embeddings of one identity (created if new) in one transaction;
        returns the new embedding ids."""
        x = np.asarray(vectors, dtype=np.float32) if not isinstance(vectors, np.ndarray) else vectors
        n = 1 if x.ndim == 1 else len(x)
        return self.enroll_many([name] * n, vectors, fingerprint=fingerprint, sources=sources, scores=scores,
                                content_hashes=content_hashes)

    def enroll_many(self, names: Sequence[str], vectors: np.ndarray, *, fingerprint: str,
                    sources: Sequence[str | None] | None = None,
                    scores: Sequence[float | None] | None = None,
                    content_hashes: Sequence[str | None] | None = None) -> list[int]:
        """Add embeddings of several identities (``names[i]`` owns ``vectors[i]``) in one transaction:
        after a crash either all of them are in the gallery or none. ``content_hashes`` (e.g. sha256 of
        each source file) lets a later enroll skip what is already there. Returns the new embedding ids."""
        with self._mutex:
            self._check_open(write=True)
            if fingerprint is None:
                raise GalleryError("enroll needs the fingerprint of the model that made the embeddings")
            x = check_vectors(vectors, self.dim, self.fingerprint, fingerprint)
            names = [check_name(n) for n in names]
            self.check_unlike(names)
            n = len(x)
            if len(names) != n:
                raise GalleryError(f"{len(names)} names for {n} embeddings")
            sources = list(sources) if sources is not None else [None] * n
            scores = list(scores) if scores is not None else [None] * n
            hashes = list(content_hashes) if content_hashes is not None else [None] * n
            if len(sources) != n or len(scores) != n or len(hashes) != n:
                raise GalleryError("sources, scores and content hashes must have one entry per embedding")
            if any(h is not None and (not isinstance(h, str) or not 1 <= len(h) <= 128) for h in hashes):
                raise GalleryError("a content hash must be a string of 1 to 128 characters")
            now = time.time()
            new_ids: list[int] = []
            new_idents: list[int] = []
            with self._change() as tx:
                known: dict[str, int] = {}
                for name, vec, src, score, digest in zip(names, x, sources, scores, hashes, strict=True):
                    ident = known.get(name)
                    if ident is None:
                        ident = known[name] = tx.identity(name, now)
                    new_ids.append(tx.add_embedding(ident, vec.tobytes(), source=src, score=score,
                                                    fingerprint=fingerprint, created=now, content_hash=digest))
                    new_idents.append(ident)
            fault("after_commit")
            self._index.add(x, np.array(new_ids, np.int64), np.array(new_idents, np.int64))
            self._index.after_change()
            return new_ids

    def remove(self, name: str) -> int:
        """Remove an identity and all its embeddings (one transaction); returns how many embeddings went."""
        with self._mutex:
            self._check_open(write=True)
            ident = self._records.identity_id(name)
            with self._change() as tx:
                eids = tx.remove_identity(ident)
            self._index.remove(eids)
            self._index.after_change()
            return len(eids)

    def remove_embeddings(self, ids: Sequence[int]) -> int:
        """Remove single stored embeddings by id (an identity left with none is removed too)."""
        with self._mutex:
            self._check_open(write=True)
            ids = [int(i) for i in ids]
            with self._change() as tx:
                gone = tx.remove_embeddings(ids)
            self._index.remove([i for i in ids if self._index.ids.lookup(np.array([i]))[0] >= 0])
            self._index.after_change()
            return gone

    def rename(self, old: str, new: str) -> None:
        """Rename an identity (the index is untouched: it stores embedding ids, not names)."""
        with self._mutex:
            self._check_open(write=True)
            new = check_name(new)
            ident = self._records.identity_id(old)
            self.check_unlike([new], exempt=self._records.names({ident}).get(ident))
            owner = self._records.owner_of(new)
            if owner is not None and owner != ident:
                raise GalleryError(f"an identity named {new!r} already exists; remove it first or pick another name")
            with self._change() as tx:
                tx.rename_identity(ident, new)

    def check_unlike(self, names: Sequence[str], exempt: str | None = None) -> None:
        """Refuse checked names not stored exactly that look like a stored one or each other (check_unlike)."""
        with self._mutex, db_errors(self.path / DB_NAME):
            if new := [n for n in dict.fromkeys(names) if self._records.owner_of(n) is None]:
                check_unlike(new, [r[0] for r in self._conn.execute("SELECT name FROM identities")], exempt)

    def set_defaults(self, scoring: str | None = None, threshold: float | None = None,
                     clear_threshold: bool = False) -> None:
        """Change the stored default scoring ("best"/"mean") or open-set threshold."""
        with self._mutex:
            self._check_open(write=True)
            if scoring is not None:
                check_scoring(scoring)
            updates = {}
            if scoring is not None:
                updates["scoring"] = scoring
            if threshold is not None and not clear_threshold:
                threshold = check_threshold(threshold, "a gallery's threshold")
            if threshold is not None or clear_threshold:
                updates["threshold"] = "null" if clear_threshold else str(float(threshold))
            self._records.set_meta(updates)
            if scoring is not None:
                self.scoring = scoring
            if threshold is not None or clear_threshold:
                self.threshold = None if clear_threshold else float(threshold)

    def rebuild_index(self, spec: IndexSpec | str | None = None) -> None:
        """Rebuild the index from the database, optionally with other settings (e.g. switch to HNSW)."""
        with self._mutex:
            self._check_open(write=True)
            spec = IndexSpec(kind=spec) if isinstance(spec, str) else (spec or self.spec)
            self._records.set_meta({"index": spec.to_json()})
            self.spec = spec
            self._index.rebuild(spec)
            self._index.save()

    # ------------------------------------------------------------------ reading

    def refresh(self) -> bool:
        """Bring a reader up to date with the database if a writer changed it; True if it did."""
        with self._mutex:
            self._check_open()
            if not self._index.catch_up():
                return False
            meta = self._records.read_meta()
            self.scoring = meta.get("scoring", self.scoring)
            self.threshold = stored_threshold(meta.get("threshold"), self.path / DB_NAME)
            self._index.drop_caches()
            return True

    def identities(self) -> list[Identity]:
        """Every identity with its embedding count, sorted by name."""
        with self._mutex:
            self._check_open()
            return self._records.identities()

    def records(self, name: str | None = None) -> list[Record]:
        """Metadata of stored embeddings (all, or one identity's), in enrollment order."""
        with self._mutex:
            self._check_open()
            return self._records.records(name)

    def content_hashes(self, name: str) -> set[str]:
        """The content hashes (e.g. sha256 of the source files) already stored for an identity; empty
        for a name not in the gallery."""
        with self._mutex:
            self._check_open()
            return self._records.content_hashes(name)

    def vectors(self, name: str) -> np.ndarray:
        """The stored (unit) embeddings of one identity, [n, dim]."""
        with self._mutex:
            self._check_open()
            return self._records.identity_vectors(self._records.identity_id(name))[1]

    def score_person(self, name: str, query: np.ndarray, scoring: str | None = None,
                     fingerprint: str | None = None) -> float:
        """One query embedding against one identity (1:1 verification): the best cosine over its stored
        embeddings (``scoring="best"``) or their mean (``"mean"``; default: the gallery's scoring). Reads the
        database, whatever the backend."""
        with self._mutex:
            self._check_open()
            q = check_vectors(query, self.dim, self.fingerprint, fingerprint)
            if len(q) != 1:
                raise GalleryError(f"verify against a person takes one embedding, got {len(q)}")
            sims = self.vectors(name) @ q[0]
            return float(sims.max() if check_scoring(scoring or self.scoring) == "best" else sims.mean())

    def index_status(self) -> str:
        """"ok", or why the index cannot serve searches ("needs repair: ..."). An index not loaded yet
        (``open(load_index=False)``) is judged by its file without loading it: length, checksum, and
        the header's binding to this database, dimension and model (``check`` compares the vectors)."""
        with self._mutex:
            self._check_open()
            return self._index.status()

    def info(self) -> dict:
        """A summary: sizes, model, gallery id, index kind (requested and built) and status, scoring,
        threshold, files. Works from the database alone when the index is not loaded."""
        with self._mutex:
            self._check_open()
            n_ids = self._records.count_identities()
            status = self.index_status()
            return {"path": str(self.path), "identities": int(n_ids), "embeddings": len(self._index.ids),
                    "dim": self.dim, "fingerprint": self.fingerprint, "gallery_id": self.gallery_id,
                    "index": self.spec.kind, **self._index.describe(status),
                    "index_status": status, "scoring": self.scoring, "threshold": self.threshold,
                    "generation": self.generation, "created": self.created,
                    "db_bytes": (self.path / DB_NAME).stat().st_size}

    def search(self, queries: np.ndarray, k: int = 1, threshold: float | None = None, scoring: str | None = None,
               fingerprint: str | None = None, refresh: bool = True) -> list[list[Match]]:
        """Top-k identities (not images) for each query embedding, best first.

        An identity scores its best match (``scoring="best"``) or the mean cosine over all its
        embeddings (``"mean"``); ``threshold`` (default: the gallery's) marks matches below it
        ``known=False``. ``fingerprint``, when given, must be the gallery's model. Readers pick up
        a writer's changes first unless ``refresh=False``.
        """
        with self._mutex:
            self._check_open()
            q = check_vectors(queries, self.dim, self.fingerprint, fingerprint)
            if k < 1:
                raise GalleryError(f"top-k must be >= 1, got {k}")
            scoring = check_scoring(scoring or self.scoring)
            self._index.ensure()
            if refresh and not self.writable:
                self.refresh()
            threshold = self.threshold if threshold is None else check_threshold(threshold)
            if self._index.count == 0:
                return [[] for _ in range(len(q))]
            results = rank_queries(self._index.search, self._index.count, q, k, scoring, self._index.ids,
                                   self._index.identity_vectors)
            names = self._records.names({r[0] for res in results for r in res})
            return to_matches(results, names, threshold)

    def identify(self, queries: np.ndarray, threshold: float | None = None, scoring: str | None = None,
                 fingerprint: str | None = None) -> list[Match]:
        """The best identity per query, or a Match named UNKNOWN (with ``nearest`` set) when it
        scores below the threshold or the gallery is empty."""
        out = []
        for matches in self.search(queries, k=1, threshold=threshold, scoring=scoring, fingerprint=fingerprint):
            if not matches:
                out.append(Match(UNKNOWN, float("nan"), None, None, False, None))
            elif not matches[0].known:
                m = matches[0]
                out.append(Match(UNKNOWN, m.score, None, None, False, m.name))
            else:
                out.append(matches[0])
        return out

    def check(self) -> dict:
        """Full integrity check: SQLite's integrity_check, the recorded embeddings digest against the stored
        rows, and the index against the database: the same ids holding the same vectors (a foreign or
        stale index fails; one that cannot be loaded fails too, and ``index_status`` says why)."""
        with self._mutex:
            self._check_open()
            problems = self._records.integrity_problems()
            try:
                self._index.ensure()
                if not self.writable:
                    self.refresh()
                loaded = True
            except GalleryError:
                loaded = False
            _, eids, _, _ = self._records.state()
            matches = loaded and self._index.matches(eids)
            return {"database": "ok" if not problems else "; ".join(problems), "index_matches_database": matches,
                    "embeddings": len(eids), "index_count": self._index.held_count() if loaded else 0}
