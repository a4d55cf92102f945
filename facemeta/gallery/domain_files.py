"""Domain statistics outside a gallery's database: the small statistics file of one domain (``facemeta domain
export``, read by ``verify --domains`` and facemeta.recognizer_domains.load_domain_file), and every domain of a
gallery, with its photos, as JSON for a gallery export file (portable.py) and back, exactly as stored."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from pathlib import Path

from facemeta.atomic import atomic_write
from facemeta.errors import GalleryError
from facemeta.gallery.domain_stats import DomainStats
from facemeta.gallery.domains import check_domain_name, ensure_tables, get_domain, has_tables
from facemeta.gallery.schema import db_errors

FILE_FORMAT = "facemeta-domain"
FILE_VERSION = 1


@dataclass(frozen=True)
class DomainFile:
    """A domain's statistics without a gallery (``facemeta domain export``): name, model fingerprint and
    dimension, statistics, photos behind them, calibrated threshold and FAR (None when not calibrated)."""

    name: str
    fingerprint: str
    dim: int
    stats: DomainStats
    photos: int
    threshold: float | None = None
    far: float | None = None


def write_domain_file(gallery, name: str, out: str | Path) -> Path:
    """Write a domain's statistics as a small JSON file (atomically)."""
    d = get_domain(gallery, name)
    body = {"format": FILE_FORMAT, "version": FILE_VERSION, "name": d.name, "fingerprint": d.fingerprint,
            "dim": gallery.dim, "photos": d.photos, "threshold": d.threshold, "far": d.far,
            "stats": d.stats.to_dict()}
    out = Path(out)
    with atomic_write(out, "w") as fh:
        fh.write(json.dumps(body) + "\n")
    return out


