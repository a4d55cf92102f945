"""An on-disk face gallery: SQLite holds the records (the source of truth), FAISS the search index.

Layout of a gallery folder::

    gallery.sqlite   identities, one row per enrolled image (source path, sha256 of the source file's
                     bytes, detector score, model fingerprint, time) with the float32 embedding as a
                     BLOB; meta (format, gallery id, dimension, fingerprint, index settings, scoring,
                     threshold, generation); index_digests (the embeddings digest of recent generations)
    index.faiss      the FAISS index of every embedding id, stamped with the generation, a crc32, and
                     the gallery id and embeddings digest it was saved with
    writer.lock      flock'd by the one writer

Durability: every change is one SQLite transaction (WAL, synchronous=FULL) that also bumps the
generation. The index file is a cache of the database, written atomically (temporary file, fsync,
rename) at close and at most every ``save_interval`` seconds. Embedding ids are never reused
(AUTOINCREMENT), so on open an index that lags the database is brought up to date by id: missing
ids are added from the stored vectors and stale ones removed. A process killed anywhere therefore
loses at most the transaction in flight.

Binding: the index must be the cache of *this* database, not a copy from another gallery or from
another moment of this one. Each gallery has a random id (given at creation, or to an older gallery
on its first writer open) and a digest of its embeddings: the sum modulo 2^128 of a 128-bit BLAKE2b
hash of each row's (id, vector bytes). Each change transaction updates the digest by the rows it adds
or removes (its cost is those rows, never the whole gallery) and records it in ``index_digests``
under the new generation; rows older than both the last saved index and the last ``DIGEST_KEEP``
generations are pruned. The index file carries the gallery id, generation and digest it was saved
with, so checking it on open is one small query whatever the gallery's size. An index of another
gallery, one newer than the database, or one whose digest is not the one the database recorded for
its generation is refused like a damaged file (bad magic, crc, truncation) or one of another
dimension or model: open raises a one-line GalleryError pointing to ``facemeta gallery repair`` and
leaves every file as it was; ``repair=True`` always rebuilds the index from the database (and
recomputes the digest), keeping the old file beside it. ``check`` compares the index's vectors with
the database's.

Provenance: each embedding keeps its source (the enrolled file's path) and ``content_hash`` (sha256
of the file's bytes), so a rerun of an interrupted enroll can skip the photos already enrolled.

Names are stripped and NFC-normalised, and may not hold control, format (bidi overrides, zero-width),
line or paragraph separator, surrogate, private-use or unassigned characters (:func:`check_name`).

Files: the lock and the index are opened without following symbolic links and must be regular
files; the SQLite files are checked the same way before SQLite opens them (it would follow a link);
the index is replaced by rename, which replaces a link rather than writing through it.

Readers open the database read-only and take no lock; WAL gives each read a consistent snapshot.
A single writer at a time is enforced by ``writer.lock``. ``Gallery.open(load_index=False)`` reads
the database only (list, info work with a damaged index) and loads the index on the first search.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import signal
import sqlite3
import stat
import threading
import time
import unicodedata
import uuid
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
FORMAT_VERSION = 2  # 2: gallery id, embeddings digest (index_digests), embeddings.content_hash
UNKNOWN = "unknown"
MAX_NAME = 256
DIGEST_KEEP = 1000  # generations of digests kept beyond the last saved index (for readers racing a save)
SQ8_TOLERANCE = 0.02  # largest per-component error of an 8-bit code that check() accepts as the same vector
_DIGEST_MOD = 1 << 128
_BAD_NAME_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_UNBOUND = "was written by an older facemeta and is not bound to this gallery's database"

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
    vector BLOB NOT NULL,
    content_hash TEXT
);
CREATE INDEX embeddings_identity ON embeddings(identity_id);
CREATE TABLE index_digests (generation INTEGER PRIMARY KEY, digest TEXT NOT NULL);
"""
_DIGESTS_TABLE = "CREATE TABLE IF NOT EXISTS index_digests (generation INTEGER PRIMARY KEY, digest TEXT NOT NULL)"


