"""insightface's data files, read without mxnet and without trusting pickle.

- Verification ``.bin`` (lfw.bin, cfp_fp.bin, agedb_30.bin ...): a pickle of
  ``(list of encoded images, list of bools issame)``, pair k = images 2k and 2k+1. Loaded with a
  restricted unpickler that builds only bytes, lists, tuples and bools: any global (a class or a
  function such as os.system) is refused before it is looked up.
- Training ``.rec`` + ``.idx`` (MXNet RecordIO, as in MS1M / Glint / WebFace packs): each record is
  uint32 magic 0xced7230a, uint32 lrecord (continuation flag in the upper 3 bits, length in the
  lower 29), the payload, zero padding to 4 bytes. A payload is an IRHeader ``<IfQQ`` (flag,
  label, id, id2), then ``flag`` float32 labels when flag > 0, then the encoded image. The
  ``.idx`` file has lines ``key<TAB>byte offset``. In insightface's packs record 0 is a header
  (flag 2, labels [first identity record, end]) and records after the images describe identities;
  both carry no image.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facemeta.atomic import atomic_write
from facemeta.data.manifest import ManifestRow, write_manifest
from facemeta.data.sets import DataFormatError
from facemeta.errors import ImageReadError
from facemeta.images import check_encoded_size

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_IR = struct.Struct("<IfQQ")
_LEN_MASK = (1 << 29) - 1


class UnsafePickleError(DataFormatError):
    """A pickle asked to load a class or function: refused, the file is not a plain verification set."""


# --------------------------------------------------------------------------------- verification .bin

def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode`` that Python 3 pickles of bytes use under protocol < 3."""
    if not isinstance(text, str) or encoding.lower().replace("-", "") not in ("latin1", "iso88591"):
        raise UnsafePickleError(f"refused _codecs.encode({type(text).__name__}, {encoding!r}) in pickle")
    return text.encode("latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except the latin-1 bytes encoder of old protocols."""

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise UnsafePickleError(f"refused to load {module}.{name} from pickle: a verification .bin holds "
                                "only image bytes and bools")

    def persistent_load(self, pid):
        raise UnsafePickleError("refused a persistent id in pickle")


def _decode(data: bytes, what: str) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 array (grey images become 3-channel). The header's size is checked
    against the image reader's pixel cap first, so a small file claiming a huge image is never decoded."""
    try:
        check_encoded_size(data, what)
    except ImageReadError as exc:
        raise DataFormatError(str(exc)) from None
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise DataFormatError(f"{what}: not a decodable image ({len(data)} bytes)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def load_bin_raw(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """A verification .bin as (encoded image bytes, issame bool array), checked but not decoded."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"verification file not found: {path}")
    with open(path, "rb") as fh:
        try:
            obj = _RestrictedUnpickler(fh, encoding="bytes").load()
        except UnsafePickleError as exc:
            raise UnsafePickleError(f"{path}: {exc}") from None
        except Exception as exc:  # truncated or not a pickle at all
            raise DataFormatError(f"{path}: not a readable verification pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise DataFormatError(f"{path}: expected a pair (images, issame), got {type(obj).__name__}")
    images, issame = obj
    if not isinstance(images, (list, tuple)) or not all(isinstance(b, (bytes, bytearray)) for b in images):
        raise DataFormatError(f"{path}: the first item must be a list of encoded image bytes")
    if not isinstance(issame, (list, tuple)) or not all(isinstance(s, bool) for s in issame):
        raise DataFormatError(f"{path}: the second item must be a list of bools (issame)")
    if len(images) != 2 * len(issame):
        raise DataFormatError(f"{path}: {len(images)} images for {len(issame)} pairs (need exactly twice as many)")
    return [bytes(b) for b in images], np.asarray(issame, dtype=bool)


def read_bin(path: str | os.PathLike, image_size: int | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Read an insightface verification .bin: (RGB uint8 images, issame [N/2] bool); pair k is images 2k, 2k+1.

    image_size: resize every image to that square size when it differs (insightface's are 112).
    """
    raw, issame = load_bin_raw(path)
    images = []
    for i, data in enumerate(raw):
        img = _decode(data, f"{path}: image {i}")
        if image_size and img.shape[:2] != (image_size, image_size):
            img = cv2.resize(img, (image_size, image_size), interpolation=cv2.INTER_AREA)
        images.append(img)
    return images, issame


def encode_image(image: np.ndarray | bytes, ext: str = ".jpg", quality: int = 95) -> bytes:
    """RGB uint8 array -> encoded bytes (bytes pass through unchanged)."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    arr = np.asarray(image)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext.lower() in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(ext, arr, params)
    if not ok:
        raise DataFormatError(f"could not encode an image as {ext}")
    return buf.tobytes()


def write_bin(path: str | os.PathLike, images: Sequence[np.ndarray | bytes], issame: Sequence[bool],
              protocol: int = pickle.HIGHEST_PROTOCOL, ext: str = ".jpg") -> Path:
    """Write a verification .bin the way insightface does (pickle of (image bytes list, bool list)), atomically."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"need two images per pair: {len(images)} images, {len(issame)} pairs")
    payload = ([encode_image(im, ext) for im in images], [bool(s) for s in issame])
    path = Path(path)
    with atomic_write(path, mode="wb") as fh:
        pickle.dump(payload, fh, protocol=protocol)
    return path


# ---------------------------------------------------------------------------------------- RecordIO

@dataclass(frozen=True)
class IRHeader:
    """MXNet image-record header: flag (number of float labels, 0 = one scalar label), label(s), ids."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int

    @property
    def first_label(self) -> float:
        """The scalar label, or the first of the label array (insightface's identity label)."""
        return float(self.label) if self.flag == 0 else float(np.asarray(self.label)[0])


def unpack_record(payload: bytes) -> tuple[IRHeader, bytes]:
    """Split a record payload into its IRHeader (with label array when flag > 0) and the image bytes."""
    if len(payload) < _IR.size:
        raise DataFormatError(f"record of {len(payload)} bytes is shorter than its {_IR.size}-byte header")
    flag, label, id1, id2 = _IR.unpack_from(payload)
    rest = payload[_IR.size:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise DataFormatError(f"record announces {flag} labels but holds {len(rest)} bytes")
        labels = np.frombuffer(rest, dtype="<f4", count=flag).copy()
        return IRHeader(flag, labels, id1, id2), rest[4 * flag:]
    return IRHeader(flag, label, id1, id2), rest


def pack_record(label: float | Sequence[float], image: bytes, id: int = 0, id2: int = 0) -> bytes:
    """Build a record payload: scalar label -> flag 0; a label sequence -> flag = its length."""
    if np.ndim(label) == 0:
        return _IR.pack(0, float(label), id, id2) + image
    arr = np.asarray(label, dtype="<f4").ravel()
    return _IR.pack(len(arr), 0.0, id, id2) + arr.tobytes() + image


def _read_exact(fh: io.BufferedIOBase, n: int, where: str) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise DataFormatError(f"{where}: truncated RecordIO file (wanted {n} bytes, got {len(data)})")
    return data


def read_record_at(fh: io.BufferedIOBase, where: str) -> bytes | None:
    """Read one (possibly multi-part) record at the file position; None at a clean end of file."""
    parts: list[bytes] = []
    while True:
        head = fh.read(8)
        if not head and not parts:
            return None
        if len(head) != 8:
            raise DataFormatError(f"{where}: truncated RecordIO header")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise DataFormatError(f"{where}: bad RecordIO magic {magic:#010x} (expected {MAGIC:#010x})")
        cflag, length = lrec >> 29, lrec & _LEN_MASK
        padded = (length + 3) & ~3
        parts.append(_read_exact(fh, padded, where)[:length])
        if cflag in (0, 3):
            return _MAGIC_BYTES.join(parts)
        if cflag not in (1, 2):
            raise DataFormatError(f"{where}: bad RecordIO continuation flag {cflag}")


def write_record(fh: io.BufferedIOBase, payload: bytes) -> None:
    """Write one record as dmlc-core does: a payload holding the magic at a 4-aligned offset is split
    into parts (flags 1, 2.., 3) whose joins the reader restores."""
    if len(payload) >= 1 << 29:
        raise ValueError("RecordIO records must be shorter than 2**29 bytes")
    start = 0
    for i in range(0, len(payload) - len(payload) % 4, 4):
        if payload[i:i + 4] == _MAGIC_BYTES:
            fh.write(struct.pack("<II", MAGIC, ((1 if start == 0 else 2) << 29) | (i - start)))
            fh.write(payload[start:i])
            start = i + 4
    tail = len(payload) - start
    fh.write(struct.pack("<II", MAGIC, ((3 if start else 0) << 29) | tail))
    fh.write(payload[start:])
    fh.write(b"\0" * (((tail + 3) & ~3) - tail))


def read_idx(path: str | os.PathLike) -> dict[int, int]:
    """An .idx file: key -> byte offset of its record in the .rec."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"RecordIO index not found: {path}")
    index: dict[int, int] = {}
    with open(path, encoding="ascii", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                raise DataFormatError(f"{path}: line {n} is not 'key<TAB>offset': {line.strip()!r}")
            index[int(parts[0])] = int(parts[1])
    return index


class RecordIOReader:
    """Read an insightface .rec (with its .idx for random access) as (RGB uint8 image, int label).

    ``reader[key]`` reads one record through the index; iterating yields every image record in
    file order (header and identity records, which hold no image, are skipped), and needs no index.
    ``header0`` is insightface's (first identity record, end) pair when record 0 is a header.
    """

    def __init__(self, rec: str | os.PathLike, idx: str | os.PathLike | None = None):
        self.rec = Path(rec)
        if not self.rec.is_file():
            raise DataFormatError(f"RecordIO file not found: {self.rec}")
        if idx is None and self.rec.with_suffix(".idx").is_file():
            idx = self.rec.with_suffix(".idx")
        self.index = read_idx(idx) if idx is not None else None
        self._fh: io.BufferedReader | None = None
        self._pid = -1
        self.header0: tuple[int, int] | None = None
        if self.index is not None and 0 in self.index:
            head, image = self.read_record(0)
            if head.flag > 0 and not image:
                self.header0 = (int(head.label[0]), int(head.label[1]))

    @property
    def keys(self) -> list[int]:
        """Keys of the image records: 1..header0[0]-1 for insightface packs, else every indexed key."""
        if self.index is None:
            raise DataFormatError(f"{self.rec}: random access needs the .idx file")
        if self.header0 is not None:
            return [k for k in range(1, self.header0[0]) if k in self.index]
        return sorted(self.index)

    def read_raw(self, key: int) -> bytes:
        """The payload of the record with this key."""
        if self.index is None:
            raise DataFormatError(f"{self.rec}: random access needs the .idx file")
        if key not in self.index:
            raise KeyError(f"{self.rec}: no record with key {key}")
        fh = self._handle()
        fh.seek(self.index[key])
        data = read_record_at(fh, f"{self.rec} key {key}")
        if data is None:
            raise DataFormatError(f"{self.rec}: key {key} points past the end of the file")
        return data

    def _handle(self) -> io.BufferedReader:
        # one handle per process: forked DataLoader workers would otherwise share one file offset
        if self._fh is None or self._pid != os.getpid():
            self._fh = open(self.rec, "rb")
            self._pid = os.getpid()
        return self._fh

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fh": None, "_pid": -1}

    def read_record(self, key: int) -> tuple[IRHeader, bytes]:
        """(IRHeader, encoded image bytes) of one record."""
        return unpack_record(self.read_raw(key))

    def __getitem__(self, key: int) -> tuple[np.ndarray, int]:
        head, image = self.read_record(key)
        if not image:
            raise DataFormatError(f"{self.rec}: record {key} holds no image (a header or identity record)")
        return _decode(image, f"{self.rec} key {key}"), int(head.first_label)

    def __len__(self) -> int:
        if self.index is None:  # TypeError keeps list(reader) working (it only asks for a length hint)
            raise TypeError(f"{self.rec}: the number of records needs the .idx file")
        return len(self.keys)

    def iter_records(self) -> Iterator[tuple[IRHeader, bytes]]:
        """Every record in file order as (IRHeader, encoded image bytes), image records or not."""
        with open(self.rec, "rb") as fh:
            n = 0
            while (data := read_record_at(fh, f"{self.rec} record {n}")) is not None:
                yield unpack_record(data)
                n += 1

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        for n, (head, image) in enumerate(self.iter_records()):
            if image:
                yield _decode(image, f"{self.rec} record {n}"), int(head.first_label)

    def close(self) -> None:
        """Close the .rec file."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> RecordIOReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_rec(rec: str | os.PathLike, idx: str | os.PathLike, images: Sequence[np.ndarray | bytes],
              labels: Sequence[int], insightface_header: bool = True, ext: str = ".jpg") -> None:
    """Write a .rec/.idx pair laid out like insightface's packs (used by tests and converters).

    With insightface_header: record 0 is the header (flag 2, labels [n+1, n+1+identities]), images
    are keys 1..n (sorted by label, as insightface packs are), then one identity record per label with
    labels [first key, end key). Otherwise images are keys 0..n-1 in the given order.
    """
    if len(images) != len(labels):
        raise ValueError("one label per image")
    order = sorted(range(len(images)), key=lambda i: labels[i]) if insightface_header else range(len(images))
    payloads: list[bytes] = []
    if insightface_header:
        ids = sorted(set(int(v) for v in labels))
        n = len(images)
        payloads.append(pack_record([n + 1, n + 1 + len(ids)], b""))
    payloads += [pack_record(float(labels[i]), encode_image(images[i], ext)) for i in order]
    if insightface_header:
        first_key = 1
        for lab in ids:
            count = sum(1 for v in labels if int(v) == lab)
            payloads.append(pack_record([first_key, first_key + count], b""))
            first_key += count
    offsets = []
    with atomic_write(Path(rec), mode="wb") as fh:
        for p in payloads:
            offsets.append(fh.tell())
            write_record(fh, p)
    with atomic_write(Path(idx)) as fh:
        fh.write("".join(f"{k}\t{off}\n" for k, off in enumerate(offsets)))


def _image_ext(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    return ".bin"


def rec_to_manifest(rec: str | os.PathLike, idx: str | os.PathLike | None, out_dir: str | os.PathLike,
                    domain: str = "insightface") -> list[ManifestRow]:
    """Unpack a .rec into out_dir/images/<label>/<key>.<ext> (the encoded bytes as stored, no re-encoding)
    and write out_dir/manifest.csv; returns the rows (absolute paths). Identity = the integer label."""
    out = Path(out_dir)
    rows: list[ManifestRow] = []
    with RecordIOReader(rec, idx) as reader:
        pairs = ((k, *reader.read_record(k)) for k in reader.keys) if reader.index is not None else (
            (n, h, im) for n, (h, im) in enumerate(reader.iter_records()))
        for key, head, image in pairs:
            if not image:
                continue
            ident = str(int(head.first_label))
            rel = Path("images") / ident / f"{key}{_image_ext(image)}"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(image)  # the manifest, written last and atomically, marks completion
            rows.append(ManifestRow(rel.as_posix(), ident, domain, {"key": str(key)}))
    write_manifest(rows, out / "manifest.csv")
    return [ManifestRow(str((out / r.path).resolve()), r.identity, r.domain, r.extra) for r in rows]
