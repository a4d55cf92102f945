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
    {"end": true, "people": P, "embeddings": N}   trailer line
    SHA256 <64 hex digits>                  sha256 of every byte before this line

Reading checks everything (magic, version, the checksum, then every line, count and name) before a
single row is written to a gallery; a bad file is a one-line GalleryError naming it. The rows' own
``created`` times are kept in the file, but an import stores the time of the import (``enroll_many``
sets it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from facemeta.atomic import atomic_write
from facemeta.errors import GalleryError
from facemeta.gallery.faiss_index import IndexSpec
from facemeta.gallery.store import DB_NAME, Gallery
from facemeta.gallery.validate import check_name, check_vectors

MAGIC = b"FACEMETA-GALLERY\n"
FORMAT = "facemeta-gallery-export"
VERSION = 1
CHUNK_BYTES = 8 << 20  # bytes of vectors (and at most of metadata) per chunk the writer aims at
CHUNK_ROWS = 4096
WRITE_BATCH = 10000  # rows per enroll_many transaction on import
COLUMNS = ("names", "sources", "scores", "content_hashes", "created", "fingerprints")
_TAIL_PREFIX = b"SHA256 "
_TAIL = len(_TAIL_PREFIX) + 64 + 1
# Bounds checked before anything is allocated: a header line, a metadata line, rows and bytes of a chunk.
_MAX_HEADER, _MAX_LINE, _MAX_ROWS, _MAX_CHUNK_BYTES = 1 << 20, 64 << 20, 1 << 16, 256 << 20

Progress = Callable[[int, int], None]  # (rows done, rows in all)


@dataclass(frozen=True)
class Chunk:
    """Rows of an export file: metadata column by column and the [n, dim] float32 vectors."""

    names: list[str]
    sources: list[str | None]
    scores: list[float | None]
    content_hashes: list[str | None]
    created: list[float]
    fingerprints: list[str]
    vectors: np.ndarray


# ------------------------------------------------------------------ writing


class _Hashing:
    """A file that hashes every byte written to it or read from it (the export's checksum as it is written;
    the import's as it is read)."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.sha.update(data)
        self.fh.write(data)

    def read(self, n: int) -> bytes:
        data = self.fh.read(n)
        self.sha.update(data)
        return data

    def readline(self, limit: int) -> bytes:
        data = self.fh.readline(limit)
        self.sha.update(data)
        return data

    def tell(self) -> int:
        return self.fh.tell()


def _line(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("ascii") + b"\n"


class _ChunkWriter:
    """Gathers rows and writes them out a chunk at a time."""

    def __init__(self, out: _Hashing, dim: int, total: int, progress: Progress | None) -> None:
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
    out = Path(out)
    if out.is_dir():
        raise GalleryError(f"{out} is a folder; give the export a file name")
    people = [p for p in gallery.identities() if p.count > 0]
    total = sum(p.count for p in people)
    header = {"format": FORMAT, "version": VERSION, "dim": int(gallery.dim), "fingerprint": gallery.fingerprint,
              "index": json.loads(gallery.spec.to_json()), "scoring": gallery.scoring,
              "threshold": gallery.threshold, "backend": gallery.backend, "people": len(people),
              "embeddings": total, "created": time.time(), "gallery_id": gallery.gallery_id}
    try:
        with atomic_write(out, "wb") as fh:
            writer = _Hashing(fh)
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
            writer.write(_line({"end": True, "people": len(people), "embeddings": chunks.done}))
            sha = writer.sha.hexdigest()
            fh.write(_TAIL_PREFIX + sha.encode() + b"\n")
            size = fh.tell()
    except OSError as exc:
        raise GalleryError(f"cannot write {out}: {exc.strerror or exc}") from None
    return {"path": str(out), "people": len(people), "embeddings": chunks.done, "bytes": size, "sha256": sha,
            "dim": header["dim"], "fingerprint": header["fingerprint"], "backend": header["backend"]}


# ------------------------------------------------------------------ reading


def _damaged(path: Path, why: str) -> GalleryError:
    return GalleryError(f"{path} is damaged ({why})")


def _read_line(fh: IO[bytes], path: Path, limit: int, what: str) -> bytes:
    line = fh.readline(limit + 1)
    if not line.endswith(b"\n"):
        if len(line) > limit:
            raise _damaged(path, f"its {what} line is over {limit} bytes")
        raise GalleryError(f"{path} is truncated (it ends inside its {what})")
    return line


def _parse(line: bytes, path: Path, what: str) -> dict:
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _damaged(path, f"its {what} is not JSON") from None
    if not isinstance(obj, dict):
        raise _damaged(path, f"its {what} is not a JSON object")
    return obj


def _open(path: Path) -> tuple[IO[bytes], os.stat_result]:
    """The file open for reading, and its stat; checked to be a regular file first (opening a FIFO blocks)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise GalleryError(f"{path} is not a file")
        fh = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    except OSError as exc:
        raise GalleryError(f"cannot read {path}: {exc.strerror or exc}") from None
    return fh, os.fstat(fh.fileno())


def _read_header(fh: IO[bytes], path: Path) -> dict | None:
    """The header after the magic line, None when it is not a JSON object (the checksum then says why)."""
    if fh.read(len(MAGIC)) != MAGIC:
        raise GalleryError(f"{path} is not a facemeta gallery export (it does not start with "
                           f"{MAGIC.decode().strip()})")
    try:
        header = _parse(_read_line(fh, path, _MAX_HEADER, "header"), path, "header")
    except GalleryError:
        return None
    version = header.get("version")
    if isinstance(version, int) and version > VERSION:
        raise GalleryError(f"{path} was written by a newer facemeta (export format {version}; this one reads "
                           f"format {VERSION} and older)")
    return header


def _check_checksum(fh: IO[bytes], path: Path, size: int) -> str:
    """The file's recorded sha256 when the bytes before it hash to it; else truncated or damaged."""
    if size < len(MAGIC) + _TAIL:
        raise GalleryError(f"{path} is truncated ({size} bytes)")
    fh.seek(size - _TAIL)
    tail = fh.read(_TAIL)
    if not (tail.startswith(_TAIL_PREFIX) and tail.endswith(b"\n")):
        raise GalleryError(f"{path} is truncated (it does not end with its checksum)")
    fh.seek(0)
    sha, left = hashlib.sha256(), size - _TAIL
    while left:
        block = fh.read(min(left, 1 << 20))
        if not block:
            raise GalleryError(f"{path} is truncated (it shrank while being read)")
        sha.update(block)
        left -= len(block)
    if sha.hexdigest().encode() != tail[len(_TAIL_PREFIX):-1]:
        raise _damaged(path, "checksum mismatch")
    return sha.hexdigest()


def _check_header(header: dict | None, path: Path) -> dict:
    if header is None:
        raise _damaged(path, "its header is not a JSON object")
    if header.get("format") != FORMAT or not isinstance(header.get("version"), int) or header["version"] < 1:
        raise _damaged(path, "its header is not that of a facemeta gallery export")
    dim, fp = header.get("dim"), header.get("fingerprint")
    if not isinstance(dim, int) or not 1 <= dim <= 65536:
        raise _damaged(path, f"bad dimension {dim!r}")
    if not isinstance(fp, str) or not fp:
        raise _damaged(path, "no model fingerprint")
    for key in ("people", "embeddings"):
        if not isinstance(header.get(key), int) or header[key] < 0:
            raise _damaged(path, f"bad {key} count {header.get(key)!r}")
    if not isinstance(header.get("index"), dict) or not isinstance(header.get("scoring"), str):
        raise _damaged(path, "no index settings or scoring")
    threshold = header.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)):
        raise _damaged(path, f"bad threshold {threshold!r}")
    return header


