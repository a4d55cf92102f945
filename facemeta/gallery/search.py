"""FAISS side of the gallery: index kinds, the stamped index file, and identity-level ranking.

Everything here works on unit vectors compared by inner product (cosine similarity) with int64
embedding ids. It knows nothing about SQLite: store.py owns the records and calls these functions.

Index kinds (``IndexSpec.kind``):
- ``flat``: exact search (IndexIDMap2 over IndexFlatIP). The default; removal is native.
- ``hnsw``: graph search (IndexHNSWFlat, ``m``, ``ef_construction``, ``ef_search``). HNSW cannot
  delete, so removed ids become *tombstones* excluded at search time with an IDSelector; the index
  is rebuilt once tombstones pass a quarter of it.
- ``ivf`` / ``ivf_sq8``: inverted lists (IndexIVFFlat or IndexIVFScalarQuantizer with 8-bit codes,
  ``nlist``, ``nprobe``). IVF must be trained on enough vectors (``MIN_POINTS_PER_LIST`` per list);
  until the gallery holds that many the index is exact flat, and it is trained when it grows.
  For 10^6 faces ``ivf_sq8`` (1,024 lists, nprobe 16) is the measured choice: recall@1 0.99 against
  exact search at ~1 ms a query on one core, a quarter of the memory (benchmarks/results/gallery.md).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import stat
import struct
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np

from facemeta.atomic import atomic_write
from facemeta.errors import GalleryError

KINDS = ("flat", "hnsw", "ivf", "ivf_sq8")
SCORINGS = ("best", "mean")
MAGIC = b"FMGIDX01"
MIN_POINTS_PER_LIST = 39  # FAISS warns below 39 training points per centroid
# IVF k-means: FAISS's cap of 256 training points per list, but 10 iterations instead of 25. Measured on
# 10^5 clustered 512-d vectors, 1,024 lists: 10 iterations lose no recall@1 (0.994 at nprobe 16, as with
# 25) while 64 points per list lose ~0.015 whatever the iterations (benchmarks/results/gallery.md).
MAX_TRAIN_POINTS_PER_LIST = 256
KMEANS_ITERATIONS = 10
TOMBSTONE_FRACTION = 0.25  # rebuild an HNSW index once this share of it is deleted


@dataclass(frozen=True)
class IndexSpec:
    """Which FAISS index a gallery uses and its knobs (stored in the gallery at creation).

    ``nlist=0`` means automatic: about sqrt(N) lists, a power of two, chosen when IVF is trained.
    """

    kind: str = "flat"
    m: int = 32
    ef_construction: int = 40
    ef_search: int = 64
    nlist: int = 0
    nprobe: int = 16

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GalleryError(f"unknown index kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        for name in ("m", "ef_construction", "ef_search", "nprobe"):
            if int(getattr(self, name)) < 1:
                raise GalleryError(f"index setting {name} must be >= 1, got {getattr(self, name)}")
        if int(self.nlist) < 0:
            raise GalleryError(f"index setting nlist must be >= 0, got {self.nlist}")

    def to_json(self) -> str:
        """Serialise for the gallery's meta table."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> IndexSpec:
        """Parse what to_json wrote; unknown or bad fields raise GalleryError."""
        try:
            data = json.loads(text)
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise GalleryError(f"bad index settings in the gallery: {text!r} ({exc})") from None

    def with_search(self, ef_search: int | None = None, nprobe: int | None = None) -> IndexSpec:
        """A copy with other search-time knobs (they can change without rebuilding)."""
        return replace(self, ef_search=ef_search or self.ef_search, nprobe=nprobe or self.nprobe)


def auto_nlist(n: int) -> int:
    """About sqrt(n) inverted lists, rounded to a power of two, at least 16.

    Measured (benchmarks/results/gallery.md): 1,024 lists over 10^6 clustered 512-d vectors reach
    recall@1 0.99 at nprobe 4 and train in minutes on 2 cores; 4*sqrt(n) (4,096) would train ~4x longer.
    """
    return max(16, 2 ** round(math.log2(max(1.0, math.sqrt(n)))))


def ivf_nlist(spec: IndexSpec, n: int) -> int:
    """The number of lists IVF would use for n vectors, or 0 when n is too few to train."""
    nlist = spec.nlist or auto_nlist(n)
    return nlist if n >= MIN_POINTS_PER_LIST * nlist else 0