def _fault(point: str) -> None:
    """Test-only fault injection: SIGKILL this process at a named point when
    FACEMETA_GALLERY_FAULT names it (used by the crash tests; a no-op otherwise)."""
    if os.environ.get("FACEMETA_GALLERY_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def row_digest(eid: int, blob: bytes) -> int:
    """128-bit BLAKE2b hash of one stored embedding (its id and float32 bytes); a gallery's digest is
    the sum of these modulo 2^128, so rows can be added and removed in any order."""
    h = hashlib.blake2b(int(eid).to_bytes(8, "little", signed=True), digest_size=16)
    h.update(blob)
    return int.from_bytes(h.digest(), "little")


def _hex(digest: int) -> str:
    return f"{digest % _DIGEST_MOD:032x}"


@dataclass(frozen=True)
class Identity:
    """One enrolled person: name, database id, number of stored embeddings, creation time."""

    name: str
    id: int
    count: int
    created: float


@dataclass(frozen=True)
class Record:
    """One stored embedding's metadata (the vector itself is in the database); ``content_hash`` is the
    sha256 of the source file's bytes when the enroller gave it."""

    id: int
    identity: str
    source: str | None
    score: float | None
    fingerprint: str
    created: float
    content_hash: str | None = None


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


class _Change:
    """An open write transaction: its connection, and the change its added and removed rows make to
    the embeddings digest."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.delta = 0

    def execute(self, sql: str, params: Sequence = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def added(self, eid: int, blob: bytes) -> None:
        self.delta += row_digest(eid, blob)

    def removed(self, eid: int, blob: bytes) -> None:
        self.delta -= row_digest(eid, blob)


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


def _check_plain_files(folder: Path) -> None:
    """Refuse SQLite files that are symbolic links or not regular files, before SQLite opens them: it
    follows links, so the writer would change a file outside the gallery folder."""
    for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"):
        p = folder / name
        try:
            mode = os.lstat(p).st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise GalleryError(f"cannot read {p}: {exc.strerror}") from None
        if stat.S_ISLNK(mode):
            raise GalleryError(f"{p} is a symbolic link; a gallery's files must be plain files inside its folder")
        if not stat.S_ISREG(mode):
            raise GalleryError(f"{p} is not a regular file")


def _check_sqlite_header(db: Path) -> None:
    """Refuse a database file that is not SQLite or is shorter than its own header says (truncated),
    before SQLite touches it: such damage may otherwise surface only when a damaged page is read."""
    try:
        with S.open_regular(db) as fh:
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


def _checked_threshold(value: object, what: str) -> float:
    """A cosine threshold: a finite number in [-1, 1], else a one-line GalleryError (a NaN threshold
    would make every face unknown, a huge one likewise, silently)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = float("nan")
    if not -1.0 <= number <= 1.0:  # NaN fails this too
        raise GalleryError(f"{what} must be a cosine similarity in [-1, 1], got {value!r}")
    return number


def _stored_threshold(value: str | None, db: Path) -> float | None:
    """The threshold kept in a gallery's meta table (None when unset), checked as any threshold is."""
    if value in (None, "", "null"):
        return None
    return _checked_threshold(value, f"{db}: the stored threshold")


def _normal_name(name: str) -> str:
    """A name as stored and looked up: stripped and NFC-normalised."""
    if not isinstance(name, str):
        raise GalleryError(f"an identity name must be a string, got {type(name).__name__}")
    return unicodedata.normalize("NFC", name.strip())


def check_name(name: str) -> str:
    """The stored form of a new identity name (stripped, NFC-normalised), or a one-line GalleryError that
    shows it escaped: empty, longer than MAX_NAME, the reserved "unknown", or holding a control, format
    (bidi override, zero-width), line/paragraph separator, surrogate, private-use or unassigned character."""
    name = _normal_name(name)
    rule = f"1 to {MAX_NAME} printable characters"
    if not name:
        raise GalleryError(f"bad identity name {name!r}: {rule}")
    for c in name:
        if unicodedata.category(c) in _BAD_NAME_CATEGORIES:
            label = unicodedata.name(c, "")
            raise GalleryError(f"bad identity name {name[:80]!r}: U+{ord(c):04X}{f' {label}' if label else ''} "
                               f"is a control, format or separator character; use {rule}")
    if len(name) > MAX_NAME:
        raise GalleryError(f"bad identity name {name[:40]!r}... ({len(name)} characters): {rule}")
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
        self._built: S.BuiltIndex | None = None  # None until loaded (see open(load_index=False))
        self._ids = _IdMap(np.empty(0, np.int64), np.empty(0, np.int64))
        self._index_error: str | None = None  # why the index file could not be loaded, if it could not
        self._saved_generation: int | None = None  # generation of the index file on disk (writer)
        self.digest: int | None = None  # the embeddings digest at self.generation (writer)
        self.repaired: dict | None = None  # what open(repair=True) did with the old index file
        self._apply_meta(self._read_meta())

    def _apply_meta(self, meta: dict[str, str]) -> None:
        self.format = int(meta["format"])
        self.gallery_id = meta.get("gallery_id") or None
        self.dim = int(meta["dim"])
        self.fingerprint = meta["fingerprint"]
        self.spec = IndexSpec.from_json(meta["index"])
        self.scoring = meta.get("scoring", "best")
        self.threshold = _stored_threshold(meta.get("threshold"), self.path / DB_NAME)
        self.generation = int(meta["generation"])
        self.created = float(meta.get("created", 0.0))

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
        if threshold is not None:
            threshold = _checked_threshold(threshold, "threshold")
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
            meta = {"format": FORMAT_VERSION, "gallery_id": uuid.uuid4().hex, "dim": int(dim),
                    "fingerprint": fingerprint, "index": spec.to_json(), "scoring": scoring,
                    "threshold": "null" if threshold is None else float(threshold), "generation": 0,
                    "created": time.time()}
            conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", [(k, str(v)) for k, v in meta.items()])
            conn.execute("INSERT INTO index_digests(generation, digest) VALUES (0, ?)", (_hex(0),))
            conn.execute("COMMIT")
        except BaseException:
            lock.release()
            raise
        g = cls(path, conn, True, lock, save_interval, use_gpu)
        g.digest = 0
        g._built = S.empty_index(spec, g.dim)
        g._save()
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
        _check_plain_files(path)
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
                if mode == "w":
                    g._upgrade()
                if load_index:
                    g._load(repair)
                else:
                    gen, eids, idents, _ = g._db_state()
                    g.generation, g._ids = gen, _IdMap(eids, idents)
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

    def _upgrade(self) -> None:
        """Writer open: give a gallery made by an older facemeta what binding and provenance need, in
        one transaction, once: the content_hash column, a gallery id, and the digest of its embeddings
        at the current generation (one pass over the stored vectors)."""
        db = self.path / DB_NAME
        with _db_errors(db):
            columns = {r[1] for r in self._conn.execute("PRAGMA table_info(embeddings)")}
            tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            has_digest = "index_digests" in tables and self._conn.execute(
                "SELECT 1 FROM index_digests WHERE generation=?", (self.generation,)).fetchone()
            if self.format >= FORMAT_VERSION and self.gallery_id and "content_hash" in columns and has_digest:
                return
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                if "content_hash" not in columns:
                    self._conn.execute("ALTER TABLE embeddings ADD COLUMN content_hash TEXT")
                self._conn.execute(_DIGESTS_TABLE)
                self._conn.execute("INSERT OR REPLACE INTO index_digests(generation, digest) VALUES (?, ?)",
                                   (self.generation, _hex(self._digest_rows())))
                for key, value in (("gallery_id", self.gallery_id or uuid.uuid4().hex), ("format", FORMAT_VERSION)):
                    self._conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, str(value)))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        self._apply_meta(self._read_meta())

    def _digest_rows(self) -> int:
        """The embeddings digest computed from every stored row (one statement: one snapshot)."""
        total = 0
        for eid, blob in self._conn.execute("SELECT id, vector FROM embeddings"):
            total += row_digest(eid, blob)
        return total % _DIGEST_MOD

    def _db_state(self, also: int | None = None) -> tuple[int, np.ndarray, np.ndarray, dict[int, str]]:
        """(generation, embedding ids, identity ids, recorded digests) from one consistent read of the
        database; the digests are those of the current generation and of generation ``also``."""
        with _db_errors(self.path / DB_NAME):
            self._conn.execute("BEGIN")
            try:
                gen = int(self._conn.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])
                rows = self._conn.execute(
                    "SELECT id, identity_id FROM embeddings INDEXED BY embeddings_identity").fetchall()
                digests = self._recorded_digests(gen, also)
            finally:
                self._conn.execute("COMMIT")
        arr = np.array(rows, dtype=np.int64).reshape(-1, 2)
        return gen, arr[:, 0], arr[:, 1], digests

    def _recorded_digests(self, *generations: int | None) -> dict[int, str]:
        if self.format < 2:
            return {}
        wanted = sorted({g for g in generations if g is not None})
        q = f"SELECT generation, digest FROM index_digests WHERE generation IN ({','.join('?' * len(wanted))})"
        return {int(g): d for g, d in self._conn.execute(q, wanted)}

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

    def _all_vectors(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Every (id, vector) in id order and their digest, read in one snapshot (for rebuilding the index)."""
        db = self.path / DB_NAME
        digest = 0
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
                    digest += row_digest(eid, blob)
                    i += 1
            finally:
                self._conn.execute("COMMIT")
        return ids[:i], vecs[:i], digest % _DIGEST_MOD

    def _rebuild(self, spec: IndexSpec | None = None, fix_digest: bool = False) -> None:
        """Build the index from the database; ``fix_digest`` (repair) also stores the digest of the rows
        read when the recorded one differs (and forgets the older recorded digests)."""
        spec = spec or self.spec
        ids, vecs, digest = self._all_vectors()
        if fix_digest and digest != self.digest:
            with _db_errors(self.path / DB_NAME):
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._conn.execute("DELETE FROM index_digests")
                    self._conn.execute("INSERT INTO index_digests(generation, digest) VALUES (?, ?)",
                                       (self.generation, _hex(digest)))
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
            self.digest = digest
            if self.repaired is not None:
                self.repaired["digest_fixed"] = True
        self._built = S.build_index(spec, self.dim, vecs, ids)
        self._drop_gpu()

    def _header_problem(self, path: Path, header: dict, generation: int, digests: dict[int, str]) -> str | None:
        """Why the index file with this header is not the cache of this database at ``generation``
        (None when it is): another dimension, model or gallery, newer than the database, or stale."""
        if int(header["dim"]) != self.dim:
            return f"{path} holds {header['dim']}-d vectors but the gallery is {self.dim}-d"
        if header.get("fingerprint") != self.fingerprint:
            return (f"{path} belongs to model {header.get('fingerprint')!r}, "
                    f"but the gallery holds model {self.fingerprint!r}")
        gid, gen = header.get("gallery"), int(header["generation"])
        if gid is None:
            return f"{path} {_UNBOUND}"
        if self.gallery_id is None:
            return f"{path} cannot be checked: the gallery database was made by an older facemeta"
        if gid != self.gallery_id:
            return f"{path} belongs to another gallery (id {str(gid)[:32]!r}, this gallery is {self.gallery_id!r})"
        if gen > generation:
            return (f"{path} is newer than the database (generation {gen} > {generation}): the database was "
                    "restored from an older copy, or the index comes from another copy of this gallery")
        if gen not in digests:
            return f"{path} is stale (generation {gen}; the database no longer records that generation)"
        if header.get("digest") != digests[gen]:
            return f"{path} does not hold this database's embeddings (digest mismatch at generation {gen})"
        return None

    def _repair_hint(self, problem: str) -> GalleryError:
        self._index_error = problem
        return GalleryError(f"{problem}; the database is intact: `facemeta gallery repair "
                            f"{shlex.quote(str(self.path))}` rebuilds the index from it")

    def _remove_temp_files(self) -> None:
        """Delete index temporary files left by a writer killed mid-save (links are removed, not followed)."""
        for tmp in self.path.glob(f".{INDEX_NAME}.*.tmp"):
            with contextlib.suppress(OSError):
                if tmp.is_symlink() or tmp.is_file():
                    tmp.unlink()

    def _set_aside(self, index_path: Path, problem: str | None, damaged: bool) -> None:
        """Move the old index file aside (repair keeps it for inspection) under a name not yet taken."""
        base = f"{INDEX_NAME}.{'damaged' if damaged else 'replaced'}-{int(time.time())}"
        aside, n = index_path.with_name(base), 1
        while os.path.lexists(aside):
            aside, n = index_path.with_name(f"{base}.{n}"), n + 1
        os.replace(index_path, aside)
        self.repaired = {"aside": str(aside), "problem": problem, "digest_fixed": False}

    def _load(self, repair: bool) -> None:
        """Load the index file, check that it is this database's (see the module docstring), and bring
        it up to date; with ``repair`` set the file aside and rebuild from the database instead."""
        index_path = self.path / INDEX_NAME
        if self.writable:
            self._remove_temp_files()
        present = os.path.lexists(index_path)
        built, header, problem = None, None, None
        if present:
            try:
                built, header = S.load_index(index_path)
            except GalleryError as exc:
                problem = str(exc)
                if not repair:
                    raise self._repair_hint(problem) from None
        # The database is read after the file, so it is at least as new as the file's generation.
        gen, eids, idents, digests = self._db_state(None if header is None else int(header["generation"]))
        self.generation, self._ids = gen, _IdMap(eids, idents)
        if self.writable:
            self.digest = int(digests[gen], 16)  # _upgrade made sure it is recorded
        if header is not None:
            problem = self._header_problem(index_path, header, gen, digests)
        legacy = problem == f"{index_path} {_UNBOUND}"
        if repair:
            if present:
                self._set_aside(index_path, problem, damaged=problem is not None and not legacy)
            built = None
        elif problem and legacy and self.writable:
            built = None  # an index from before binding existed: the upgraded writer rebuilds it
        elif problem:
            raise self._repair_hint(problem)
        changed = False
        if built is not None and (built.spec.kind != self.spec.kind or built.spec.m != self.spec.m
                                  or built.spec.nlist != self.spec.nlist):
            built = None  # settings changed: rebuild
        if built is None:
            self._rebuild(fix_digest=repair)
            changed = True
        else:
            built.spec = self.spec  # search-time knobs follow the database
            S.set_search_params(built, self.spec)
            self._built = built
            self._saved_generation = int(header["generation"])
            present_ids = S.index_ids(built)
            if built.tombstones:
                present_ids = present_ids[~np.isin(present_ids, np.fromiter(built.tombstones, np.int64))]
            extra = np.setdiff1d(present_ids, eids, assume_unique=True)
            missing = np.setdiff1d(eids, present_ids, assume_unique=True)
            if len(extra):
                S.remove_ids(built, extra)
                changed = True
            if len(missing):
                S.add_vectors(built, self._fetch_vectors(missing), missing)
                changed = True
            if built.count != len(eids):
                self._rebuild()  # should not happen; the database wins
                changed = True
        self._index_error = None
        if self.writable and S.needs_rebuild(self._built):
            self._rebuild()
            changed = True
        if self.writable and changed:
            self._save()

    def _ensure_index(self) -> S.BuiltIndex:
        """The loaded index (loading and checking it now if the gallery was opened without it)."""
        if self._built is None:
            self._load(repair=False)
        return self._built

    # ------------------------------------------------------------------ saving

    def _save(self) -> None:
        S.save_index(self._built, self.path / INDEX_NAME, self.generation, self.fingerprint,
                     gallery=self.gallery_id, digest=_hex(self.digest))
        self._saved_generation = self.generation
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
    def _change(self) -> Iterator[_Change]:
        """One write transaction that also bumps the stored generation and records the new embeddings
        digest; rolled back on any error. The in-memory generation follows only once the commit has happened.
        """
        with _db_errors(self.path / DB_NAME):
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                tx = _Change(self._conn)
                yield tx
                gen = self.generation + 1
                digest = (self.digest + tx.delta) % _DIGEST_MOD
                self._conn.execute("UPDATE meta SET value=? WHERE key='generation'", (str(gen),))
                self._conn.execute("INSERT OR REPLACE INTO index_digests(generation, digest) VALUES (?, ?)",
                                   (gen, _hex(digest)))
                saved = gen if self._saved_generation is None else self._saved_generation
                self._conn.execute("DELETE FROM index_digests WHERE generation < ?", (min(saved, gen - DIGEST_KEEP),))
                _fault("before_commit")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        self.generation, self.digest = gen, digest

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
            x = self._check_vectors(vectors, fingerprint)
            names = [check_name(n) for n in names]
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
                        row = tx.execute("SELECT id FROM identities WHERE name=?", (name,)).fetchone()
                        if row is None:
                            ident = tx.execute("INSERT INTO identities(name, created) VALUES (?, ?)",
                                               (name, now)).lastrowid
                        else:
                            ident = row[0]
                        known[name] = ident
                    blob = vec.tobytes()
                    cur = tx.execute(
                        "INSERT INTO embeddings(identity_id, source, score, fingerprint, created, vector, content_hash) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (ident, None if src is None else str(src), None if score is None else float(score),
                         fingerprint, now, blob, digest))
                    tx.added(cur.lastrowid, blob)
                    new_ids.append(cur.lastrowid)
                    new_idents.append(ident)
            _fault("after_commit")
            ids = np.array(new_ids, np.int64)
            S.add_vectors(self._built, x, ids)
            self._ids.add(ids, np.array(new_idents, np.int64))
            self._after_change()
            return new_ids

    def _identity_id(self, name: str) -> int:
        """The database id of an identity, looked up by its stored form (stripped, NFC); a name stored
        by an older facemeta before normalisation is still found as given."""
        key = _normal_name(name)
        row = self._conn.execute("SELECT id FROM identities WHERE name=?", (key,)).fetchone()
        if row is None and key != name.strip():
            row = self._conn.execute("SELECT id FROM identities WHERE name=?", (name.strip(),)).fetchone()
        if row is None:
            raise GalleryError(f"no identity named {key[:80]!r} in gallery {self.path}")
        return int(row[0])

    def remove(self, name: str) -> int:
        """Remove an identity and all its embeddings (one transaction); returns how many embeddings went."""
        with self._mutex:
            self._check_open(write=True)
            with _db_errors(self.path / DB_NAME):
                ident = self._identity_id(name)
            with self._change() as tx:
                rows = tx.execute("SELECT id, vector FROM embeddings WHERE identity_id=?", (ident,)).fetchall()
                for eid, blob in rows:
                    tx.removed(eid, blob)
                tx.execute("DELETE FROM embeddings WHERE identity_id=?", (ident,))
                tx.execute("DELETE FROM identities WHERE id=?", (ident,))
            eids = [r[0] for r in rows]
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
            with self._change() as tx:
                for i in ids:
                    row = tx.execute("SELECT vector FROM embeddings WHERE id=?", (i,)).fetchone()
                    if row is not None:
                        tx.removed(i, row[0])
                        gone += tx.execute("DELETE FROM embeddings WHERE id=?", (i,)).rowcount
                tx.execute("DELETE FROM identities WHERE id NOT IN (SELECT identity_id FROM embeddings)")
            present = [i for i in ids if self._ids.lookup(np.array([i]))[0] >= 0]
            S.remove_ids(self._built, present)
            self._ids.remove(np.array(present, np.int64))
            self._after_change()
            return gone

    def rename(self, old: str, new: str) -> None:
        """Rename an identity (the index is untouched: it stores embedding ids, not names)."""
        with self._mutex:
            self._check_open(write=True)
            new = check_name(new)
            with _db_errors(self.path / DB_NAME):
                ident = self._identity_id(old)
                row = self._conn.execute("SELECT id FROM identities WHERE name=?", (new,)).fetchone()
                if row is not None and row[0] != ident:
                    raise GalleryError(f"an identity named {new!r} already exists; remove it first or pick another name")
            with self._change() as tx:
                tx.execute("UPDATE identities SET name=? WHERE id=?", (new, ident))

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
            if threshold is not None and not clear_threshold:
                threshold = _checked_threshold(threshold, "a gallery's threshold")
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
            gen, eids, idents, _ = self._db_state()
            if self._built is not None:
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
            self.threshold = _stored_threshold(meta.get("threshold"), self.path / DB_NAME)
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
            content = "e.content_hash" if self.format >= 2 else "NULL"
            q = (f"SELECT e.id, i.name, e.source, e.score, e.fingerprint, e.created, {content} FROM embeddings e "
                 "JOIN identities i ON i.id = e.identity_id")
            with _db_errors(self.path / DB_NAME):
                if name is None:
                    rows = self._conn.execute(q + " ORDER BY e.id").fetchall()
                else:
                    ident = self._identity_id(name)
                    rows = self._conn.execute(q + " WHERE i.id=? ORDER BY e.id", (ident,)).fetchall()
            return [Record(*r) for r in rows]

    def content_hashes(self, name: str) -> set[str]:
        """The content hashes (e.g. sha256 of the source files) already stored for an identity; empty
        for a name not in the gallery."""
        with self._mutex:
            self._check_open()
            if self.format < 2:
                return set()
            with _db_errors(self.path / DB_NAME):
                try:
                    ident = self._identity_id(name)
                except GalleryError:
                    return set()
                rows = self._conn.execute("SELECT content_hash FROM embeddings WHERE identity_id=? "
                                          "AND content_hash IS NOT NULL", (ident,)).fetchall()
            return {r[0] for r in rows}

    def vectors(self, name: str) -> np.ndarray:
        """The stored (unit) embeddings of one identity, [n, dim]."""
        with self._mutex:
            self._check_open()
            with _db_errors(self.path / DB_NAME):
                ident = self._identity_id(name)
                blobs = self._conn.execute("SELECT vector FROM embeddings WHERE identity_id=? ORDER BY id",
                                           (ident,)).fetchall()
            return np.stack([np.frombuffer(b[0], np.float32) for b in blobs]) if blobs else np.empty((0, self.dim), np.float32)

    def index_status(self) -> str:
        """"ok", or why the index cannot serve searches ("needs repair: ..."). An index not loaded yet
        (``open(load_index=False)``) is judged by its file without loading it: length, checksum, and
        the header's binding to this database, dimension and model (``check`` compares the vectors)."""
        with self._mutex:
            self._check_open()
            hint = f"; `facemeta gallery repair {shlex.quote(str(self.path))}` rebuilds it from the database"
            if self._built is not None:
                return "ok"
            if self._index_error:
                return f"needs repair: {self._index_error}{hint}"
            path = self.path / INDEX_NAME
            if not os.path.lexists(path):
                return "missing (it is rebuilt from the database when the gallery is opened)"
            try:
                header = S.read_index_header(path, verify=True)
                with _db_errors(self.path / DB_NAME):
                    self._conn.execute("BEGIN")
                    try:
                        gen = int(self._conn.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])
                        digests = self._recorded_digests(gen, int(header["generation"]))
                    finally:
                        self._conn.execute("COMMIT")
                problem = self._header_problem(path, header, gen, digests)
            except GalleryError as exc:
                problem = str(exc)
            return "ok" if problem is None else f"needs repair: {problem}{hint}"

    def info(self) -> dict:
        """A summary: sizes, model, gallery id, index kind (requested and built) and status, scoring,
        threshold, files. Works from the database alone when the index is not loaded."""
        with self._mutex:
            self._check_open()
            with _db_errors(self.path / DB_NAME):
                n_ids = self._conn.execute("SELECT COUNT(*) FROM identities").fetchone()[0]
            idx = self.path / INDEX_NAME
            status = self.index_status()
            built, header = self._built, {}
            if built is None and status == "ok":
                header = S.read_index_header(idx)
            return {"path": str(self.path), "identities": int(n_ids), "embeddings": len(self._ids),
                    "dim": self.dim, "fingerprint": self.fingerprint, "gallery_id": self.gallery_id,
                    "index": self.spec.kind,
                    "index_built": built.kind if built is not None else header.get("kind"),
                    "index_settings": json.loads(self.spec.to_json()),
                    "nlist": (built.nlist if built is not None else header.get("nlist")) or None,
                    "index_status": status, "scoring": self.scoring, "threshold": self.threshold,
                    "generation": self.generation, "created": self.created, "gpu": self._gpu is not None,
                    "db_bytes": (self.path / DB_NAME).stat().st_size,
                    "index_bytes": os.lstat(idx).st_size if os.path.lexists(idx) else 0}

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
            self._ensure_index()
            if refresh and not self.writable:
                self.refresh()
            threshold = self.threshold if threshold is None else _checked_threshold(threshold, "threshold")
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
        """Full integrity check: SQLite's integrity_check, the recorded embeddings digest against the stored
        rows, and the index against the database: the same ids holding the same vectors (a foreign or
        stale index fails; one that cannot be loaded fails too, and ``index_status`` says why)."""
        with self._mutex:
            self._check_open()
            db = self.path / DB_NAME
            with _db_errors(db):
                result = self._conn.execute("PRAGMA integrity_check").fetchall()
                problems = [] if result == [("ok",)] else [r[0] for r in result[:5]]
                if self.format >= 2 and not problems:
                    self._conn.execute("BEGIN")
                    try:
                        gen = int(self._conn.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])
                        recorded = self._recorded_digests(gen).get(gen)
                        actual = _hex(self._digest_rows())
                    finally:
                        self._conn.execute("COMMIT")
                    if recorded != actual:
                        problems.append("the recorded embeddings digest does not match the stored embeddings "
                                        "(`facemeta gallery repair` recomputes it)")
            try:
                built = self._ensure_index()
                if not self.writable:
                    self.refresh()
            except GalleryError:
                built = None
            _, eids, _, _ = self._db_state()
            matches = False
            if built is not None:
                present = S.index_ids(built)
                if built.tombstones:
                    present = present[~np.isin(present, np.fromiter(built.tombstones, np.int64))]
                matches = bool(np.array_equal(np.sort(present), np.sort(eids))) and self._same_vectors(built, eids)
            return {"database": "ok" if not problems else "; ".join(problems), "index_matches_database": matches,
                    "embeddings": len(eids), "index_count": built.count if built is not None else 0}

    def _same_vectors(self, built: S.BuiltIndex, eids: np.ndarray) -> bool:
        """Whether the index holds the database's vector under every id (8-bit codes within SQ8_TOLERANCE)."""
        for ids, held in S.stored_vectors(built, eids):
            stored = self._fetch_vectors(ids)
            if built.kind == "ivf_sq8":
                if len(ids) and float(np.abs(held - stored).max()) > SQ8_TOLERANCE:
                    return False
            elif not np.array_equal(held, stored):
                return False
        return True