def _optional(values: list, kind: type | tuple[type, ...]) -> bool:
    return all(v is None or (isinstance(v, kind) and not isinstance(v, bool)) for v in values)


def _chunk_meta(obj: dict, path: Path, dim: int) -> int:
    """Check one chunk line's columns; returns its row count."""
    n = obj.get("rows")
    if not isinstance(n, int) or not 1 <= n <= _MAX_ROWS or n * dim * 4 > _MAX_CHUNK_BYTES:
        raise _damaged(path, f"a chunk of {n!r} rows")
    if any(not isinstance(obj.get(c), list) or len(obj[c]) != n for c in COLUMNS):
        raise _damaged(path, "a chunk's columns do not have one entry per row")
    names, sources, scores, hashes = obj["names"], obj["sources"], obj["scores"], obj["content_hashes"]
    if not all(isinstance(x, str) for x in names):
        raise _damaged(path, "an identity name is not a string")
    if not _optional(sources, str):
        raise _damaged(path, "a source is not a string")
    if not _optional(scores, (int, float)) or not _optional(obj["created"], (int, float)):
        raise _damaged(path, "a score or time is not a number")
    if not _optional(hashes, str) or any(h is not None and not 1 <= len(h) <= 128 for h in hashes):
        raise _damaged(path, "a content hash is not a string of 1 to 128 characters")
    if not all(isinstance(f, str) and f for f in obj["fingerprints"]):
        raise _damaged(path, "a row has no model fingerprint")
    return n


