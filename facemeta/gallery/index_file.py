"""The stamped index file of a gallery (``index.faiss``) and the checks that bind it to its database.

Format: MAGIC, u32 header length, JSON header, FAISS bytes. The header records the generation, a
crc32 and the length of the payload, the index's kind, settings and sizes, the model fingerprint, and
the binding to its database: the gallery id and the embeddings digest it was saved with (records.py
explains the digest). The file is a cache of the database, written atomically (temporary file, fsync,
rename); a reader verifies the whole payload's crc32 before FAISS parses a byte.

Binding: the index must be the cache of *this* database, not a copy from another gallery or from
another moment of this one. Because the file carries the gallery id, generation and digest it was
saved with, checking it on open is one small query whatever the gallery's size (``header_problem``).
An index of another gallery, one newer than the database, or one whose digest is not the one the
database recorded for its generation is refused like a damaged file (bad magic, crc, truncation) or
one of another dimension or model; repair sets the old file aside (``set_aside``) and rebuilds.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import time
import zlib
from pathlib import Path

import faiss

from facemeta.atomic import atomic_write
from facemeta.errors import GalleryError
from facemeta.gallery.faiss_index import BuiltIndex, IndexSpec, set_search_params
from facemeta.gallery.files import open_regular

MAGIC = b"FMGIDX01"
# The problem header_problem reports for an index saved before binding existed (a writer rebuilds it).
UNBOUND = "was written by an older facemeta and is not bound to this gallery's database"


def save_index(built: BuiltIndex, path: Path, generation: int, fingerprint: str, gallery: str | None = None,
               digest: str | None = None) -> None:
    """Write the index atomically (temporary file, fsync, rename), stamped with the generation and, for
    a gallery, its id and the digest of the (id, vector) rows the index holds.

    FAISS streams the index into the file through a callback (no in-memory copy of a 2 GB index);
    the header's room is reserved first and filled in with the length and crc32 at the end. The
    rename replaces a symbolic link at ``path`` rather than writing through it.
    """
    header = built.header() | {"generation": int(generation), "fingerprint": fingerprint}
    if gallery is not None:
        header |= {"gallery": gallery, "digest": digest}
    room = len(json.dumps(header | {"payload_len": 2**63, "crc32": 2**32}, sort_keys=True).encode())
    with atomic_write(path, "wb", guarded=False) as fh:  # the gallery's own file
        fh.write(MAGIC)
        fh.write(struct.pack("<I", room))
        fh.write(b" " * room)
        crc, size = 0, 0

        def sink(chunk: bytes) -> int:
            nonlocal crc, size
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
            fh.write(chunk)
            return len(chunk)

        writer = faiss.PyCallbackIOWriter(sink)
        faiss.write_index(built.index, writer)
        del writer
        head = json.dumps(header | {"payload_len": size, "crc32": crc}, sort_keys=True).encode()
        fh.seek(len(MAGIC) + 4)
        fh.write(head.ljust(room))
        fh.seek(0, os.SEEK_END)


def read_index_header(path: Path, verify: bool = False) -> dict:
    """Read and check the header of an index file (GalleryError when it is not one); ``verify`` also
    checks the payload's length and crc32 (reading the file through, without parsing it)."""
    try:
        with open_regular(path) as fh:
            header = _read_header(fh, path)
            if verify:
                _check_payload(fh, path, header)
            return header
    except OSError as exc:
        raise GalleryError(f"cannot read gallery index {path}: {exc.strerror or exc}") from None


def _check_payload(fh, path: Path, header: dict) -> None:
    """Verify the payload after the header (length, streamed crc32) and rewind to its start."""
    start = fh.tell()
    size = os.fstat(fh.fileno()).st_size - start
    if size != header["payload_len"]:
        raise GalleryError(f"{path} is truncated or padded ({size} of {header['payload_len']} bytes)")
    crc = 0
    while block := fh.read(1 << 24):
        crc = zlib.crc32(block, crc)
    if crc != header["crc32"]:
        raise GalleryError(f"{path} is corrupt (checksum mismatch)")
    fh.seek(start)


