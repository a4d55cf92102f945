"""An on-disk face gallery: SQLite holds the records (the source of truth), FAISS the search index.

Layout of a gallery folder::

    gallery.sqlite   identities, one row per enrolled image (source, detector score, model
                     fingerprint, time) with the float32 embedding as a BLOB; meta (dimension,
                     fingerprint, index settings, scoring, threshold, generation)
    index.faiss      the FAISS index of every embedding id, stamped with the generation and a crc32
    writer.lock      flock'd by the one writer

Durability: every change is one SQLite transaction (WAL, synchronous=FULL) that also bumps the
generation. The index file is a cache of the database, written atomically (temporary file, fsync,
rename) at close and at most every ``save_interval`` seconds. Embedding ids are never reused
(AUTOINCREMENT), so on open the index's id set is compared with the database's: missing ids are
added from the stored vectors and stale ones removed. A process killed anywhere therefore loses
at most the transaction in flight. A file whose bytes are damaged (bad magic, crc, truncation), or
that holds another dimension or model, is not silently replaced: open raises GalleryError and
``repair=True`` rebuilds it from the database (keeping the damaged file beside it).

Readers open the database read-only and take no lock; WAL gives each read a consistent snapshot.
A single writer at a time is enforced by ``writer.lock``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facemeta.errors import GalleryError
from facemeta.gallery import search as S
from facemeta.gallery.lock import WriterLock
from facemeta.gallery.search import IndexSpec

DB_NAME = "gallery.sqlite"
INDEX_NAME = "index.faiss"
LOCK_NAME = "writer.lock"
FORMAT_VERSION = 1
UNKNOWN = "unknown"
MAX_NAME = 256

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE identities (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE embeddings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    identity_id INTEGER NOT NULL REFERENCES identities(id),
    source TEXT,
    score REAL,
    fingerprint TEXT NOT NULL,
    created REAL NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX embeddings_identity ON embeddings(identity_id);
"""