def _scan(fh: IO[bytes], path: Path, header: dict, size: int) -> Iterator[Chunk | dict]:
    """The chunks after the header, then the trailer; every line and count checked."""
    dim, rows = header["dim"], 0
    while True:
        obj = _parse(_read_line(fh, path, _MAX_LINE, "rows"), path, "row metadata")
        if obj.get("end") is True:
            if fh.tell() != size - _TAIL:
                raise _damaged(path, "bytes after its trailer")
            if obj.get("embeddings") != rows or rows != header["embeddings"]:
                raise _damaged(path, f"{rows} embeddings where it says {header['embeddings']}")
            yield obj
            return
        n = _chunk_meta(obj, path, dim)
        rows += n
        if fh.tell() + n * dim * 4 > size - _TAIL:
            raise _damaged(path, "a chunk runs past the end of the file")
        x = np.frombuffer(fh.read(n * dim * 4), dtype="<f4").reshape(n, dim).astype(np.float32, copy=False)
        yield Chunk(*(obj[c] for c in COLUMNS), vectors=x)


def read_export(path: str | os.PathLike) -> tuple[dict, Iterator[Chunk]]:
    """Check a whole export file (magic, version, checksum, every line, name and count), then return its
    header and an iterator over its chunks. Nothing is returned, so nothing can be written, from a bad
    file: it raises a one-line GalleryError naming it. The header gains ``row_fingerprints`` (the models
    of its rows) and ``sha256``. The iterator rereads the file and refuses it if it changed since."""
    path = Path(path)
    fh, st = _open(path)
    with fh:
        header = _read_header(fh, path)
        sha = _check_checksum(fh, path, st.st_size)
        header = _check_header(header, path)
        fh.seek(0)
        _read_header(fh, path)
        models, people = set(), set()
        for chunk in _scan(fh, path, header, st.st_size):
            if isinstance(chunk, Chunk):
                models.update(chunk.fingerprints)
                try:
                    check_vectors(chunk.vectors, header["dim"], header["fingerprint"], None)
                    people.update(check_name(name) for name in chunk.names)
                except GalleryError as exc:
                    raise _damaged(path, str(exc)) from None
            elif chunk.get("people") != len(people) or len(people) != header["people"]:
                raise _damaged(path, f"{len(people)} people where it says {header['people']}")
    header = {**header, "row_fingerprints": sorted(models), "sha256": sha}
    return header, _chunks(path, header, st)


def _chunks(path: Path, header: dict, checked: os.stat_result) -> Iterator[Chunk]:
    """The chunks of a file read_export checked, read once more; the bytes are hashed as they go by and must
    still give the checksum read_export verified (the file must not change while it is imported)."""
    fh, st = _open(path)
    with fh:
        if (st.st_size, st.st_mtime_ns, st.st_ino) != (checked.st_size, checked.st_mtime_ns, checked.st_ino):
            raise GalleryError(f"{path} changed since it was checked; import it again")
        reader = _Hashing(fh)
        _read_header(reader, path)
        for chunk in _scan(reader, path, header, st.st_size):
            if isinstance(chunk, Chunk):
                yield chunk
        if reader.sha.hexdigest() != header["sha256"]:
            raise GalleryError(f"{path} changed while it was imported; check the gallery and import it again")


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
    """What an existing gallery already holds of a person: content hashes and stored vectors. Only the
    person at hand is kept in memory (an export holds each person's rows together)."""

    def __init__(self, gallery: Gallery | None) -> None:
        self.gallery = gallery
        self.present = {p.name for p in gallery.identities()} if gallery is not None else set()
        self.name: str | None = None
        self.hashes: set[str] = set()
        self.stored: set[bytes] = set()

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
            if dedup.has(name, chunk.content_hashes[i], chunk.vectors[i]):
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
            result = _write_rows(gallery, chunks, gallery.fingerprint, _Dedup(gallery), header["embeddings"],
                                 progress, batch_rows)
            total = len(gallery)
        return {"gallery": str(target), "new": False, "fingerprint": gallery.fingerprint, "total": total,
                **result}
    fingerprint = expected or header["fingerprint"]
    _check_model(header, fingerprint, "the gallery asked for", path, override)
    was_empty_dir = target.is_dir()
    try:
        gallery = _create(target, header, fingerprint, create_kwargs)
        with gallery:
            result = _write_rows(gallery, chunks, fingerprint, _Dedup(None), header["embeddings"], progress,
                                 batch_rows)
            total = len(gallery)
    except BaseException:
        if os.path.lexists(target / DB_NAME):  # ours: the folder was missing or empty
            shutil.rmtree(target, ignore_errors=True)
            if was_empty_dir:
                target.mkdir(exist_ok=True)
        raise
    return {"gallery": str(target), "new": True, "fingerprint": fingerprint, "total": total, **result}