def _read_header(fh, path: Path) -> dict:
    magic = fh.read(len(MAGIC))
    if magic != MAGIC:
        raise GalleryError(f"{path} is not a facemeta gallery index (bad magic bytes)")
    raw = fh.read(4)
    if len(raw) != 4:
        raise GalleryError(f"{path} is truncated (no header)")
    (n,) = struct.unpack("<I", raw)
    if n > 1 << 30:
        raise GalleryError(f"{path} is corrupt (header length {n})")
    head = fh.read(n)
    try:
        header = json.loads(head)
        for key in ("generation", "crc32", "payload_len", "dim", "ntotal", "count"):
            if not isinstance(header[key], int) or isinstance(header[key], bool):
                raise TypeError(key)
        for key in ("kind", "spec"):
            header[key]  # noqa: B018 - presence check
    except (ValueError, KeyError, TypeError):
        raise GalleryError(f"{path} is corrupt (unreadable header)") from None
    return header


def load_index(path: Path) -> tuple[BuiltIndex, dict]:
    """Read an index file, verify its checksum and shape, and return it with its header.

    Raises GalleryError (never crashes) when the file is truncated, corrupt or not an index:
    the whole payload's crc32 is verified (streaming) before FAISS parses a single byte.
    """
    try:
        with open_regular(path) as fh:
            header = _read_header(fh, path)
            _check_payload(fh, path, header)
            try:
                index = faiss.read_index(faiss.PyCallbackIOReader(fh.read))
            except RuntimeError as exc:
                raise GalleryError(f"{path} is corrupt (FAISS cannot read it: {str(exc).splitlines()[0][:120]})") from None
    except OSError as exc:
        raise GalleryError(f"cannot read gallery index {path}: {exc.strerror or exc}") from None
    try:
        spec = IndexSpec(**header["spec"])
    except TypeError:
        raise GalleryError(f"{path} is corrupt (bad index settings in its header)") from None
    if index.d != header["dim"] or index.ntotal != header["ntotal"]:
        raise GalleryError(f"{path} is corrupt (index shape disagrees with its header)")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise GalleryError(f"{path} does not use inner-product search")
    built = BuiltIndex(index, spec, header["kind"], int(header["dim"]), set(header["tombstones"]),
                       int(header.get("trained_on", 0)), int(header.get("nlist", 0)))
    set_search_params(built, spec)
    return built, header


def header_problem(path: Path, header: dict, *, dim: int, fingerprint: str, gallery_id: str | None,
                   generation: int, digests: dict[int, str]) -> str | None:
    """Why the index file with this header is not the cache of the database at ``generation`` (None when
    it is): another dimension, model or gallery, newer than the database, or stale. ``digests`` are the
    embeddings digests the database recorded, by generation."""
    if int(header["dim"]) != dim:
        return f"{path} holds {header['dim']}-d vectors but the gallery is {dim}-d"
    if header.get("fingerprint") != fingerprint:
        return (f"{path} belongs to model {header.get('fingerprint')!r}, "
                f"but the gallery holds model {fingerprint!r}")
    gid, gen = header.get("gallery"), int(header["generation"])
    if gid is None:
        return f"{path} {UNBOUND}"
    if gallery_id is None:
        return f"{path} cannot be checked: the gallery database was made by an older facemeta"
    if gid != gallery_id:
        return f"{path} belongs to another gallery (id {str(gid)[:32]!r}, this gallery is {gallery_id!r})"
    if gen > generation:
        return (f"{path} is newer than the database (generation {gen} > {generation}): the database was "
                "restored from an older copy, or the index comes from another copy of this gallery")
    if gen not in digests:
        return f"{path} is stale (generation {gen}; the database no longer records that generation)"
    if header.get("digest") != digests[gen]:
        return f"{path} does not hold this database's embeddings (digest mismatch at generation {gen})"
    return None


def remove_temp_files(path: Path) -> None:
    """Delete temporary files of the index at ``path`` left by a writer killed mid-save (links are
    removed, not followed)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if tmp.is_symlink() or tmp.is_file():
                tmp.unlink()


def set_aside(path: Path, damaged: bool) -> Path:
    """Move the index file at ``path`` aside (repair keeps it for inspection) under a name not yet
    taken; returns the new path."""
    base = f"{path.name}.{'damaged' if damaged else 'replaced'}-{int(time.time())}"
    aside, n = path.with_name(base), 1
    while os.path.lexists(aside):
        aside, n = path.with_name(f"{base}.{n}"), n + 1
    os.replace(path, aside)
    return aside