def _fault(point: str) -> None:
    """Test-only fault injection: SIGKILL this process at a named point when
    FACEMETA_GALLERY_FAULT names it (used by the crash tests; a no-op otherwise)."""
    if os.environ.get("FACEMETA_GALLERY_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Identity:
    """One enrolled person: name, database id, number of stored embeddings, creation time."""

    name: str
    id: int
    count: int
    created: float


@dataclass(frozen=True)
class Record:
    """One stored embedding's metadata (the vector itself is in the database)."""

    id: int
    identity: str
    source: str | None
    score: float | None
    fingerprint: str
    created: float


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


class _IdMap:
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


@contextlib.contextmanager
def _db_errors(path: Path) -> Iterator[None]:
    """Turn SQLite failures into one-line GalleryErrors."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc)
        if "locked" in text or "busy" in text:
            raise GalleryError(f"gallery database {path} is busy: {text}") from None
        raise GalleryError(f"gallery database {path} is unreadable or corrupt: {text}") from None
    except sqlite3.DatabaseError as exc:
        raise GalleryError(f"gallery database {path} is corrupt: {exc}") from None


def _check_sqlite_header(db: Path) -> None:
    """Refuse a database file that is not SQLite or is shorter than its own header says (truncated),
    before SQLite touches it: such damage may otherwise surface only when a damaged page is read."""
    try:
        with open(db, "rb") as fh:
            head = fh.read(100)
            size = os.fstat(fh.fileno()).st_size
    except OSError as exc:
        raise GalleryError(f"cannot read gallery database {db}: {exc.strerror or exc}") from None
    if len(head) < 100 or not head.startswith(b"SQLite format 3\x00"):
        raise GalleryError(f"{db} is not an SQLite database (corrupt or overwritten)")
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    pages = int.from_bytes(head[28:32], "big")
    counter, valid_for = head[24:28], head[92:96]
    if page < 512 or page & (page - 1):
        raise GalleryError(f"{db} is corrupt (bad page size {page})")
    wal = db.with_name(db.name + "-wal")
    checkpointing = wal.exists() and wal.stat().st_size > 0  # a checkpoint may be growing the file right now
    if counter == valid_for and pages and pages * page > size and not checkpointing:
        raise GalleryError(f"{db} is truncated ({size} bytes, its header says {pages * page})")


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise GalleryError(f"an identity name must be a string, got {type(name).__name__}")
    name = name.strip()
    if not name or len(name) > MAX_NAME or any(ord(c) < 32 for c in name):
        raise GalleryError(f"bad identity name {name!r}: 1 to {MAX_NAME} printable characters")
    if name.lower() == UNKNOWN:
        raise GalleryError(f"{UNKNOWN!r} is reserved for faces that match nobody")
    return name


class Gallery:
    """A face gallery folder: enroll, remove, rename, list, and search identities by embedding.

    Open with :meth:`create` or :meth:`open` (``mode="r"`` read-only, ``"w"`` the single writer).
    Not shared between threads without care: calls are serialised by an internal lock.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, writable: bool, lock: WriterLock | None,
                 save_interval: float, use_gpu: bool | None) -> None:
        self.path = path
        self._conn = conn
        self.writable = writable
        self._lock = lock
        self.save_interval = save_interval
        self._use_gpu = use_gpu
        self._mutex = threading.RLock()
        self._closed = False
        self._dirty = False
        self._last_save = time.monotonic()
        self._gpu = None
        self._mean_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        meta = self._read_meta()
        self.dim = int(meta["dim"])
        self.fingerprint = meta["fingerprint"]
        self.spec = IndexSpec.from_json(meta["index"])
        self.scoring = meta.get("scoring", "best")
        self.threshold = None if meta.get("threshold") in (None, "", "null") else float(meta["threshold"])
        self.generation = int(meta["generation"])
        self.created = float(meta.get("created", 0.0))
        self._built: S.BuiltIndex
        self._ids: _IdMap

    # ------------------------------------------------------------------ opening and closing

    @classmethod
    def create(cls, path: str | os.PathLike, dim: int, fingerprint: str, index: IndexSpec | str = "flat",
               scoring: str = "best", threshold: float | None = None, save_interval: float = 30.0,
               use_gpu: bool | None = None) -> Gallery:
        """Create an empty gallery folder for ``dim``-d embeddings of the model ``fingerprint``
        and return it open for writing. The folder must not exist or be empty."""
        path = Path(path)
        spec = IndexSpec(kind=index) if isinstance(index, str) else index
        if not isinstance(dim, int | np.integer) or not 1 <= int(dim) <= 65536:
            raise GalleryError(f"embedding dimension must be an integer in 1..65536, got {dim!r}")
        if not fingerprint or not isinstance(fingerprint, str):
            raise GalleryError("a gallery needs the model fingerprint of its embeddings")
        if scoring not in S.SCORINGS:
            raise GalleryError(f"unknown scoring {scoring!r}; choose one of {', '.join(S.SCORINGS)}")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise GalleryError(f"{path} already exists and is not an empty folder")
        path.mkdir(parents=True, exist_ok=True)
        lock = WriterLock(path / LOCK_NAME)
        lock.acquire(0)
        try:
            conn = sqlite3.connect(path / DB_NAME, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            meta = {"format": FORMAT_VERSION, "dim": int(dim), "fingerprint": fingerprint, "index": spec.to_json(),
                    "scoring": scoring, "threshold": "null" if threshold is None else float(threshold),
                    "generation": 0, "created": time.time()}
            conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", [(k, str(v)) for k, v in meta.items()])
            conn.execute("COMMIT")
        except BaseException:
            lock.release()
            raise
        g = cls(path, conn, True, lock, save_interval, use_gpu)
        g._built = S.empty_index(spec, g.dim)
        g._ids = _IdMap(np.empty(0, np.int64), np.empty(0, np.int64))
        g._save()
        return g

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r", lock_timeout: float = 10.0, repair: bool = False,
             save_interval: float = 30.0, use_gpu: bool | None = None) -> Gallery:
        """Open an existing gallery read-only (``mode="r"``) or as its one writer (``"w"``).

        The index is checked against the database and brought up to date (a crash between a
        commit and an index save loses nothing). A damaged index file, an index of another
        dimension or model, or a corrupt database raise GalleryError and leave every file as it
        was; ``repair=True`` (writer only) rebuilds the index from the database instead.
        """
        path = Path(path)
        if mode not in ("r", "w"):
            raise GalleryError(f"gallery mode must be 'r' or 'w', got {mode!r}")
        if repair and mode != "w":
            raise GalleryError("repair needs the gallery open for writing (mode='w')")
        db = path / DB_NAME
        if not db.is_file():
            raise GalleryError(f"no gallery at {path} (missing {DB_NAME})")
        _check_sqlite_header(db)
        lock = None
        if mode == "w":
            lock = WriterLock(path / LOCK_NAME)
            lock.acquire(lock_timeout)
        conn = None
        try:
            with _db_errors(db):
                if mode == "w":
                    conn = sqlite3.connect(f"file:{db}?mode=rw", uri=True, isolation_level=None,
                                           check_same_thread=False)
                    conn.execute("PRAGMA synchronous=FULL")
                else:
                    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None,
                                           check_same_thread=False)
                conn.execute("PRAGMA busy_timeout=10000")
                g = cls(path, conn, mode == "w", lock, save_interval, use_gpu)
                g._load(repair)
            return g
        except BaseException:
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
                if self.writable and self._dirty:
                    self._save()
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
        return len(self._ids)

    def _read_meta(self) -> dict[str, str]:
        with _db_errors(self.path / DB_NAME):
            try:
                rows = self._conn.execute("SELECT key, value FROM meta").fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    raise GalleryError(f"{self.path / DB_NAME} is not a facemeta gallery (no meta table)") from None
                raise
        meta = dict(rows)
        missing = {"format", "dim", "fingerprint", "index", "generation"} - meta.keys()
        if missing:
            raise GalleryError(f"{self.path / DB_NAME} is incomplete (missing {', '.join(sorted(missing))})")
        if int(meta["format"]) > FORMAT_VERSION:
            raise GalleryError(f"gallery format {meta['format']} is newer than this facemeta understands")
        return meta

    def _db_state(self) -> tuple[int, np.ndarray, np.ndarray]:
        """(generation, embedding ids, identity ids) from one consistent read of the database."""
        with _db_errors(self.path / DB_NAME):
            self._conn.execute("BEGIN")
            try:
                gen = int(self._conn.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])
                rows = self._conn.execute(
                    "SELECT id, identity_id FROM embeddings INDEXED BY embeddings_identity").fetchall()
            finally:
                self._conn.execute("COMMIT")
        arr = np.array(rows, dtype=np.int64).reshape(-1, 2)
        return gen, arr[:, 0], arr[:, 1]

    def _fetch_vectors(self, eids: np.ndarray) -> np.ndarray:
        """Stored vectors of the given embedding ids, in that order."""
        out = np.empty((len(eids), self.dim), np.float32)
        pos = {int(e): i for i, e in enumerate(eids)}
        db = self.path / DB_NAME
        with _db_errors(db):
            chunk = 900
            eids_list = [int(e) for e in eids]
            for start in range(0, len(eids_list), chunk):
                part = eids_list[start:start + chunk]
                q = f"SELECT id, vector FROM embeddings WHERE id IN ({','.join('?' * len(part))})"
                for eid, blob in self._conn.execute(q, part):
                    if len(blob) != 4 * self.dim:
                        raise GalleryError(f"gallery database {db} is corrupt (embedding {eid} has {len(blob)} bytes)")
                    out[pos[eid]] = np.frombuffer(blob, np.float32)
                    pos.pop(eid)
        if pos:
            raise GalleryError(f"gallery database {db} changed while reading (embeddings {sorted(pos)[:5]} vanished)")
        return out

    def _all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (id, vector) in id order, read in one snapshot (for rebuilding the index)."""
        db = self.path / DB_NAME
        with _db_errors(db):
            self._conn.execute("BEGIN")
            try:
                n = self._conn.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]
                ids = np.empty(n, np.int64)
                vecs = np.empty((n, self.dim), np.float32)
                i = 0
                for eid, blob in self._conn.execute("SELECT id, vector FROM embeddings ORDER BY id"):
                    if len(blob) != 4 * self.dim:
                        raise GalleryError(f"gallery database {db} is corrupt (embedding {eid} has {len(blob)} bytes)")
                    ids[i] = eid
                    vecs[i] = np.frombuffer(blob, np.float32)
                    i += 1
            finally:
                self._conn.execute("COMMIT")
        return ids[:i], vecs[:i]

    def _rebuild(self, spec: IndexSpec | None = None) -> None:
        spec = spec or self.spec
        ids, vecs = self._all_vectors()
        self._built = S.build_index(spec, self.dim, vecs, ids)
        self._drop_gpu()

    def _load(self, repair: bool) -> None:
        """Load the index file and reconcile it with the database (see the module docstring)."""
        index_path = self.path / INDEX_NAME
        gen, eids, idents = self._db_state()
        self.generation = gen
        self._ids = _IdMap(eids, idents)
        if self.writable:
            for tmp in self.path.glob(f".{INDEX_NAME}.*.tmp"):  # left by a writer killed mid-save
                tmp.unlink(missing_ok=True)
        changed = False
        built = None
        if index_path.exists():
            try:
                built, header = S.load_index(index_path)
                if int(header["dim"]) != self.dim:
                    raise GalleryError(f"{index_path} holds {header['dim']}-d vectors but the gallery is {self.dim}-d")
                if header.get("fingerprint") != self.fingerprint:
                    raise GalleryError(f"{index_path} belongs to model {header.get('fingerprint')!r}, "
                                       f"but the gallery holds model {self.fingerprint!r}")
            except GalleryError as exc:
                if not repair:
                    raise GalleryError(f"{exc}; the database is intact: `facemeta gallery repair {self.path}` "
                                       "rebuilds the index from it") from None
                aside = index_path.with_name(f"{INDEX_NAME}.damaged-{int(time.time())}")
                os.replace(index_path, aside)
                built = None
            if built is not None and (built.spec.kind != self.spec.kind or built.spec.m != self.spec.m
                                      or built.spec.nlist != self.spec.nlist):
                built = None  # settings changed: rebuild
            if built is not None:
                built.spec = self.spec  # search-time knobs follow the database
                S.set_search_params(built, self.spec)
        if built is None:
            self._rebuild()
            changed = True
        else:
            self._built = built
            present = S.index_ids(built)
            if built.tombstones:
                present = present[~np.isin(present, np.fromiter(built.tombstones, np.int64))]
            extra = np.setdiff1d(present, eids, assume_unique=True)
            missing = np.setdiff1d(eids, present, assume_unique=True)
            if len(extra):
                S.remove_ids(built, extra)
                changed = True
            if len(missing):
                S.add_vectors(built, self._fetch_vectors(missing), missing)
                changed = True
            if built.count != len(eids):
                self._rebuild()  # should not happen; the database wins
                changed = True
        if self.writable and S.needs_rebuild(self._built):
            self._rebuild()
            changed = True
        if self.writable and changed:
            self._save()

    # ------------------------------------------------------------------ saving

    def _save(self) -> None:
        S.save_index(self._built, self.path / INDEX_NAME, self.generation, self.fingerprint)
        self._dirty = False
        self._last_save = time.monotonic()

    def save(self) -> None:
        """Write the index file now (it is also written at close and every ``save_interval`` s)."""
        with self._mutex:
            self._check_open(write=True)
            if S.needs_rebuild(self._built):
                self._rebuild()
            self._save()

    def _after_change(self) -> None:
        self._dirty = True
        self._drop_gpu()
        if S.needs_rebuild(self._built):
            self._rebuild()
        if time.monotonic() - self._last_save >= self.save_interval:
            self._save()

    def _drop_gpu(self) -> None:
        self._gpu = None
        self._mean_cache.clear()

    @contextlib.contextmanager
    def _change(self) -> Iterator[sqlite3.Connection]:
        """One write transaction that also bumps the stored generation; rolled back on any error.

        The in-memory generation follows only once the commit has happened.
        """
        with _db_errors(self.path / DB_NAME):
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("UPDATE meta SET value=? WHERE key='generation'", (str(self.generation + 1),))
                _fault("before_commit")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        self.generation += 1

    def _check_open(self, write: bool = False) -> None:
        if self._closed:
            raise GalleryError(f"gallery {self.path} is closed")
        if write and not self.writable:
            raise GalleryError(f"gallery {self.path} is open read-only; open it with mode='w' to change it")

    # ------------------------------------------------------------------ changes

    def _check_vectors(self, vectors: np.ndarray, fingerprint: str | None) -> np.ndarray:
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise GalleryError(f"embeddings of model {fingerprint!r} cannot be used with this gallery, "
                               f"which holds model {self.fingerprint!r}")
        try:
            x = np.asarray(vectors, dtype=np.float32)
        except (TypeError, ValueError):
            raise GalleryError("embeddings must be a numeric array") from None
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise GalleryError(f"embeddings of shape {tuple(np.shape(vectors))} do not fit this gallery "
                               f"of {self.dim}-d vectors")
        if not np.all(np.isfinite(x)):
            raise GalleryError("embeddings contain NaN or infinite values")
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        if np.any(norms < 1e-12):
            raise GalleryError("an embedding is all zeros")
        return np.ascontiguousarray(x / norms, dtype=np.float32)

    def enroll(self, name: str, vectors: np.ndarray, *, fingerprint: str, sources: Sequence[str | None] | None = None,
               scores: Sequence[float | None] | None = None) -> list[int]:
        """Add one or more embeddings of one identity (created if new) in one transaction;
        returns the new embedding ids."""
        x = np.asarray(vectors, dtype=np.float32) if not isinstance(vectors, np.ndarray) else vectors
        n = 1 if x.ndim == 1 else len(x)
        return self.enroll_many([name] * n, vectors, fingerprint=fingerprint, sources=sources, scores=scores)

    def enroll_many(self, names: Sequence[str], vectors: np.ndarray, *, fingerprint: str,
                    sources: Sequence[str | None] | None = None,
                    scores: Sequence[float | None] | None = None) -> list[int]:
        """Add embeddings of several identities (``names[i]`` owns ``vectors[i]``) in one transaction:
        after a crash either all of them are in the gallery or none. Returns the new embedding ids."""
        with self._mutex:
            self._check_open(write=True)
            if fingerprint is None:
                raise GalleryError("enroll needs the fingerprint of the model that made the embeddings")
            x = self._check_vectors(vectors, fingerprint)
            names = [_check_name(n) for n in names]
            n = len(x)
            if len(names) != n:
                raise GalleryError(f"{len(names)} names for {n} embeddings")
            sources = list(sources) if sources is not None else [None] * n
            scores = list(scores) if scores is not None else [None] * n
            if len(sources) != n or len(scores) != n:
                raise GalleryError("sources and scores must have one entry per embedding")
            now = time.time()
            new_ids: list[int] = []
            new_idents: list[int] = []
            with self._change() as conn:
                known: dict[str, int] = {}
                for name, vec, src, score in zip(names, x, sources, scores, strict=True):
                    ident = known.get(name)
                    if ident is None:
                        row = conn.execute("SELECT id FROM identities WHERE name=?", (name,)).fetchone()
                        if row is None:
                            ident = conn.execute("INSERT INTO identities(name, created) VALUES (?, ?)",
                                                 (name, now)).lastrowid
                        else:
                            ident = row[0]
                        known[name] = ident
                    cur = conn.execute(
                        "INSERT INTO embeddings(identity_id, source, score, fingerprint, created, vector) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (ident, None if src is None else str(src), None if score is None else float(score),
                         fingerprint, now, vec.tobytes()))
                    new_ids.append(cur.lastrowid)
                    new_idents.append(ident)
            _fault("after_commit")
            ids = np.array(new_ids, np.int64)
            S.add_vectors(self._built, x, ids)
            self._ids.add(ids, np.array(new_idents, np.int64))
            self._after_change()
            return new_ids

    def _identity_id(self, name: str) -> int:
        row = self._conn.execute("SELECT id FROM identities WHERE name=?", (name,)).fetchone()
        if row is None:
            raise GalleryError(f"no identity named {name!r} in gallery {self.path}")
        return int(row[0])

    def remove(self, name: str) -> int:
        """Remove an identity and all its embeddings (one transaction); returns how many embeddings went."""
        with self._mutex:
            self._check_open(write=True)
            with _db_errors(self.path / DB_NAME):
                ident = self._identity_id(name)
            with self._change() as conn:
                eids = [r[0] for r in conn.execute("SELECT id FROM embeddings WHERE identity_id=?", (ident,))]
                conn.execute("DELETE FROM embeddings WHERE identity_id=?", (ident,))
                conn.execute("DELETE FROM identities WHERE id=?", (ident,))
            S.remove_ids(self._built, eids)
            self._ids.remove(np.array(eids, np.int64))
            self._after_change()
            return len(eids)

    def remove_embeddings(self, ids: Sequence[int]) -> int:
        """Remove single stored embeddings by id (an identity left with none is removed too)."""
        with self._mutex:
            self._check_open(write=True)
            ids = [int(i) for i in ids]
            gone = 0
            with self._change() as conn:
                for i in ids:
                    gone += conn.execute("DELETE FROM embeddings WHERE id=?", (i,)).rowcount
                conn.execute("DELETE FROM identities WHERE id NOT IN (SELECT identity_id FROM embeddings)")
            present = [i for i in ids if self._ids.lookup(np.array([i]))[0] >= 0]
            S.remove_ids(self._built, present)
            self._ids.remove(np.array(present, np.int64))
            self._after_change()
            return gone

    def rename(self, old: str, new: str) -> None:
        """Rename an identity (the index is untouched: it stores embedding ids, not names)."""
        with self._mutex:
            self._check_open(write=True)
            new = _check_name(new)
            with _db_errors(self.path / DB_NAME):
                ident = self._identity_id(old)
                if self._conn.execute("SELECT 1 FROM identities WHERE name=?", (new,)).fetchone():
                    raise GalleryError(f"an identity named {new!r} already exists; remove it first or pick another name")
            with self._change() as conn:
                conn.execute("UPDATE identities SET name=? WHERE id=?", (new, ident))

    def set_defaults(self, scoring: str | None = None, threshold: float | None = None,
                     clear_threshold: bool = False) -> None:
        """Change the stored default scoring ("best"/"mean") or open-set threshold."""
        with self._mutex:
            self._check_open(write=True)
            if scoring is not None and scoring not in S.SCORINGS:
                raise GalleryError(f"unknown scoring {scoring!r}; choose one of {', '.join(S.SCORINGS)}")
            updates = {}
            if scoring is not None:
                updates["scoring"] = scoring
            if threshold is not None or clear_threshold:
                updates["threshold"] = "null" if clear_threshold else str(float(threshold))
            with _db_errors(self.path / DB_NAME):
                self._conn.execute("BEGIN IMMEDIATE")
                for k, v in updates.items():
                    self._conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (k, v))
                self._conn.execute("COMMIT")
            if scoring is not None:
                self.scoring = scoring
            if threshold is not None or clear_threshold:
                self.threshold = None if clear_threshold else float(threshold)

    def rebuild_index(self, spec: IndexSpec | str | None = None) -> None:
        """Rebuild the index from the database, optionally with other settings (e.g. switch to HNSW)."""
        with self._mutex:
            self._check_open(write=True)
            spec = IndexSpec(kind=spec) if isinstance(spec, str) else (spec or self.spec)
            with _db_errors(self.path / DB_NAME):
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.execute("UPDATE meta SET value=? WHERE key='index'", (spec.to_json(),))
                self._conn.execute("COMMIT")
            self.spec = spec
            self._rebuild(spec)
            self._save()

    # ------------------------------------------------------------------ reading

    def refresh(self) -> bool:
        """Bring a reader up to date with the database if a writer changed it; True if it did."""
        with self._mutex:
            self._check_open()
            with _db_errors(self.path / DB_NAME):
                gen = int(self._conn.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])
            if gen == self.generation:
                return False
            gen, eids, idents = self._db_state()
            present = self._ids.eids
            extra = np.setdiff1d(present, eids, assume_unique=True)
            missing = np.setdiff1d(eids, present, assume_unique=True)
            S.remove_ids(self._built, extra)
            if len(missing):
                S.add_vectors(self._built, self._fetch_vectors(missing), missing)
            self._ids = _IdMap(eids, idents)
            self.generation = gen
            meta = self._read_meta()
            self.scoring = meta.get("scoring", self.scoring)
            self.threshold = None if meta.get("threshold") in (None, "", "null") else float(meta["threshold"])
            self._drop_gpu()
            return True

    def identities(self) -> list[Identity]:
        """Every identity with its embedding count, sorted by name."""
        with self._mutex:
            self._check_open()
            with _db_errors(self.path / DB_NAME):
                rows = self._conn.execute(
                    "SELECT i.name, i.id, COUNT(e.id), i.created FROM identities i "
                    "LEFT JOIN embeddings e ON e.identity_id = i.id GROUP BY i.id ORDER BY i.name").fetchall()
            return [Identity(n, int(i), int(c), float(t)) for n, i, c, t in rows]

    def records(self, name: str | None = None) -> list[Record]:
        """Metadata of stored embeddings (all, or one identity's), in enrollment order."""
        with self._mutex:
            self._check_open()
            q = ("SELECT e.id, i.name, e.source, e.score, e.fingerprint, e.created FROM embeddings e "
                 "JOIN identities i ON i.id = e.identity_id")
            with _db_errors(self.path / DB_NAME):
                if name is None:
                    rows = self._conn.execute(q + " ORDER BY e.id").fetchall()
                else:
                    ident = self._identity_id(name)
                    rows = self._conn.execute(q + " WHERE i.id=? ORDER BY e.id", (ident,)).fetchall()
            return [Record(*r) for r in rows]

    def vectors(self, name: str) -> np.ndarray:
        """The stored (unit) embeddings of one identity, [n, dim]."""
        with self._mutex:
            self._check_open()
            with _db_errors(self.path / DB_NAME):
                ident = self._identity_id(name)
                blobs = self._conn.execute("SELECT vector FROM embeddings WHERE identity_id=? ORDER BY id",
                                           (ident,)).fetchall()
            return np.stack([np.frombuffer(b[0], np.float32) for b in blobs]) if blobs else np.empty((0, self.dim), np.float32)

    def info(self) -> dict:
        """A summary: sizes, model, index kind (requested and built), scoring, threshold, files."""
        with self._mutex:
            self._check_open()
            with _db_errors(self.path / DB_NAME):
                n_ids = self._conn.execute("SELECT COUNT(*) FROM identities").fetchone()[0]
            idx = self.path / INDEX_NAME
            return {"path": str(self.path), "identities": int(n_ids), "embeddings": len(self._ids),
                    "dim": self.dim, "fingerprint": self.fingerprint, "index": self.spec.kind,
                    "index_built": self._built.kind, "index_settings": json.loads(self.spec.to_json()),
                    "nlist": self._built.nlist or None, "scoring": self.scoring, "threshold": self.threshold,
                    "generation": self.generation, "created": self.created, "gpu": self._gpu is not None,
                    "db_bytes": (self.path / DB_NAME).stat().st_size,
                    "index_bytes": idx.stat().st_size if idx.exists() else 0}

    def _gpu_index(self):
        if self._use_gpu is False:
            return None
        if self._gpu is None:
            self._gpu = S.to_gpu(self._built)
            if self._gpu is None and self._use_gpu:
                raise GalleryError("GPU search was asked for but FAISS has no GPU here")
        return self._gpu

    def _names(self, idents: set[int]) -> dict[int, str]:
        if not idents:
            return {}
        ids = sorted(idents)
        q = f"SELECT id, name FROM identities WHERE id IN ({','.join('?' * len(ids))})"
        with _db_errors(self.path / DB_NAME):
            return dict(self._conn.execute(q, ids).fetchall())

    def _identity_vectors(self, ident: int) -> tuple[np.ndarray, np.ndarray]:
        hit = self._mean_cache.get(ident)
        if hit is None:
            with _db_errors(self.path / DB_NAME):
                rows = self._conn.execute("SELECT id, vector FROM embeddings WHERE identity_id=? ORDER BY id",
                                          (ident,)).fetchall()
            eids = np.array([r[0] for r in rows], np.int64)
            vecs = np.stack([np.frombuffer(r[1], np.float32) for r in rows]) if rows else np.empty((0, self.dim), np.float32)
            hit = (eids, vecs)
            if len(self._mean_cache) > 10_000:
                self._mean_cache.clear()
            self._mean_cache[ident] = hit
        return hit

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
            q = self._check_vectors(queries, fingerprint)
            if k < 1:
                raise GalleryError(f"top-k must be >= 1, got {k}")
            scoring = scoring or self.scoring
            if scoring not in S.SCORINGS:
                raise GalleryError(f"unknown scoring {scoring!r}; choose one of {', '.join(S.SCORINGS)}")
            if refresh and not self.writable:
                self.refresh()
            threshold = self.threshold if threshold is None else threshold
            total = self._built.count
            if total == 0:
                return [[] for _ in range(len(q))]
            gpu = self._gpu_index()
            results: list[list[tuple[int, float, int]] | None] = [None] * len(q)
            todo = np.arange(len(q))
            kk = min(total, max(4 * k, k + 16))
            while len(todo):
                sims, hits = S.search_vectors(self._built, q[todo], kk, gpu)
                again = []
                for row, qi in enumerate(todo):
                    ids = hits[row]
                    idents = self._ids.lookup(ids)
                    valid = ids >= 0
                    exhausted = kk >= total
                    if scoring == "best":
                        ranked = S.rank_identities(sims[row][valid], ids[valid], dict(zip(ids[valid].tolist(), idents[valid].tolist(), strict=True)), k)
                        if len(ranked) < k and not exhausted:
                            again.append(qi)
                            continue
                    else:
                        cands = {int(i) for i in idents[valid] if i >= 0}
                        ranked = S.mean_scores(q[qi], {c: self._identity_vectors(c) for c in cands})[:k]
                        # Unseen identities score at most the last hit's similarity: exact once the
                        # k-th mean beats it (or every embedding was searched).
                        last = float(sims[row][valid][-1]) if valid.any() else -1.0
                        if not exhausted and (len(ranked) < k or ranked[-1][1] < last):
                            again.append(qi)
                            continue
                    results[qi] = ranked
                todo = np.array(again, dtype=np.int64)
                kk = min(total, kk * 4)
            names = self._names({r[0] for res in results for r in res or []})
            out: list[list[Match]] = []
            for res in results:
                matches = [Match(names[i], s, i, e, threshold is None or s >= threshold)
                           for i, s, e in res or [] if i in names]
                out.append(matches)
            return out

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
        """Full integrity check: SQLite's integrity_check plus index/database id agreement."""
        with self._mutex:
            self._check_open()
            with _db_errors(self.path / DB_NAME):
                result = self._conn.execute("PRAGMA integrity_check").fetchall()
            ok_db = result == [("ok",)]
            present = S.index_ids(self._built)
            if self._built.tombstones:
                present = present[~np.isin(present, np.fromiter(self._built.tombstones, np.int64))]
            _, eids, _ = self._db_state()
            return {"database": "ok" if ok_db else "; ".join(r[0] for r in result[:5]),
                    "index_matches_database": bool(np.array_equal(np.sort(present), np.sort(eids))),
                    "embeddings": len(eids), "index_count": self._built.count}
