"""The SQLite database file of a gallery (``gallery.sqlite``): its schema, creating and opening it,
checking its file before SQLite reads it, and the embeddings digest's arithmetic.

Tables: identities; embeddings, one row per enrolled image (source path, sha256 of the source file's
bytes, detector score, model fingerprint, time) with the float32 embedding as a BLOB; meta (format,
gallery id, dimension, fingerprint, index settings, scoring, threshold, generation); index_digests
(the embeddings digest of recent generations). records.py reads and changes them.

The digest of a gallery's embeddings is the sum modulo 2^128 of a 128-bit BLAKE2b hash of each row's
(id, vector bytes) (``row_digest``), so rows can be added and removed in any order.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from facemeta.errors import GalleryError
from facemeta.gallery.files import open_regular

FORMAT_VERSION = 2  # 2: gallery id, embeddings digest (index_digests), embeddings.content_hash
DIGEST_MOD = 1 << 128  # a gallery's digest is a sum of row digests modulo this

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


def row_digest(eid: int, blob: bytes) -> int:
    """128-bit BLAKE2b hash of one stored embedding (its id and float32 bytes); a gallery's digest is
    the sum of these modulo 2^128, so rows can be added and removed in any order."""
    h = hashlib.blake2b(int(eid).to_bytes(8, "little", signed=True), digest_size=16)
    h.update(blob)
    return int.from_bytes(h.digest(), "little")


def hex_digest(digest: int) -> str:
    """A digest as stored in ``index_digests`` and in the index file's header (32 hex digits)."""
    return f"{digest % DIGEST_MOD:032x}"


@contextlib.contextmanager
def db_errors(path: Path) -> Iterator[None]:
    """Turn SQLite failures into one-line GalleryErrors."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc)
        if "locked" in text or "busy" in text:
            raise GalleryError(f"gallery database {path} is busy: {text}") from None
        if "disk is full" in text or ("disk I/O error" in text and _full(path)):
            raise GalleryError(f"disk full: gallery database {path} has no space left; the change in flight was "
                               "not committed (every change before it is)") from None
        if "readonly" in text or "read-only" in text:
            raise GalleryError(f"gallery database {path} is read-only (a read-only file, folder or mount): "
                               "this command changes it") from None
        raise GalleryError(f"gallery database {path} is unreadable or corrupt: {text}") from None
    except sqlite3.DatabaseError as exc:
        raise GalleryError(f"gallery database {path} is corrupt: {exc}") from None


def _full(path: Path) -> bool:
    """Whether the file system holding ``path`` has no block left for this user (SQLite reports a full disk
    while writing its WAL as an I/O error)."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    return st.f_bavail == 0


def check_sqlite_header(db: Path) -> None:
    """Refuse a database file that is not SQLite or is shorter than its own header says (truncated),
    before SQLite touches it: such damage may otherwise surface only when a damaged page is read."""
    try:
        with open_regular(db) as fh:
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


def create_database(db: Path, *, dim: int, fingerprint: str, index: str, scoring: str,
                    threshold: float | None, extra: dict[str, str] | None = None) -> sqlite3.Connection:
    """Create the database of a new gallery (schema, meta at generation 0 with a new gallery id, the
    digest of no embeddings, plus the ``extra`` meta values, e.g. the search backend) in one transaction
    and return its connection, open for writing."""
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("BEGIN IMMEDIATE")
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    meta = {"format": FORMAT_VERSION, "gallery_id": uuid.uuid4().hex, "dim": int(dim),
            "fingerprint": fingerprint, "index": index, "scoring": scoring,
            "threshold": "null" if threshold is None else float(threshold), "generation": 0,
            "created": time.time(), **(extra or {})}
    conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", [(k, str(v)) for k, v in meta.items()])
    conn.execute("INSERT INTO index_digests(generation, digest) VALUES (0, ?)", (hex_digest(0),))
    conn.execute("COMMIT")
    return conn


def connect(db: Path, writable: bool) -> sqlite3.Connection:
    """Open an existing gallery database: read-write (synchronous=FULL) for the writer, read-only for readers."""
    if writable:
        conn = sqlite3.connect(f"file:{db}?mode=rw", uri=True, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA synchronous=FULL")
    else:
        conn = sqlite3.connect(f"file:{db}?{_reader_mode(db)}", uri=True, isolation_level=None,
                               check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def _reader_mode(db: Path) -> str:
    """How a reader opens the database: ``mode=ro``, or, where the folder cannot be written (a read-only
    mount or folder: SQLite could not create the WAL's shared-memory file), ``immutable=1``, which is safe
    there because no one can change the file; a read-only folder holding an unfinished WAL is refused."""
    if os.access(db.parent, os.W_OK):
        return "mode=ro"
    wal, shm = db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")
    if wal.exists() and wal.stat().st_size > 0 and shm.exists():
        return "mode=ro"  # SQLite (3.22 and later) reads a WAL beside its shared-memory file without writing
    if wal.exists() and wal.stat().st_size > 0:
        raise GalleryError(f"gallery {db.parent} is read-only and its last changes are still in {wal.name}: "
                           "open it once where it can be written (e.g. `facemeta gallery info`) to fold them in")
    return "mode=ro&immutable=1"
