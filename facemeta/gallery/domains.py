"""Named domains of a gallery (DESIGN.md, "Domains at deployment"): where photos come from (a camera, a sketch
artist, a scanner), with statistics of the model's embeddings on unlabelled photos of it (domain_stats.py).

Stored in the gallery's SQLite database, the source of truth, added on first use (a gallery that never names a
domain is left exactly as it was):

    domains        name, model fingerprint, statistics (JSON of DomainStats.to_dict), calibrated threshold,
                   its false-accept rate and impostor pairs, times
    domain_photos  one row per unlabelled photo behind a domain: its sha256 (a photo is counted once), source,
                   and raw float32 embedding (so more photos refine the estimate, and a change of statistic
                   needs no image)
    embeddings     two columns: ``domain`` (NULL: the default domain, no normalisation) and ``raw`` (the
                   embedding as the model gave it); ``vector`` holds the normalised one the index searches

When a domain's statistics change, every embedding enrolled under it is normalised again from its raw vector
in the same transaction and stored under a NEW embedding id (the old row goes): the index, a cache kept up to
date by id (index_cache.py, milvus_index.py), then swaps the vectors by id, readers included, and a crash at
any point leaves the database and the index consistent. No image is read. Functions here take an open
``Gallery`` (store.py) and run under its lock; they use its records, index and change transaction.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from dataclasses import dataclass

import numpy as np

from facemeta.errors import GalleryError
from facemeta.gallery.domain_stats import (
    DomainStats,
    estimate,
    normalise,
    offset_stats,
    reference_of,
    with_strength,
)
from facemeta.gallery.records import fault
from facemeta.gallery.schema import db_errors
from facemeta.gallery.validate import check_name, normal_name

DEFAULT_DOMAIN = None  # a photo without a domain: compared as the model embeds it (no normalisation)
DEFAULT_DESCRIPTION = "default (no normalisation: vectors compared as the model gives them)"
FEW_PHOTOS = 10  # below this many photos a domain's estimate is rough (the benchmark's 10-photo point)

_TABLES = """
CREATE TABLE IF NOT EXISTS domains (
    name TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    stats TEXT NOT NULL,
    threshold REAL,
    far REAL,
    calibration_pairs INTEGER,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS domain_photos (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    domain TEXT NOT NULL,
    content_hash TEXT,
    source TEXT,
    vector BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS domain_photos_domain ON domain_photos(domain);
CREATE INDEX IF NOT EXISTS embeddings_domain ON embeddings(domain);
"""


@dataclass(frozen=True)
class Domain:
    """One domain of a gallery: name, model fingerprint, statistics, the photos behind them, how many
    enrolled embeddings use it, the relative standard error of its mean (None with one photo), and the
    calibrated threshold with its false-accept rate and impostor pairs (None until calibrated)."""

    name: str
    fingerprint: str
    stats: DomainStats
    photos: int
    enrolled: int
    stability: float | None
    threshold: float | None = None
    far: float | None = None
    calibration_pairs: int | None = None

    @property
    def stability_word(self) -> str:
        """'stable', 'fair' or 'rough' (relative standard error of the mean below 0.1, 0.25, above), or
        'unknown' with a single photo."""
        if self.stability is None:
            return "unknown"
        return "stable" if self.stability < 0.1 else "fair" if self.stability < 0.25 else "rough"

    def to_dict(self) -> dict:
        """JSON-ready summary (no vectors)."""
        return {"name": self.name, "photos": self.photos, "enrolled": self.enrolled, "kind": self.stats.kind,
                "strength": self.stats.strength,
                "stability": None if self.stability is None else round(self.stability, 4),
                "stability_word": self.stability_word, "threshold": self.threshold, "far": self.far,
                "calibration_pairs": self.calibration_pairs, "fingerprint": self.fingerprint}


def check_domain_name(name: str) -> str:
    """The stored form of a domain name, checked as person names are (validate.check_name)."""
    try:
        return check_name(name)
    except GalleryError as exc:
        raise GalleryError(str(exc).replace("identity name", "domain name")) from None


def check_new_domain(gallery, name: str) -> str:
    """A domain name checked (:func:`check_domain_name`) and, when the gallery has no domain of exactly that name,
    refused if it looks like one it has (validate.check_unlike: case, width, invisible characters)."""
    from facemeta.gallery.validate import check_unlike

    name = check_domain_name(name)
    present = [d.name for d in list_domains(gallery)]
    if name not in present:
        try:
            check_unlike([name], present)
        except GalleryError as exc:
            raise GalleryError(str(exc).replace("identity name", "domain name").replace(", who is", ", which is")
                               ) from None
    return name


def stability(mean: np.ndarray, n: int) -> float | None:
    """Relative standard error of a domain's mean of ``n`` unit vectors: sqrt(trace(cov) / n) / |mean| (None for
    one vector), about how far, as a fraction of its length, the estimate may sit from the domain's true mean.
    For unit vectors trace(cov) = (1 - |mean|^2) * n / (n - 1), so no photo vector is read."""
    if n < 2:
        return None
    m2 = float(np.dot(np.asarray(mean, np.float64), np.asarray(mean, np.float64)))
    return math.sqrt(max(1.0 - m2, 0.0) / (n - 1)) / max(math.sqrt(m2), 1e-12)


# ------------------------------------------------------------------ reading


def has_tables(conn: sqlite3.Connection) -> bool:
    """Whether the database holds the domain tables (a gallery that never named a domain does not)."""
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='domains'").fetchone() is not None


def _blob(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x, dtype="<f4").tobytes()


def _vec(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4").astype(np.float32)


def _photo_vectors(conn: sqlite3.Connection, name: str) -> np.ndarray:
    rows = conn.execute("SELECT vector FROM domain_photos WHERE domain=? ORDER BY id", (name,)).fetchall()
    return np.stack([_vec(r[0]) for r in rows]) if rows else np.empty((0, 0), np.float32)


def _domain(conn: sqlite3.Connection, row: tuple) -> Domain:
    name, fp, stats, thr, far, pairs = row
    stats = DomainStats.from_dict(json.loads(stats))
    photos = conn.execute("SELECT COUNT(*) FROM domain_photos WHERE domain=?", (name,)).fetchone()[0]
    enrolled = conn.execute("SELECT COUNT(*) FROM embeddings WHERE domain=?", (name,)).fetchone()[0]
    return Domain(name, fp, stats, int(photos), int(enrolled), stability(stats.mean, int(photos)), thr, far, pairs)


_COLUMNS = "name, fingerprint, stats, threshold, far, calibration_pairs"


def list_domains(gallery) -> list[Domain]:
    """Every domain of a gallery, sorted by name (empty for a gallery that never named one)."""
    records = gallery._records
    with gallery._mutex, db_errors(records.db), records.snapshot():
        if not has_tables(records.conn):
            return []
        rows = records.conn.execute(f"SELECT {_COLUMNS} FROM domains ORDER BY name").fetchall()
        return [_domain(records.conn, r) for r in rows]


def get_domain(gallery, name: str) -> Domain:
    """One domain of a gallery; GalleryError when it has none by that name or it was made with another model."""
    key = normal_name(name)
    records = gallery._records
    with gallery._mutex, db_errors(records.db), records.snapshot():
        row = None
        if has_tables(records.conn):
            row = records.conn.execute(f"SELECT {_COLUMNS} FROM domains WHERE name=?", (key,)).fetchone()
        if row is None:
            names = [r[0] for r in records.conn.execute("SELECT name FROM domains ORDER BY name")] \
                if has_tables(records.conn) else []
            known = ", ".join(names[:10]) if names else "none yet; add one with `facemeta domain add`"
            raise GalleryError(f"no domain named {key[:80]!r} in gallery {gallery.path} (domains: {known})")
        domain = _domain(records.conn, row)
    if domain.fingerprint != gallery.fingerprint:
        raise GalleryError(f"domain {key!r} was made with model {domain.fingerprint}, not this gallery's "
                           f"{gallery.fingerprint}: add its photos again with this model")
    return domain


def domain_stats(gallery, name: str | None) -> DomainStats | None:
    """The statistics of a named domain (None for the default domain)."""
    return None if name is None else get_domain(gallery, name).stats


def photo_hashes(gallery, name: str) -> set[str]:
    """Content hashes of the photos already counted into a domain (empty for a new domain)."""
    records = gallery._records
    with gallery._mutex, db_errors(records.db):
        if not has_tables(records.conn):
            return set()
        rows = records.conn.execute("SELECT content_hash FROM domain_photos WHERE domain=? AND content_hash "
                                    "IS NOT NULL", (normal_name(name),))
        return {r[0] for r in rows}


def raw_vectors(gallery, eids: list[int]) -> tuple[np.ndarray, list[str | None]]:
    """The raw (un-normalised) vectors of stored embeddings and each one's domain (None: default)."""
    records = gallery._records
    with gallery._mutex, db_errors(records.db):
        has = "domain" in {r[1] for r in records.conn.execute("PRAGMA table_info(embeddings)")}
        out, names = [], []
        for eid in eids:
            q = "SELECT vector, raw, domain FROM embeddings WHERE id=?" if has else \
                "SELECT vector, NULL, NULL FROM embeddings WHERE id=?"
            row = records.conn.execute(q, (int(eid),)).fetchone()
            if row is None:
                raise GalleryError(f"no stored embedding with id {eid}")
            out.append(_vec(row[1] if row[1] is not None else row[0]))
            names.append(row[2])
    return np.stack(out) if out else np.empty((0, gallery.dim), np.float32), names


# ------------------------------------------------------------------ changing


def ensure_tables(tx) -> None:
    """Inside a change transaction: the domain tables and the two embeddings columns, added when missing."""
    columns = {r[1] for r in tx.execute("PRAGMA table_info(embeddings)")}
    if "domain" not in columns:
        tx.execute("ALTER TABLE embeddings ADD COLUMN domain TEXT")
    if "raw" not in columns:
        tx.execute("ALTER TABLE embeddings ADD COLUMN raw BLOB")
    for statement in _TABLES.split(";"):
        if statement.strip():
            tx.execute(statement)


def enroll(gallery, name: str, vectors: np.ndarray, *, fingerprint: str, domain: str,
           sources: list[str | None], scores: list[float | None], content_hashes: list[str | None]) -> list[int]:
    """Gallery.enroll for photos of a named domain: the raw vectors are kept with the domain's name and the
    index gets them normalised by its statistics, in one transaction. Returns the new embedding ids."""
    from facemeta.gallery.validate import check_vectors

    with gallery._mutex:
        gallery._check_open(write=True)
        raw = check_vectors(vectors, gallery.dim, gallery.fingerprint, fingerprint)
        d = get_domain(gallery, domain)
        x = normalise(raw, d.stats)
        name = check_name(name)
        if hasattr(gallery, "_check_unlike"):
            gallery._check_unlike([name])
        if not len(sources) == len(scores) == len(content_hashes) == len(x):
            raise GalleryError("sources, scores and content hashes must have one entry per embedding")
        now = time.time()
        ids: list[int] = []
        with gallery._change() as tx:
            ident = tx.identity(name, now)
            for i, (src, score, digest) in enumerate(zip(sources, scores, content_hashes, strict=True)):
                ids.append(tx.add_embedding(ident, x[i].tobytes(), source=src, score=score, fingerprint=fingerprint,
                                            created=now, content_hash=digest))
                tag_embedding(tx, ids[-1], d.name, raw[i])
        fault("after_commit")
        gallery._index.add(x, np.array(ids, np.int64), np.full(len(ids), ident, np.int64))
        gallery._index.after_change()
        return ids


def tag_embedding(tx, eid: int, domain: str, raw: np.ndarray) -> None:
    """Inside the enroll's transaction: record an embedding's domain and raw vector."""
    tx.execute("UPDATE embeddings SET domain=?, raw=? WHERE id=?", (domain, _blob(raw), int(eid)))


def _renormalise(tx, name: str, stats: DomainStats) -> tuple[list[int], list[int], list[int], np.ndarray]:
    """Inside a change transaction: every embedding enrolled under a domain normalised again from its raw
    vector and stored under a new id. -> (old ids, new ids, identity ids, new vectors)."""
    rows = tx.execute("SELECT id, identity_id, source, score, fingerprint, created, content_hash, raw, vector "
                      "FROM embeddings WHERE domain=? ORDER BY id", (name,)).fetchall()
    old, new, idents, vecs = [], [], [], []
    for eid, ident, source, score, fp, created, digest, raw, blob in rows:
        vec = normalise(_vec(raw), stats)
        tx.removed(eid, blob)
        tx.execute("DELETE FROM embeddings WHERE id=?", (eid,))
        nid = tx.add_embedding(ident, vec.tobytes(), source=source, score=score, fingerprint=fp, created=created,
                               content_hash=digest)
        tag_embedding(tx, nid, name, _vec(raw))
        old.append(eid)
        new.append(nid)
        idents.append(ident)
        vecs.append(vec)
    return old, new, idents, np.stack(vecs) if vecs else np.empty((0, 0), np.float32)


def _swap(gallery, old: list[int], new: list[int], idents: list[int], vecs: np.ndarray) -> None:
    """After the commit: the index drops the old ids and takes the re-normalised vectors under the new ones."""
    fault("after_commit")
    if old:
        gallery._index.remove(old)
        gallery._index.add(vecs, np.array(new, np.int64), np.array(idents, np.int64))
    gallery._index.drop_caches()
    gallery._index.after_change()


def add_photos(gallery, name: str, vectors: np.ndarray, *, fingerprint: str, sources: list[str | None],
               content_hashes: list[str | None], kind: str | None = None, strength: float | None = None,
               reference: DomainStats | None = None) -> Domain:
    """Count unlabelled photos' embeddings (unit vectors [n, dim] of model ``fingerprint``) into a domain,
    created if new, and re-estimate its statistics from every photo behind it. The statistic: ``kind`` when
    given, else the domain's own, else ``offset`` (domain_stats.offset_stats: moved towards the model's source
    photos at the rule's strength) when the model's source statistics ``reference`` are known, else the plain
    ``mean`` (the behaviour before the rule; ``strength`` overrides either's). The embeddings enrolled under it
    are normalised again. One transaction: a crash keeps all of it or none."""
    from facemeta.gallery.validate import check_vectors

    with gallery._mutex:
        gallery._check_open(write=True)
        name = check_new_domain(gallery, name)
        x = check_vectors(vectors, gallery.dim, gallery.fingerprint, fingerprint)
        if len(sources) != len(x) or len(content_hashes) != len(x):
            raise GalleryError("sources and content hashes must have one entry per photo")
        now = time.time()
        with gallery._change() as tx:
            ensure_tables(tx)
            row = tx.execute("SELECT fingerprint, stats, created FROM domains WHERE name=?", (name,)).fetchone()
            if row is not None and row[0] != gallery.fingerprint:
                raise GalleryError(f"domain {name!r} was made with model {row[0]}; this gallery holds model "
                                   f"{gallery.fingerprint}: remove the domain and add its photos again")
            old = DomainStats.from_dict(json.loads(row[1])) if row is not None else None
            for vec, src, digest in zip(x, sources, content_hashes, strict=True):
                tx.execute("INSERT INTO domain_photos(domain, content_hash, source, vector, created) "
                           "VALUES (?, ?, ?, ?, ?)", (name, digest, None if src is None else str(src), _blob(vec), now))
            photos = _photo_vectors(tx.conn, name)
            if photos.size == 0:
                raise GalleryError(f"domain {name!r} needs at least one photo")
            stats = _statistics(photos, kind or (old.kind if old else None), strength, old, reference)
            text = json.dumps(stats.to_dict())
            if row is None:
                tx.execute("INSERT INTO domains(name, fingerprint, stats, created, updated) VALUES (?, ?, ?, ?, ?)",
                           (name, gallery.fingerprint, text, now, now))
            else:  # new statistics: an earlier calibration no longer holds
                tx.execute("UPDATE domains SET stats=?, updated=?, threshold=NULL, far=NULL, calibration_pairs=NULL "
                           "WHERE name=?", (text, now, name))
            moved = _renormalise(tx, name, stats)
        _swap(gallery, *moved)
    return get_domain(gallery, name)


def _statistics(photos: np.ndarray, kind: str | None, strength: float | None, old: DomainStats | None,
                reference: DomainStats | None) -> DomainStats:
    """A domain's statistics from its photos (add_photos' rule for the kind; ``strength`` overrides)."""
    if kind is None:
        kind = "offset" if reference is not None else "mean"
    if kind == "offset":
        ref = reference if reference is not None else (reference_of(old) if old is not None else None)
        if ref is None or not ref.extra.get("spread"):
            raise GalleryError("an offset domain needs the model's source statistics (checkpoint meta "
                               "domain_reference); this model has none: use --kind mean")
        stats = offset_stats(photos, ref)
        return with_strength(stats, strength) if strength is not None else stats
    if strength is None and old is not None and old.kind == kind:
        strength = old.strength
    return estimate(photos, kind, 1.0 if strength is None else strength)


def remove_domain(gallery, name: str, force: bool = False) -> int:
    """Remove a domain and its photos. Embeddings enrolled under it stay, moved to the default domain (their
    raw vectors, no normalisation), only with ``force``; otherwise a GalleryError says how many there are.
    Returns how many embeddings moved."""
    name = normal_name(name)
    with gallery._mutex:
        gallery._check_open(write=True)
        if not _known(gallery, name):
            get_domain(gallery, name)  # raises the "no domain named" error
        with db_errors(gallery._records.db):
            enrolled = gallery._records.conn.execute("SELECT COUNT(*) FROM embeddings WHERE domain=?",
                                                     (name,)).fetchone()[0]
        if enrolled and not force:
            raise GalleryError(f"{enrolled} enrolled embedding(s) use domain {name!r}; remove those people "
                               "first, or force it to keep them in the default domain (no normalisation)")
        with gallery._change() as tx:
            rows = tx.execute("SELECT id, identity_id, source, score, fingerprint, created, content_hash, raw, vector "
                              "FROM embeddings WHERE domain=? ORDER BY id", (name,)).fetchall()
            old, new, idents, vecs = [], [], [], []
            for eid, ident, source, score, fp, created, digest, raw, blob in rows:
                tx.removed(eid, blob)
                tx.execute("DELETE FROM embeddings WHERE id=?", (eid,))
                new.append(tx.add_embedding(ident, raw, source=source, score=score, fingerprint=fp, created=created,
                                            content_hash=digest))
                old.append(eid)
                idents.append(ident)
                vecs.append(_vec(raw))
            tx.execute("DELETE FROM domain_photos WHERE domain=?", (name,))
            tx.execute("DELETE FROM domains WHERE name=?", (name,))
        _swap(gallery, old, new, idents, np.stack(vecs) if vecs else np.empty((0, gallery.dim), np.float32))
        return len(old)


def _known(gallery, name: str) -> bool:
    records = gallery._records
    with db_errors(records.db):
        return has_tables(records.conn) and records.conn.execute(
            "SELECT 1 FROM domains WHERE name=?", (name,)).fetchone() is not None


def impostor_threshold(vectors: np.ndarray, far: float) -> tuple[float, int]:
    """The lowest cosine threshold at which at most ``far`` of the impostor pairs (every pair of the given
    vectors, one per person) score at or above it. -> (threshold, number of pairs)."""
    x = np.asarray(vectors, np.float32)
    if len(x) < 2:
        raise GalleryError("calibration needs photos of at least two different people")
    sims = (x @ x.T)[np.triu_indices(len(x), 1)].astype(np.float64)
    sims.sort()
    allowed = int(math.floor(far * len(sims)))  # impostor pairs that may score at or above the threshold
    if allowed >= len(sims):
        return float(sims[0]), len(sims)
    top = sims[len(sims) - allowed - 1]  # the highest impostor score that must fall below the threshold
    return float(np.nextafter(top, np.inf)), len(sims)


def set_calibration(gallery, name: str, threshold: float, far: float, pairs: int) -> Domain:
    """Store a domain's calibrated threshold, its false-accept rate and the impostor pairs behind it."""
    name = normal_name(name)
    with gallery._mutex:
        gallery._check_open(write=True)
        get_domain(gallery, name)
        with db_errors(gallery._records.db):
            conn = gallery._records.conn
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE domains SET threshold=?, far=?, calibration_pairs=? WHERE name=?",
                         (float(threshold), float(far), int(pairs), name))
            conn.execute("COMMIT")
    return get_domain(gallery, name)