@dataclass
class BuiltIndex:
    """A FAISS index plus what the gallery needs to know about it.

    ``kind`` is the kind actually built ("flat" while an IVF gallery is too small to train);
    ``tombstones`` are ids still inside an HNSW index but deleted from the gallery;
    ``trained_on`` is the gallery size when IVF was trained (it is retrained after 8x growth).
    """

    index: faiss.Index
    spec: IndexSpec
    kind: str
    dim: int
    tombstones: set[int] = field(default_factory=set)
    trained_on: int = 0
    nlist: int = 0

    @property
    def count(self) -> int:
        """Live vectors in the index (tombstones excluded)."""
        return int(self.index.ntotal) - len(self.tombstones)

    def header(self) -> dict:
        """What the index file records about this index (generation and checksum are added on save)."""
        return {"kind": self.kind, "spec": asdict(self.spec), "dim": self.dim, "count": self.count,
                "ntotal": int(self.index.ntotal), "tombstones": sorted(self.tombstones),
                "trained_on": self.trained_on, "nlist": self.nlist}


def _flat(dim: int) -> faiss.Index:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def empty_index(spec: IndexSpec, dim: int) -> BuiltIndex:
    """An empty index of the spec's kind (IVF starts as flat until it can be trained)."""
    if spec.kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, spec.m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = spec.ef_construction
        inner.hnsw.efSearch = spec.ef_search
        return BuiltIndex(faiss.IndexIDMap2(inner), spec, "hnsw", dim)
    return BuiltIndex(_flat(dim), spec, "flat", dim)


def build_index(spec: IndexSpec, dim: int, vectors: np.ndarray, ids: np.ndarray, seed: int = 1234) -> BuiltIndex:
    """Build an index of the spec's kind over vectors with the given int64 ids (training IVF when possible)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    n = len(ids)
    if spec.kind in ("ivf", "ivf_sq8") and ivf_nlist(spec, n):
        nlist = ivf_nlist(spec, n)
        quantizer = faiss.IndexFlatIP(dim)
        if spec.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                                  faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.cp.niter = KMEANS_ITERATIONS
        sample = vectors
        limit = MAX_TRAIN_POINTS_PER_LIST * nlist
        if n > limit:
            rng = np.random.default_rng(seed)
            sample = vectors[np.sort(rng.choice(n, limit, replace=False))]
        index.train(sample)
        index.nprobe = spec.nprobe
        built = BuiltIndex(index, spec, spec.kind, dim, trained_on=n, nlist=nlist)
    else:
        built = empty_index(spec, dim)
    if n:
        # Add in chunks so FAISS's temporary buffers stay small for 10^6 vectors.
        for start in range(0, n, 65536):
            built.index.add_with_ids(vectors[start:start + 65536], ids[start:start + 65536])
    return built


def needs_rebuild(built: BuiltIndex) -> bool:
    """True when the index should be rebuilt from the records: IVF now trainable or outgrown, or
    HNSW carrying too many tombstones."""
    if built.spec.kind in ("ivf", "ivf_sq8"):
        if built.kind == "flat":
            return bool(ivf_nlist(built.spec, built.count))
        return built.spec.nlist == 0 and built.count >= 8 * max(1, built.trained_on)
    if built.kind == "hnsw":
        return len(built.tombstones) > TOMBSTONE_FRACTION * max(1, int(built.index.ntotal))
    return False


def add_vectors(built: BuiltIndex, vectors: np.ndarray, ids: np.ndarray) -> None:
    """Add vectors under their ids."""
    if len(ids):
        built.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32),
                                 np.ascontiguousarray(ids, dtype=np.int64))


def remove_ids(built: BuiltIndex, ids: np.ndarray | list[int]) -> None:
    """Remove ids (natively for flat and IVF; as tombstones for HNSW). Absent ids are ignored."""
    ids = np.asarray(ids, dtype=np.int64)
    if not len(ids):
        return
    if built.kind == "hnsw":
        built.tombstones.update(int(i) for i in ids)
    else:
        built.index.remove_ids(ids)


def set_search_params(built: BuiltIndex, spec: IndexSpec) -> None:
    """Apply search-time knobs (efSearch, nprobe) to the index in place."""
    if built.kind == "hnsw":
        faiss.downcast_index(built.index.index).hnsw.efSearch = spec.ef_search
    elif built.kind in ("ivf", "ivf_sq8"):
        faiss.extract_index_ivf(built.index).nprobe = spec.nprobe


def search_vectors(built: BuiltIndex, queries: np.ndarray, k: int,
                   gpu_index: faiss.Index | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k stored embeddings per query: (scores [n,k], ids [n,k]; id -1 where fewer exist)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = max(1, min(int(k), max(1, built.count)))
    if built.tombstones:
        dead = faiss.IDSelectorBatch(np.fromiter(built.tombstones, dtype=np.int64))
        params = faiss.SearchParametersHNSW(sel=faiss.IDSelectorNot(dead), efSearch=built.spec.ef_search)
        return built.index.search(queries, k, params=params)
    # FAISS's GPU indexes answer at most k=2048; larger k (rare: deep identity-level top-k) stays on the CPU.
    index = gpu_index if gpu_index is not None and k <= 2048 else built.index
    return index.search(queries, k)


def to_gpu(built: BuiltIndex) -> faiss.Index | None:
    """A GPU copy of a flat or IVF index when FAISS has GPUs, else None (HNSW stays on the CPU)."""
    if built.kind == "hnsw" or not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() < 1:
        return None
    try:
        return faiss.index_cpu_to_all_gpus(built.index)
    except (RuntimeError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------
# The index file: MAGIC, u32 header length, JSON header (generation, crc32, sizes, and the binding to
# its database: gallery id and embeddings digest), FAISS bytes.

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
    with atomic_write(path, "wb") as fh:
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


def open_regular(path: Path):
    """Open a gallery file for reading without following a symbolic link or blocking on a FIFO;
    anything but a regular file is a one-line GalleryError (OSError for a missing file)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise GalleryError(f"{path} is a symbolic link; a gallery's files must be plain files inside "
                               "its folder") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise GalleryError(f"{path} is not a regular file")
    return os.fdopen(fd, "rb")


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


