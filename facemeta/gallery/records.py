"""The records of a gallery: reading and changing the identities, embeddings and meta in its SQLite
database (schema.py), the source of truth; FAISS is only its cache.

Durability: every change is one SQLite transaction (WAL, synchronous=FULL) that also bumps the
generation (``Records.change``). Embedding ids are never reused (AUTOINCREMENT), so an index that
lags the database can be brought up to date by id.

Digest: each gallery has a random id (given at creation, or to an older gallery on its first writer
open, ``Records.upgrade``) and a digest of its embeddings (schema.row_digest). Each change transaction
updates the digest by the rows it adds or removes (its cost is those rows, never the whole gallery)
and records it in ``index_digests`` under the new generation; rows older than both the last saved
index and the last ``DIGEST_KEEP`` generations are pruned. Repair recomputes it from the rows
(``Records.reset_digests``).

Provenance: each embedding keeps its source (the enrolled file's path) and ``content_hash`` (sha256
of the file's bytes), so a rerun of an interrupted enroll can skip the photos already enrolled.

Readers open the database read-only and take no lock; WAL gives each read a consistent snapshot.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facemeta.errors import GalleryError
from facemeta.gallery.schema import DIGEST_MOD, FORMAT_VERSION, db_errors, hex_digest, row_digest
from facemeta.gallery.validate import normal_name

DIGEST_KEEP = 1000  # generations of digests kept beyond the last saved index (for readers racing a save)
_DIGESTS_TABLE = "CREATE TABLE IF NOT EXISTS index_digests (generation INTEGER PRIMARY KEY, digest TEXT NOT NULL)"


def fault(point: str) -> None:
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
    """One stored embedding's metadata (the vector itself is in the database); ``content_hash`` is the
    sha256 of the source file's bytes when the enroller gave it."""

    id: int
    identity: str
    source: str | None
    score: float | None
    fingerprint: str
    created: float
    content_hash: str | None = None


