"""Portable gallery files: ``export_gallery`` writes a gallery into one versioned, checksummed file, and
``import_gallery`` reads one into a new gallery (any backend ``Gallery.create`` offers) or an existing one
of the same model: backups, and moving a gallery between backends or machines.

File format, version 1 (JSON lines are UTF-8 and end in ``\\n``)::

    FACEMETA-GALLERY                       magic line
    {"format": "facemeta-gallery-export", "version": 1, "dim": ..., "fingerprint": ..., "index": {...},
     "scoring": ..., "threshold": ..., "backend": ..., "people": P, "embeddings": N, "created": ...,
     "gallery_id": ...}                  header line
    chunk, repeated (at most CHUNK_ROWS rows, 8 MiB of vectors):
      {"rows": n, "names": [...], "sources": [...], "scores": [...], "content_hashes": [...],
       "created": [...], "fingerprints": [...]}   one line: the n rows' metadata, column by column
      n * dim * 4 bytes                     the n vectors exactly as the gallery stores them (float32, little-endian)
    {"end": true, "people": P, "embeddings": N}   trailer line (with "domains": [...] when the gallery has
                                           named domains: statistics, photos, enrolled rows; domain_files.py)
    SHA256 <64 hex digits>                  sha256 of every byte before this line

Reading (facemeta.gallery.export_format) checks everything (magic, version, the checksum, then every line, count and name) before a
single row is written to a gallery; a bad file is a one-line GalleryError naming it. The rows' own
``created`` times are kept in the file, but an import stores the time of the import (``enroll_many``
sets it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from facemeta.atomic import DiskFullError, OutputPathError, atomic_write, check_output
from facemeta.errors import GalleryError
from facemeta.gallery.domain_files import check_target, export_domains, import_domains
from facemeta.gallery.export_format import (
    COLUMNS,
    FORMAT,
    MAGIC,
    MAX_DEPTH,
    TAIL_PREFIX,
    VERSION,
    Chunk,
    Hashing,
    read_export,
)
from facemeta.gallery.faiss_index import IndexSpec
from facemeta.gallery.store import DB_NAME, Gallery
from facemeta.gallery.validate import check_name, check_unlike

CHUNK_BYTES = 8 << 20  # bytes of vectors (and at most of metadata) per chunk the writer aims at
CHUNK_ROWS = 4096
WRITE_BATCH = 10000  # rows per enroll_many transaction on import

Progress = Callable[[int, int], None]  # (rows done, rows in all)


# ------------------------------------------------------------------ writing


def _line(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("ascii") + b"\n"


class _ChunkWriter:
    """Gathers rows and writes them out a chunk at a time."""

    def __init__(self, out: Hashing, dim: int, total: int, progress: Progress | None) -> None:
        self.out, self.total, self.progress = out, total, progress
        self.rows = max(1, min(CHUNK_ROWS, CHUNK_BYTES // (4 * dim)))
        self.meta: dict[str, list] = {c: [] for c in COLUMNS}
        self.vectors: list[np.ndarray] = []
        self.text = 0  # characters of metadata gathered: a chunk line stays far below what readers accept
        self.done = 0

    def add(self, records: list, vectors: np.ndarray) -> None:
        for rec, vec in zip(records, vectors, strict=True):
            for column, value in zip(COLUMNS, (rec.identity, rec.source, rec.score, rec.content_hash, rec.created,
                                               rec.fingerprint), strict=True):
                self.meta[column].append(value)
            self.text += len(rec.identity) + len(rec.source or "") + len(rec.fingerprint)
            self.vectors.append(vec)
            if len(self.vectors) >= self.rows or self.text >= CHUNK_BYTES:
                self.flush()

    def flush(self) -> None:
        if not self.vectors:
            return
        n = len(self.vectors)
        self.out.write(_line({"rows": n, **self.meta}))
        self.out.write(np.asarray(self.vectors, dtype="<f4").tobytes())
        self.meta = {c: [] for c in COLUMNS}
        self.vectors = []
        self.text = 0
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)


def export_gallery(gallery: Gallery, out: str | os.PathLike, progress: Progress | None = None) -> dict:
    """Write every person and embedding of ``gallery`` into the file ``out``, atomically (a crash leaves
    no half file under that name; an existing file is replaced whole). Returns a summary: people,
    embeddings, bytes, sha256. A gallery changed by a writer meanwhile raises GalleryError."""
    try:  # a regular file or a new name, not a file of a gallery: checked before anything is read
        out = check_output(out)
    except OutputPathError as exc:
        raise GalleryError(str(exc)) from None
    people = [p for p in gallery.identities() if p.count > 0]
    total = sum(p.count for p in people)
    header = {"format": FORMAT, "version": VERSION, "dim": int(gallery.dim), "fingerprint": gallery.fingerprint,
              "index": json.loads(gallery.spec.to_json()), "scoring": gallery.scoring,
              "threshold": gallery.threshold, "backend": gallery.backend, "people": len(people),
              "embeddings": total, "created": time.time(), "gallery_id": gallery.gallery_id}
    try:
        with atomic_write(out, "wb") as fh:
            writer = Hashing(fh)
            writer.write(MAGIC)
            writer.write(_line(header))
            chunks = _ChunkWriter(writer, gallery.dim, total, progress)
            for person in people:
                records, vectors = gallery.records(person.name), gallery.vectors(person.name)
                if not len(records) == len(vectors) == person.count:
                    raise GalleryError(f"gallery {gallery.path} changed while it was exported; export it again "
                                       "when no enroll is running")
                chunks.add(records, vectors)
            chunks.flush()
            domains = export_domains(gallery)  # named domains (domain_files.py) ride in the trailer
            writer.write(_line({"end": True, "people": len(people), "embeddings": chunks.done,
                                **({"domains": domains} if domains else {})}))
            sha = writer.sha.hexdigest()
            fh.write(TAIL_PREFIX + sha.encode() + b"\n")
            size = fh.tell()
    except DiskFullError:
        raise
    except OSError as exc:
        raise GalleryError(f"cannot write {out}: {exc.strerror or exc}") from None
    return {"path": str(out), "people": len(people), "embeddings": chunks.done, "bytes": size, "sha256": sha,
            "dim": header["dim"], "fingerprint": header["fingerprint"], "backend": header["backend"]}


# ------------------------------------------------------------------ reading
__all__ = ["CHUNK_ROWS", "MAGIC", "MAX_DEPTH", "VERSION", "Chunk", "export_gallery", "import_gallery", "read_export"]


# ------------------------------------------------------------------ importing


def _target_is_gallery(target: Path) -> bool:
    """True for a gallery folder; False for a missing or empty folder; otherwise a GalleryError."""
    if os.path.lexists(target / DB_NAME):
        return True
    if not os.path.lexists(target) or (target.is_dir() and not any(target.iterdir())):
        return False
    raise GalleryError(f"{target} exists and is neither a facemeta gallery nor an empty folder; "
                       "import into a new folder")


def _check_model(header: dict, target_fp: str, what: str, path: Path, override: bool) -> None:
    models = sorted({header["fingerprint"], *header["row_fingerprints"]} - {target_fp})
    if models and not override:
        raise GalleryError(f"{path} holds embeddings of model {models[0]!r}, but {what} is for model "
                           f"{target_fp!r}: another model's vectors are meaningless there "
                           "(--any-model / fingerprint_override=True imports them anyway)")


class _Dedup:
    """What an existing gallery already holds of a person (content hashes and stored vectors; only the person
    at hand is kept in memory: an export holds each person's rows together), and a digest of every row this
    import has taken, so a row the file holds twice (a repeated chunk, or rows copied into another) is
    stored once, in a new gallery as in an existing one."""

    def __init__(self, gallery: Gallery | None) -> None:
        self.gallery = gallery
        self.present = {p.name for p in gallery.identities()} if gallery is not None else set()
        self.name: str | None = None
        self.hashes: set[str] = set()
        self.stored: set[bytes] = set()
        self.taken: set[bytes] = set()

    def repeated(self, chunk: Chunk, i: int, name: str) -> bool:
        """True when row ``i`` of the chunk repeats a row already taken from this file (every column and the
        vector alike); else it is remembered as taken."""
        row = json.dumps([name, *(chunk.__dict__[c][i] for c in COLUMNS[1:])]).encode()
        digest = hashlib.blake2b(row + chunk.vectors[i].tobytes(), digest_size=16).digest()
        if digest in self.taken:
            return True
        self.taken.add(digest)
        return False

    def has(self, name: str, content_hash: str | None, vector: np.ndarray) -> bool:
        """True when the person already has this content hash or this exact vector."""
        if name not in self.present:
            return False
        if name != self.name:
            self.name, self.hashes = name, self.gallery.content_hashes(name)
            self.stored = {v.tobytes() for v in self.gallery.vectors(name)}
        return (content_hash is not None and content_hash in self.hashes) or vector.tobytes() in self.stored


def _write_rows(gallery: Gallery, chunks: Iterator[Chunk], fingerprint: str, dedup: _Dedup, total: int,
                progress: Progress | None, batch_rows: int) -> dict:
    """Enroll the file's rows in transactions of ``batch_rows``, skipping what ``dedup`` says is there."""
    batch: dict[str, list] = {"names": [], "sources": [], "scores": [], "content_hashes": [], "vectors": []}
    added, skipped, done, people = 0, 0, 0, set()

    def flush() -> None:
        nonlocal added
        if batch["names"]:
            gallery.enroll_many(batch["names"], np.stack(batch["vectors"]), fingerprint=fingerprint,
                                sources=batch["sources"], scores=batch["scores"],
                                content_hashes=batch["content_hashes"])
            added += len(batch["names"])
            for values in batch.values():
                values.clear()

    for chunk in chunks:
        for i, name in enumerate(chunk.names):
            name = check_name(name)
            if dedup.repeated(chunk, i, name) or dedup.has(name, chunk.content_hashes[i], chunk.vectors[i]):
                skipped += 1
                continue
            people.add(name)
            for key, value in (("names", name), ("sources", chunk.sources[i]), ("scores", chunk.scores[i]),
                               ("content_hashes", chunk.content_hashes[i]), ("vectors", chunk.vectors[i])):
                batch[key].append(value)
            if len(batch["names"]) >= batch_rows:
                flush()
        done += len(chunk.names)
        if progress is not None:
            progress(done, total)
    flush()
    return {"people": len(people), "embeddings": added, "skipped": skipped}


def import_gallery(path: str | os.PathLike, gallery_path: str | os.PathLike, *, fingerprint_override: bool = False,
                   expected_fingerprint: str | None = None, create_kwargs: dict | None = None,
                   progress: Progress | None = None, batch_rows: int = WRITE_BATCH) -> dict:
    """Import an export file into ``gallery_path``: a new gallery (missing or empty folder) created with the
    file's dimension, model, index settings, scoring and threshold (plus ``create_kwargs``, e.g. a backend),
    or an existing gallery of the same model and dimension, which keeps its own settings and gains the
    file's people; a row whose content hash or exact vector its person already has is skipped.

    The file is checked whole first. Another model than the existing gallery's, or than
    ``expected_fingerprint`` for a new one, is refused unless ``fingerprint_override``: the rows are then
    stored as the target's model (a new gallery takes ``expected_fingerprint``). Another dimension is
    always refused. Rows go in transactions of ``batch_rows``; a failed import into a new gallery removes
    it, one into an existing gallery keeps the batches already committed (importing again skips them).
    """
    path, target = Path(path), Path(gallery_path)
    header, chunks = read_export(path)
    try:
        return _import(path, target, header, chunks, fingerprint_override, expected_fingerprint,
                       create_kwargs or {}, progress, batch_rows)
    finally:
        chunks.close()


def _create(target: Path, header: dict, fingerprint: str, create_kwargs: dict) -> Gallery:
    """A new gallery with the file's dimension, index settings, scoring and threshold."""
    spec = IndexSpec.from_json(json.dumps(header["index"]))
    return Gallery.create(target, dim=header["dim"], fingerprint=fingerprint, index=spec, scoring=header["scoring"],
                          threshold=header["threshold"], **create_kwargs)


def _import(path: Path, target: Path, header: dict, chunks, override: bool, expected: str | None,
            create_kwargs: dict, progress: Progress | None, batch_rows: int) -> dict:
    existing = _target_is_gallery(target)
    if existing:
        if create_kwargs:
            raise GalleryError(f"{target} is already a gallery; backend options apply to a new gallery only")
        gallery = Gallery.open(target, mode="w")
        with gallery:
            if gallery.dim != header["dim"]:
                raise GalleryError(f"{path} holds {header['dim']}-d embeddings, gallery {target} "
                                   f"{gallery.dim}-d ones")
            _check_model(header, gallery.fingerprint, f"gallery {target}", path, override)
            try:  # a person of the file who looks like another of the gallery: refused before any row is written
                present = [p.name for p in gallery.identities()]
                check_unlike(sorted(set(header["names"]) - set(present)), present)
            except GalleryError as exc:
                raise GalleryError(f"cannot import {path} into {target}: {exc}") from None
            check_target(gallery, header["domains"])
            result = _write_rows(gallery, chunks, gallery.fingerprint, _Dedup(gallery), header["embeddings"],
                                 progress, batch_rows)
            import_domains(gallery, header["domains"])
            total = len(gallery)
        return {"gallery": str(target), "new": False, "fingerprint": gallery.fingerprint, "total": total,
                **result}
    fingerprint = expected or header["fingerprint"]
    _check_model(header, fingerprint, "the gallery asked for", path, override)
    was_empty_dir = target.is_dir()
    try:
        gallery = _create(target, header, fingerprint, create_kwargs)
        with gallery:
            check_target(gallery, header["domains"])
            result = _write_rows(gallery, chunks, fingerprint, _Dedup(None), header["embeddings"], progress,
                                 batch_rows)
            import_domains(gallery, header["domains"])
            total = len(gallery)
    except BaseException:
        if os.path.lexists(target / DB_NAME):  # ours: the folder was missing or empty
            shutil.rmtree(target, ignore_errors=True)
            if was_empty_dir:
                target.mkdir(exist_ok=True)
        raise
    return {"gallery": str(target), "new": True, "fingerprint": fingerprint, "total": total, **result}