# ---------------------------------------------------------------------------------------------
# From embedding hits to identities.

def rank_identities(scores: np.ndarray, ids: np.ndarray, identity_of: dict[int, int], k: int) -> list[tuple[int, float, int]]:
    """Best-match ranking: the first k distinct identities among hits sorted by score.

    Returns (identity_id, score, embedding_id) tuples; an identity's score is its best embedding's.
    """
    out: list[tuple[int, float, int]] = []
    seen: set[int] = set()
    for score, eid in zip(scores.tolist(), ids.tolist(), strict=True):
        if eid < 0:
            continue
        ident = identity_of.get(eid)
        if ident is None or ident in seen:
            continue
        seen.add(ident)
        out.append((ident, float(score), int(eid)))
        if len(out) == k:
            break
    return out


def mean_scores(query: np.ndarray, vectors_by_identity: dict[int, tuple[np.ndarray, np.ndarray]]
                ) -> list[tuple[int, float, int]]:
    """Mean-match scores: each identity's mean cosine over all its embeddings (and its best embedding id)."""
    out = []
    for ident, (eids, vecs) in vectors_by_identity.items():
        sims = vecs @ query
        out.append((ident, float(sims.mean()), int(eids[int(np.argmax(sims))])))
    out.sort(key=lambda t: -t[1])
    return out


def index_ids(built: BuiltIndex) -> np.ndarray:
    """Every id stored in the index (tombstones included), sorted: the open-time consistency check
    compares these with the database's ids."""
    index = built.index
    if hasattr(index, "id_map"):
        ids = faiss.vector_to_array(index.id_map)
    else:
        ivf = faiss.extract_index_ivf(index)
        inv = ivf.invlists
        parts = [faiss.rev_swig_ptr(inv.get_ids(lst), inv.list_size(lst)).copy()
                 for lst in range(ivf.nlist) if inv.list_size(lst)]
        ids = np.concatenate(parts) if parts else np.empty(0, np.int64)
    return np.sort(ids.astype(np.int64))


def stored_vectors(built: BuiltIndex, ids: np.ndarray, chunk: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The vectors the index holds for ``ids``, as (ids, vectors) chunks: exact for flat, HNSW and IVF,
    decoded 8-bit codes for ivf_sq8 (the integrity check compares them with the database's)."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    index = built.index
    ivf = None if hasattr(index, "id_map") else faiss.extract_index_ivf(index)
    if ivf is not None:  # IVF looks ids up through a direct map, built for the check and dropped after
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    try:
        for start in range(0, len(ids), chunk):
            part = ids[start:start + chunk]
            yield part, index.reconstruct_batch(part)
    finally:
        if ivf is not None:
            with contextlib.suppress(RuntimeError):
                ivf.set_direct_map_type(faiss.DirectMap.NoMap)
