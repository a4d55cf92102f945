"""Reading facemeta's portable gallery files (the format is described in facemeta.gallery.portable): every
byte checked before a row is handed out. Sizes are bounded before anything is allocated (a header line, a
metadata line, rows and bytes of a chunk), JSON lines may nest at most MAX_DEPTH deep, and a chunk that
repeats an earlier one byte for byte is refused: a file is a set of rows, each stored once.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from facemeta.errors import GalleryError
from facemeta.gallery.domain_files import check_exported
from facemeta.gallery.validate import check_name, check_unlike, check_vectors

MAGIC = b"FACEMETA-GALLERY\n"
FORMAT = "facemeta-gallery-export"
VERSION = 1
COLUMNS = ("names", "sources", "scores", "content_hashes", "created", "fingerprints")
TAIL_PREFIX = b"SHA256 "
_TAIL = len(TAIL_PREFIX) + 64 + 1
# Bounds checked before anything is allocated: a header line, a metadata line, rows and bytes of a chunk.
_MAX_HEADER, _MAX_LINE, _MAX_ROWS, _MAX_CHUNK_BYTES = 1 << 20, 64 << 20, 1 << 16, 256 << 20
MAX_DEPTH = 8  # nesting of any JSON line (the writer's deepest is 2: the header's index settings)


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




class Hashing:
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



def _damaged(path: Path, why: str) -> GalleryError:
    return GalleryError(f"{path} is damaged ({why})")


def _read_line(fh: IO[bytes], path: Path, limit: int, what: str) -> bytes:
    line = fh.readline(limit + 1)
    if not line.endswith(b"\n"):
        if len(line) > limit:
            raise _damaged(path, f"its {what} line is over {limit} bytes")
        raise GalleryError(f"{path} is truncated (it ends inside its {what})")
    return line


def json_depth(obj: object) -> int:
    """How deeply a parsed JSON value nests arrays and objects (a scalar is 0), walked without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def _parse(line: bytes, path: Path, what: str) -> dict:
    """One JSON line of an export file (its length bounded by the caller) as an object nested at most
    MAX_DEPTH deep: a line nested 50,000 deep is refused in one line, not a RecursionError."""
    too_deep = _damaged(path, f"its {what} is nested more than {MAX_DEPTH} deep")
    try:
        obj = json.loads(line.decode("utf-8"))
    except RecursionError:  # deeper than the interpreter's limit: the parser stopped itself
        raise too_deep from None
    except (UnicodeDecodeError, ValueError):
        raise _damaged(path, f"its {what} is not JSON") from None
    if line.count(b"[") + line.count(b"{") > MAX_DEPTH and json_depth(obj) > MAX_DEPTH:
        raise too_deep
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


def _read_header(fh: IO[bytes], path: Path) -> dict | GalleryError:
    """The header after the magic line, or why it is not a JSON object (raised once the checksum passed:
    damage is told as damage first)."""
    if fh.read(len(MAGIC)) != MAGIC:
        raise GalleryError(f"{path} is not a facemeta gallery export (it does not start with "
                           f"{MAGIC.decode().strip()})")
    try:
        header = _parse(_read_line(fh, path, _MAX_HEADER, "header"), path, "header")
    except GalleryError as exc:
        return exc
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
    if not (tail.startswith(TAIL_PREFIX) and tail.endswith(b"\n")):
        raise GalleryError(f"{path} is truncated (it does not end with its checksum)")
    fh.seek(0)
    sha, left = hashlib.sha256(), size - _TAIL
    while left:
        block = fh.read(min(left, 1 << 20))
        if not block:
            raise GalleryError(f"{path} is truncated (it shrank while being read)")
        sha.update(block)
        left -= len(block)
    if sha.hexdigest().encode() != tail[len(TAIL_PREFIX):-1]:
        raise _damaged(path, "checksum mismatch")
    return sha.hexdigest()


def _check_header(header: dict | GalleryError, path: Path) -> dict:
    if isinstance(header, GalleryError):
        raise header
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
    dim, rows, seen = header["dim"], 0, set()
    while True:
        line = _read_line(fh, path, _MAX_LINE, "rows")
        obj = _parse(line, path, "row metadata")
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
        data = fh.read(n * dim * 4)
        digest = hashlib.blake2b(line + data, digest_size=16).digest()
        if digest in seen:
            raise _damaged(path, f"a chunk of {n} rows is repeated (chunk {len(seen) + 1})")
        seen.add(digest)
        x = np.frombuffer(data, dtype="<f4").reshape(n, dim).astype(np.float32, copy=False)
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
        models, people, domains = set(), set(), []
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
            else:  # the trailer: named domains, if any (domain_files.py)
                try:
                    domains = check_exported(chunk.get("domains", []), header["dim"], header["fingerprint"])
                except GalleryError as exc:
                    raise _damaged(path, str(exc)) from None
        try:
            check_unlike(sorted(people), ())
        except GalleryError as exc:
            raise _damaged(path, str(exc)) from None
    header = {**header, "row_fingerprints": sorted(models), "sha256": sha, "names": sorted(people), "domains": domains}
    return header, _chunks(path, header, st)


def _chunks(path: Path, header: dict, checked: os.stat_result) -> Iterator[Chunk]:
    """The chunks of a file read_export checked, read once more; the bytes are hashed as they go by and must
    still give the checksum read_export verified (the file must not change while it is imported)."""
    fh, st = _open(path)
    with fh:
        if (st.st_size, st.st_mtime_ns, st.st_ino) != (checked.st_size, checked.st_mtime_ns, checked.st_ino):
            raise GalleryError(f"{path} changed since it was checked; import it again")
        reader = Hashing(fh)
        _read_header(reader, path)
        for chunk in _scan(reader, path, header, st.st_size):
            if isinstance(chunk, Chunk):
                yield chunk
        if reader.sha.hexdigest() != header["sha256"]:
            raise GalleryError(f"{path} changed while it was imported; check the gallery and import it again")