def read_domain_file(path: str | Path, fingerprint: str | None = None) -> DomainFile:
    """Read a domain statistics file; GalleryError when it is not one, or (``fingerprint`` given) it was
    made with another model."""
    path = Path(path)
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(body, dict) or body.get("format") != FILE_FORMAT:
            raise ValueError("not a facemeta domain statistics file")
        if int(body.get("version", 0)) > FILE_VERSION:
            raise ValueError(f"version {body.get('version')} is newer than this facemeta understands")
        stats = DomainStats.from_dict(body["stats"])
        out = DomainFile(check_domain_name(body["name"]), str(body["fingerprint"]), int(body["dim"]), stats,
                         int(body.get("photos", stats.count)), body.get("threshold"), body.get("far"))
    except OSError as exc:
        raise GalleryError(f"cannot read domain file {path}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise GalleryError(f"{path} is not a usable domain statistics file: {exc}") from None
    if len(stats.mean) != out.dim:
        raise GalleryError(f"{path}: statistics of length {len(stats.mean)} for {out.dim}-d embeddings")
    if fingerprint is not None and out.fingerprint != fingerprint:
        raise GalleryError(f"domain {out.name!r} in {path} was made with model {out.fingerprint}, "
                           f"not {fingerprint}: export it from a gallery of this model")
    return out


def export_domains(gallery) -> list[dict]:
    """Every domain with its photos and the enrolled embeddings that use it (identity, stored vector, raw vector),
    JSON-ready for a gallery export file's trailer; vectors as base64 of their float32 bytes."""
    records = gallery._records
    out = []
    with gallery._mutex, db_errors(records.db), records.snapshot():
        if not has_tables(records.conn):
            return []
        for row in records.conn.execute("SELECT name, fingerprint, stats, threshold, far, calibration_pairs, "
                                        "created, updated FROM domains ORDER BY name").fetchall():
            photos = records.conn.execute("SELECT content_hash, source, vector, created FROM domain_photos "
                                          "WHERE domain=? ORDER BY id", (row[0],)).fetchall()
            enrolled = records.conn.execute("SELECT i.name, e.vector, e.raw FROM embeddings e JOIN identities i ON "
                                            "i.id = e.identity_id WHERE e.domain=? ORDER BY e.id", (row[0],)).fetchall()
            out.append({"name": row[0], "fingerprint": row[1], "stats": json.loads(row[2]), "threshold": row[3],
                        "far": row[4], "calibration_pairs": row[5], "created": row[6], "updated": row[7],
                        "photos": [{"content_hash": h, "source": s, "created": c, "vector": _b64(v)}
                                   for h, s, v, c in photos],
                        "enrolled": [[n, _b64(v), _b64(r)] for n, v, r in enrolled]})
    return out


def _b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode("ascii")


def check_exported(domains: object, dim: int, fingerprint: str) -> list[dict]:
    """The domains of an export file's trailer, checked (names, statistics, vector sizes, the model), each with
    its decoded vectors; a one-line GalleryError (ValueError inside) for anything malformed."""
    if not isinstance(domains, list):
        raise GalleryError("the export's domains are not a list")
    out = []
    try:
        for d in domains:
            stats = DomainStats.from_dict(d["stats"])
            photos = [base64.b64decode(p["vector"], validate=True) for p in d["photos"]]
            enrolled = [(str(n), base64.b64decode(v, validate=True), base64.b64decode(r, validate=True))
                        for n, v, r in d.get("enrolled", [])]
            if len(stats.mean) != dim or any(len(b) != 4 * dim for b in photos + [x for e in enrolled for x in e[1:]]):
                raise ValueError(f"domain {d['name']!r} holds vectors of another dimension than {dim}")
            if d["fingerprint"] != fingerprint:
                raise ValueError(f"domain {d['name']!r} was made with model {d['fingerprint']}, not {fingerprint}")
            out.append({**d, "name": check_domain_name(d["name"]), "photo_blobs": photos, "enrolled": enrolled})
    except GalleryError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise GalleryError(f"the export's domains are malformed: {exc}") from None
    return out


def import_domains(gallery, domains: list[dict]) -> None:
    """Store an export's domains (``check_exported``) in a gallery exactly as exported, statistics and photos, and
    give the imported rows of each enrolled embedding their domain and raw vector back, in one transaction; a
    domain the gallery already has is refused (one-line GalleryError) before anything is written."""
    if not domains:
        return
    with gallery._mutex:
        gallery._check_open(write=True)
        with gallery._change() as tx:
            ensure_tables(tx)
            for d in domains:
                name = d["name"]
                if tx.execute("SELECT 1 FROM domains WHERE name=?", (name,)).fetchone():
                    raise GalleryError(f"the gallery already has a domain named {name!r}: import into a new "
                                       "gallery, or remove that domain first")
                now = time.time()
                tx.execute("INSERT INTO domains(name, fingerprint, stats, threshold, far, calibration_pairs, created, "
                           "updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (name, gallery.fingerprint, json.dumps(d["stats"]), d.get("threshold"), d.get("far"),
                            d.get("calibration_pairs"), float(d.get("created") or now), float(d.get("updated") or now)))
                for p, v in zip(d["photos"], d["photo_blobs"], strict=True):
                    tx.execute("INSERT INTO domain_photos(domain, content_hash, source, vector, created) "
                               "VALUES (?, ?, ?, ?, ?)", (name, p.get("content_hash"), p.get("source"), v,
                                                          float(p.get("created") or now)))
                for person, vector, raw in d["enrolled"]:
                    tx.execute("UPDATE embeddings SET domain=?, raw=? WHERE id = (SELECT e.id FROM embeddings e JOIN "
                               "identities i ON i.id = e.identity_id WHERE i.name=? AND e.vector=? AND e.domain IS "
                               "NULL ORDER BY e.id LIMIT 1)", (name, raw, person, vector))


def check_target(gallery, domains: list[dict]) -> None:
    """Before an import writes a row: its domains must be of the gallery's model and new to it."""
    from facemeta.gallery.domains import list_domains

    present = {d.name for d in list_domains(gallery)}
    for d in domains:
        if d["fingerprint"] != gallery.fingerprint:
            raise GalleryError(f"domain {d['name']!r} of the export was made with model {d['fingerprint']}, not "
                               f"the gallery's {gallery.fingerprint}")
        if d["name"] in present:
            raise GalleryError(f"the gallery already has a domain named {d['name']!r}: import into a new gallery, "
                               "or remove that domain first")
