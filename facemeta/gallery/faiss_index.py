"""The FAISS index of a gallery: index kinds, building, changing and searching one.

Everything here works on unit vectors compared by inner product (cosine similarity) with int64
embedding ids. It knows nothing about SQLite (records.py owns the records) nor about the index file
(index_file.py); store.py joins them.

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
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace

import faiss
import numpy as np

from facemeta.errors import GalleryError
from facemeta.registry import Registry

# The index kinds (name -> a line on what it is): IndexSpec and `facemeta enroll --index` read this registry.
KINDS: Registry[str] = Registry("index kind", error=GalleryError)
KINDS.register("flat", "exact search (the default)")
KINDS.register("hnsw", "graph search (HNSW; deletions are tombstones)")
KINDS.register("ivf", "inverted lists (trained once the gallery is large enough)")
KINDS.register("ivf_sq8", "inverted lists with 8-bit codes (a quarter of the memory)")
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
        KINDS.get(self.kind)  # GalleryError naming the kinds when there is no such kind
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


def tombstone_ids(built: BuiltIndex) -> np.ndarray:
    """The ids still inside an HNSW index but deleted from the gallery, as int64 (empty for other kinds)."""
    return np.fromiter(built.tombstones, dtype=np.int64, count=len(built.tombstones))


def search_vectors(built: BuiltIndex, queries: np.ndarray, k: int,
                   gpu_index: faiss.Index | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k stored embeddings per query: (scores [n,k], ids [n,k]; id -1 where fewer exist)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = max(1, min(int(k), max(1, built.count)))
    if built.tombstones:
        dead = faiss.IDSelectorBatch(tombstone_ids(built))
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


def index_ids(built: BuiltIndex) -> np.ndarray:
    """Every id stored in the index (tombstones included), sorted (``live_ids`` leaves the tombstones out)."""
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


def live_ids(built: BuiltIndex) -> np.ndarray:
    """Every id the index answers with (its stored ids minus the tombstones), sorted: reconciling the
    index with the database and the integrity check compare these with the database's ids."""
    ids = index_ids(built)
    if built.tombstones:
        ids = ids[~np.isin(ids, tombstone_ids(built))]
    return ids


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