class Change:
    """An open write transaction: its connection, and the change its added and removed rows make to
    the embeddings digest."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.delta = 0

    def execute(self, sql: str, params: Sequence = ()) -> sqlite3.Cursor:
        """Run one statement inside the transaction."""
        return self.conn.execute(sql, params)

    def added(self, eid: int, blob: bytes) -> None:
        """Count a stored row into the digest change."""
        self.delta += row_digest(eid, blob)

    def removed(self, eid: int, blob: bytes) -> None:
        """Count a deleted row out of the digest change."""
        self.delta -= row_digest(eid, blob)

    def identity(self, name: str, now: float) -> int:
        """The id of the identity with this (stored-form) name, created if new."""
        row = self.execute("SELECT id FROM identities WHERE name=?", (name,)).fetchone()
        if row is not None:
            return row[0]
        return self.execute("INSERT INTO identities(name, created) VALUES (?, ?)", (name, now)).lastrowid

    def add_embedding(self, ident: int, blob: bytes, *, source: str | None, score: float | None,
                      fingerprint: str, created: float, content_hash: str | None) -> int:
        """Store one embedding of an identity (and count it into the digest); returns its new id."""
        cur = self.execute(
            "INSERT INTO embeddings(identity_id, source, score, fingerprint, created, vector, content_hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (ident, None if source is None else str(source), None if score is None else float(score),
             fingerprint, created, blob, content_hash))
        self.added(cur.lastrowid, blob)
        return cur.lastrowid

    def remove_identity(self, ident: int) -> list[int]:
        """Delete an identity and all its embeddings; returns the embedding ids that went."""
        rows = self.execute("SELECT id, vector FROM embeddings WHERE identity_id=?", (ident,)).fetchall()
        for eid, blob in rows:
            self.removed(eid, blob)
        self.execute("DELETE FROM embeddings WHERE identity_id=?", (ident,))
        self.execute("DELETE FROM identities WHERE id=?", (ident,))
        return [r[0] for r in rows]

    def rename_identity(self, ident: int, name: str) -> None:
        """Give an identity another (checked, stored-form) name."""
        self.execute("UPDATE identities SET name=? WHERE id=?", (name, ident))

    def remove_embeddings(self, ids: Sequence[int]) -> int:
        """Delete single embeddings by id (absent ids are skipped) and identities left with none;
        returns how many embeddings went."""
        gone = 0
        for i in ids:
            row = self.execute("SELECT vector FROM embeddings WHERE id=?", (i,)).fetchone()
            if row is not None:
                self.removed(i, row[0])
                gone += self.execute("DELETE FROM embeddings WHERE id=?", (i,)).rowcount
        self.execute("DELETE FROM identities WHERE id NOT IN (SELECT identity_id FROM embeddings)")
        return gone


class Records:
    """The records of one open gallery: its SQLite connection, the database path (for messages), and
    what the Gallery read from its meta table (``read_meta``): format, gallery id, dimension and model
    fingerprint, and the generation it is at with, for the writer, the embeddings digest there."""

    def __init__(self, conn: sqlite3.Connection, db: Path) -> None:
        self.conn = conn
        self.db = db
        self.format = 0
        self.gallery_id: str | None = None
        self.dim = 0
        self.fingerprint = ""
        self.generation = 0
        self.digest: int | None = None  # the embeddings digest at self.generation (writer)

    def read_meta(self) -> dict[str, str]:
        """The meta table, checked (present, complete, a format this facemeta understands)."""
        with db_errors(self.db):
            try:
                rows = self.conn.execute("SELECT key, value FROM meta").fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    raise GalleryError(f"{self.db} is not a facemeta gallery (no meta table)") from None
                raise
        meta = dict(rows)
        missing = {"format", "dim", "fingerprint", "index", "generation"} - meta.keys()
        if missing:
            raise GalleryError(f"{self.db} is incomplete (missing {', '.join(sorted(missing))})")
        if int(meta["format"]) > FORMAT_VERSION:
            raise GalleryError(f"gallery format {meta['format']} is newer than this facemeta understands")
        return meta

    def set_meta(self, updates: dict[str, str]) -> None:
        """Store meta values (settings that leave the embeddings and the generation alone)."""
        with db_errors(self.db):
            self.conn.execute("BEGIN IMMEDIATE")
            for k, v in updates.items():
                self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (k, v))
            self.conn.execute("COMMIT")

    def upgrade(self) -> bool:
        """Writer open: give a gallery made by an older facemeta what binding and provenance need, in
        one transaction, once: the content_hash column, a gallery id, and the digest of its embeddings
        at the current generation (one pass over the stored vectors). True when it changed anything."""
        with db_errors(self.db):
            columns = {r[1] for r in self.conn.execute("PRAGMA table_info(embeddings)")}
            tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            has_digest = "index_digests" in tables and self.conn.execute(
                "SELECT 1 FROM index_digests WHERE generation=?", (self.generation,)).fetchone()
            if self.format >= FORMAT_VERSION and self.gallery_id and "content_hash" in columns and has_digest:
                return False
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                if "content_hash" not in columns:
                    self.conn.execute("ALTER TABLE embeddings ADD COLUMN content_hash TEXT")
                self.conn.execute(_DIGESTS_TABLE)
                self.conn.execute("INSERT OR REPLACE INTO index_digests(generation, digest) VALUES (?, ?)",
                                  (self.generation, hex_digest(self.digest_rows())))
                for key, value in (("gallery_id", self.gallery_id or uuid.uuid4().hex), ("format", FORMAT_VERSION)):
                    self.conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, str(value)))
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:  # SQLite ends it itself on some errors (a full disk)
                    self.conn.execute("ROLLBACK")
                raise
        return True

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """A read transaction: every read inside sees one consistent state of the database."""
        with db_errors(self.db):
            self.conn.execute("BEGIN")
            try:
                yield
            finally:
                self.conn.execute("COMMIT")

    def current_generation(self) -> int:
        """The generation the database is at now (``generation`` is the one last read)."""
        with db_errors(self.db):
            return int(self.conn.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])

    def digest_rows(self) -> int:
        """The embeddings digest computed from every stored row (one statement: one snapshot)."""
        total = 0
        for eid, blob in self.conn.execute("SELECT id, vector FROM embeddings"):
            total += row_digest(eid, blob)
        return total % DIGEST_MOD

    def recorded_digests(self, *generations: int | None) -> dict[int, str]:
        """The embeddings digests recorded for these generations (those still kept), by generation."""
        if self.format < 2:
            return {}
        wanted = sorted({g for g in generations if g is not None})
        q = f"SELECT generation, digest FROM index_digests WHERE generation IN ({','.join('?' * len(wanted))})"
        with db_errors(self.db):
            return {int(g): d for g, d in self.conn.execute(q, wanted)}

    def generation_digests(self, also: int | None = None) -> tuple[int, dict[int, str]]:
        """(generation, recorded digests of it and of generation ``also``) from one consistent read."""
        with self.snapshot():
            gen = self.current_generation()
            return gen, self.recorded_digests(gen, also)

    def state(self, also: int | None = None) -> tuple[int, np.ndarray, np.ndarray, dict[int, str]]:
        """(generation, embedding ids, identity ids, recorded digests) from one consistent read of the
        database; the digests are those of the current generation and of generation ``also``."""
        with self.snapshot():
            gen = self.current_generation()
            rows = self.conn.execute("SELECT id, identity_id FROM embeddings INDEXED BY embeddings_identity").fetchall()
            digests = self.recorded_digests(gen, also)
        arr = np.array(rows, dtype=np.int64).reshape(-1, 2)
        return gen, arr[:, 0], arr[:, 1], digests

    def reset_digests(self, digest: int) -> None:
        """Repair: forget every recorded digest and record ``digest`` (computed from the rows) as the
        current generation's."""
        with db_errors(self.db):
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                self.conn.execute("DELETE FROM index_digests")
                self.conn.execute("INSERT INTO index_digests(generation, digest) VALUES (?, ?)",
                                  (self.generation, hex_digest(digest)))
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:  # SQLite ends it itself on some errors (a full disk)
                    self.conn.execute("ROLLBACK")
                raise
        self.digest = digest

    @contextlib.contextmanager
    def change(self, saved_generation: int | None) -> Iterator[Change]:
        """One write transaction that also bumps the stored generation and records the new embeddings
        digest (plus what the transaction's rows changed), pruning digests older than both
        ``saved_generation`` (the index file's) and the last DIGEST_KEEP; rolled back on any error.
        The in-memory generation and digest follow only once the commit has happened."""
        with db_errors(self.db):
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                tx = Change(self.conn)
                yield tx
                gen = self.generation + 1
                digest = (self.digest + tx.delta) % DIGEST_MOD
                self.conn.execute("UPDATE meta SET value=? WHERE key='generation'", (str(gen),))
                self.conn.execute("INSERT OR REPLACE INTO index_digests(generation, digest) VALUES (?, ?)",
                                  (gen, hex_digest(digest)))
                saved = gen if saved_generation is None else saved_generation
                self.conn.execute("DELETE FROM index_digests WHERE generation < ?", (min(saved, gen - DIGEST_KEEP),))
                fault("before_commit")
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:  # SQLite ends it itself on some errors (a full disk)
                    self.conn.execute("ROLLBACK")
                raise
        self.generation, self.digest = gen, digest

    def integrity_problems(self) -> list[str]:
        """What SQLite's integrity_check finds (at most five), or else whether the recorded embeddings
        digest differs from the stored rows'; empty when the database is sound."""
        with db_errors(self.db):
            result = self.conn.execute("PRAGMA integrity_check").fetchall()
            problems = [] if result == [("ok",)] else [r[0] for r in result[:5]]
            if self.format >= 2 and not problems:
                with self.snapshot():
                    gen = self.current_generation()
                    recorded = self.recorded_digests(gen).get(gen)
                    actual = hex_digest(self.digest_rows())
                if recorded != actual:
                    problems.append("the recorded embeddings digest does not match the stored embeddings "
                                    "(`facemeta gallery repair` recomputes it)")
        return problems

    # ------------------------------------------------------------------ embeddings

    def _blob_vector(self, eid: int, blob: bytes) -> np.ndarray:
        if len(blob) != 4 * self.dim:
            raise GalleryError(f"gallery database {self.db} is corrupt (embedding {eid} has {len(blob)} bytes)")
        return np.frombuffer(blob, np.float32)

    def fetch_vectors(self, eids: np.ndarray) -> np.ndarray:
        """Stored vectors of the given embedding ids, in that order."""
        out = np.empty((len(eids), self.dim), np.float32)
        pos = {int(e): i for i, e in enumerate(eids)}
        with db_errors(self.db):
            chunk = 900
            eids_list = [int(e) for e in eids]
            for start in range(0, len(eids_list), chunk):
                part = eids_list[start:start + chunk]
                q = f"SELECT id, vector FROM embeddings WHERE id IN ({','.join('?' * len(part))})"
                for eid, blob in self.conn.execute(q, part):
                    out[pos[eid]] = self._blob_vector(eid, blob)
                    pos.pop(eid)
        if pos:
            raise GalleryError(f"gallery database {self.db} changed while reading (embeddings {sorted(pos)[:5]} vanished)")
        return out

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Every (id, vector) in id order and their digest, read in one snapshot (for rebuilding the index)."""
        digest = 0
        with self.snapshot():
            n = self.conn.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]
            ids = np.empty(n, np.int64)
            vecs = np.empty((n, self.dim), np.float32)
            i = 0
            for eid, blob in self.conn.execute("SELECT id, vector FROM embeddings ORDER BY id"):
                vecs[i] = self._blob_vector(eid, blob)
                ids[i] = eid
                digest += row_digest(eid, blob)
                i += 1
        return ids[:i], vecs[:i], digest % DIGEST_MOD

    def identity_vectors(self, ident: int) -> tuple[np.ndarray, np.ndarray]:
        """(embedding ids, [n, dim] vectors) of one identity, in id order."""
        with db_errors(self.db):
            rows = self.conn.execute("SELECT id, vector FROM embeddings WHERE identity_id=? ORDER BY id",
                                     (ident,)).fetchall()
        eids = np.array([r[0] for r in rows], np.int64)
        vecs = np.stack([np.frombuffer(r[1], np.float32) for r in rows]) if rows else np.empty((0, self.dim), np.float32)
        return eids, vecs

    # ------------------------------------------------------------------ identities

    def identity_id(self, name: str) -> int:
        """The database id of an identity, looked up by its stored form (stripped, NFC); a name stored
        by an older facemeta before normalisation is still found as given."""
        key = normal_name(name)
        with db_errors(self.db):
            row = self.conn.execute("SELECT id FROM identities WHERE name=?", (key,)).fetchone()
            if row is None and key != name.strip():
                row = self.conn.execute("SELECT id FROM identities WHERE name=?", (name.strip(),)).fetchone()
        if row is None:
            raise GalleryError(f"no identity named {key[:80]!r} in gallery {self.db.parent}")
        return int(row[0])

    def owner_of(self, name: str) -> int | None:
        """The id of the identity stored under exactly this name, or None."""
        with db_errors(self.db):
            row = self.conn.execute("SELECT id FROM identities WHERE name=?", (name,)).fetchone()
        return None if row is None else row[0]

    def names(self, idents: set[int]) -> dict[int, str]:
        """Names of the given identity ids (ids no longer present are left out)."""
        if not idents:
            return {}
        ids = sorted(idents)
        q = f"SELECT id, name FROM identities WHERE id IN ({','.join('?' * len(ids))})"
        with db_errors(self.db):
            return dict(self.conn.execute(q, ids).fetchall())

    def count_identities(self) -> int:
        """How many identities the gallery holds."""
        with db_errors(self.db):
            return int(self.conn.execute("SELECT COUNT(*) FROM identities").fetchone()[0])

    def identities(self) -> list[Identity]:
        """Every identity with its embedding count, sorted by name."""
        with db_errors(self.db):
            rows = self.conn.execute(
                "SELECT i.name, i.id, COUNT(e.id), i.created FROM identities i "
                "LEFT JOIN embeddings e ON e.identity_id = i.id GROUP BY i.id ORDER BY i.name").fetchall()
        return [Identity(n, int(i), int(c), float(t)) for n, i, c, t in rows]

    def records(self, name: str | None = None) -> list[Record]:
        """Metadata of stored embeddings (all, or one identity's), in enrollment order."""
        content = "e.content_hash" if self.format >= 2 else "NULL"
        q = (f"SELECT e.id, i.name, e.source, e.score, e.fingerprint, e.created, {content} FROM embeddings e "
             "JOIN identities i ON i.id = e.identity_id")
        with db_errors(self.db):
            if name is None:
                rows = self.conn.execute(q + " ORDER BY e.id").fetchall()
            else:
                ident = self.identity_id(name)
                rows = self.conn.execute(q + " WHERE i.id=? ORDER BY e.id", (ident,)).fetchall()
        return [Record(*r) for r in rows]

    def content_hashes(self, name: str) -> set[str]:
        """The content hashes already stored for an identity; empty for a name not in the gallery."""
        if self.format < 2:
            return set()
        with db_errors(self.db):
            try:
                ident = self.identity_id(name)
            except GalleryError:
                return set()
            rows = self.conn.execute("SELECT content_hash FROM embeddings WHERE identity_id=? "
                                     "AND content_hash IS NOT NULL", (ident,)).fetchall()
        return {r[0] for r in rows}
