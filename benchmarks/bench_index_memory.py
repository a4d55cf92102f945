"""Memory per face: FAISS index sizes at 128/256/512 dimensions, and the SQLite record cost per embedding.

Part "index": for each dimension d and index kind it builds the index on n random unit vectors (as the
gallery builds them: int64 ids through add_with_ids, inner product) and reports
- the serialised size (``faiss.serialize_index``), i.e. what the index file and a loaded index hold, and
- the RSS growth of the process across the build (after malloc_trim on both sides),
each in its own subprocess so one build's heap does not pollute the next. Sizes per 10^6 vectors are
extrapolated linearly from n = 10^5; one point at 2 x 10^5 per kind checks the linearity (the marginal
bytes per vector between the two sizes excludes the fixed costs: centroids, codebooks).

Kinds: flat = IndexIDMap2(IndexFlatIP) (the gallery's default); ivf_sq8 = IndexIVFScalarQuantizer QT_8bit;
ivf_pq_d8 / ivf_pq_d16 = IndexIVFPQ with d/8 or d/16 sub-quantisers of 8 bits; hnsw = IndexIDMap2(
IndexHNSWFlat M=32). IVF uses 256 lists (the gallery's auto_nlist at 10^5) at both sizes, k-means 10
iterations on at most 64 points per list (sizes do not depend on the training sample; the recall part
trains on 256 a list, as the gallery does). A one-off BLAS/k-means warm-up runs before the baseline so
OpenBLAS's buffers are not counted as index memory. HNSW is built with efConstruction 16 instead of the
gallery's 40 to fit the time budget: its memory does not depend on it (FAISS allocates 2M neighbour
slots on level 0 and M per upper level for every vector, filled or not).

Part "recall": recall against exact search of IVF_SQ8 and IVF_PQ on the clustered 512-d
data of bench_gallery.py (10^5 identities, 1,000 queries): recall@1 (same top-1 as exact search) and
recall@10 (share of the exact top-10 returned), IVF_FLAT at the same lists and nprobe as the reference
that separates the quantisation loss from the probing loss.

Part "sqlite": bytes per embedding row of the gallery's SQLite file, through the public API
(Gallery.create + enroll_many, 1,000 rows per transaction, 5 photos per identity, ~60-character source
paths, a 64-hex content hash and the 16-hex model fingerprint, as FaceRecognizer stores them).

    python benchmarks/bench_index_memory.py --out benchmarks/results/index_memory    # ~6 min on 2 cores
    python benchmarks/bench_index_memory.py --render    # rewrite the .md from the .json
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
NLIST = 256
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 16
TRAIN_PER_LIST_MEMORY = 64  # k-means sample for the memory runs (sizes do not depend on it); recall uses 256
KINDS = ("flat", "ivf_sq8", "ivf_pq_d8", "ivf_pq_d16", "hnsw")


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def pq_m(kind: str, d: int) -> int:
    return d // 8 if kind == "ivf_pq_d8" else d // 16


def formula(kind: str, d: int) -> dict:
    """Bytes per vector (marginal) and fixed bytes of FAISS's serialised layout."""
    if kind == "flat":
        return {"per_vector": 4 * d + 8, "fixed": 0, "text": "4d + 8 (float32 vector + int64 id)"}
    if kind == "ivf_sq8":
        return {"per_vector": d + 8, "fixed": NLIST * 4 * d + 2 * 4 * d,
                "text": "d + 8 (1 byte a component + int64 id); fixed nlist*4d centroids"}
    if kind.startswith("ivf_pq"):
        m = pq_m(kind, d)
        return {"per_vector": m + 8, "fixed": NLIST * 4 * d + 256 * 4 * d,
                "text": f"m + 8 (m={m} one-byte codes + int64 id); fixed nlist*4d centroids + 256*4d codebooks"}
    # HNSW: level 0 has 2M slots, each upper level M; P(level >= l) = M^-l, so E[upper levels] = 1/(M-1)
    links = 4 * (2 * HNSW_M + HNSW_M / (HNSW_M - 1))
    return {"per_vector": 4 * d + links + 8 + 4 + 8, "fixed": 0,
            "text": f"4d + 4(2M + M/(M-1)) + 8 + 4 + 8 = 4d + {links + 20:.0f} (vector, links, offset, level, id)"}


def build(kind: str, d: int, x: np.ndarray, train_per_list: int = 256):
    """The index of ``kind`` over x with ids 0..n-1; IVF trained on at most train_per_list points a list."""
    import faiss

    n = len(x)
    ids = np.arange(n, dtype=np.int64)
    if kind in ("flat", "hnsw"):
        if kind == "flat":
            inner = faiss.IndexFlatIP(d)
        else:
            inner = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index = faiss.IndexIDMap2(inner)
        for s in range(0, n, 65536):
            index.add_with_ids(x[s:s + 65536], ids[s:s + 65536])
        return index, inner
    quantizer = faiss.IndexFlatIP(d)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, d, NLIST, faiss.METRIC_INNER_PRODUCT)
    elif kind == "ivf_sq8":
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, NLIST, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFPQ(quantizer, d, NLIST, pq_m(kind, d), 8, faiss.METRIC_INNER_PRODUCT)
        index.pq.cp.niter = 10
        index.pq.cp.max_points_per_centroid = train_per_list
    index.cp.niter = 10
    index.cp.seed = 1234
    rng = np.random.default_rng(1234)
    sample = x[np.sort(rng.choice(n, min(n, train_per_list * NLIST), replace=False))]
    index.train(sample)
    del sample
    for s in range(0, n, 65536):
        index.add_with_ids(x[s:s + 65536], ids[s:s + 65536])
    return index, quantizer


def warm_up(d: int) -> None:
    """Run FAISS's BLAS and k-means paths once so their one-time buffers are not counted as the index."""
    import faiss

    y = unit_vectors(2048, d, seed=5)
    flat = faiss.IndexFlatIP(d)
    flat.add(y)
    flat.search(y[:256], 4)
    km = faiss.Kmeans(d, 16, niter=2, seed=1)
    km.train(y)


def child_index(kind: str, d: int, n: int) -> dict:
    import faiss

    faiss.omp_set_num_threads(THREADS)
    x = unit_vectors(n, d)
    warm_up(d)
    trim()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    index, keep = build(kind, d, x, train_per_list=TRAIN_PER_LIST_MEMORY)
    build_s = time.perf_counter() - t0
    trim()
    rss1 = rss_bytes()
    ser = int(faiss.serialize_index(index).nbytes)
    return {"kind": kind, "dim": d, "n": n, "serialized_bytes": ser, "rss_growth_bytes": rss1 - rss0,
            "build_s": round(build_s, 2),
            "ntotal": int(index.ntotal)}


def child_recall(n: int, nq: int) -> list[dict]:
    import faiss

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_gallery import make_data

    faiss.omp_set_num_threads(THREADS)
    x, q, _ = make_data(n, nq)
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    _, truth = flat.search(q, 10)
    rows = []
    for kind in ("ivf", "ivf_sq8", "ivf_pq_d8", "ivf_pq_d16"):
        t0 = time.perf_counter()
        index, _ = build(kind, x.shape[1], x)
        build_s = time.perf_counter() - t0
        for nprobe in (16, 64):
            index.nprobe = nprobe
            _, got = index.search(q, 10)
            at10 = np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth, strict=True)])
            rows.append({"kind": kind, "dim": x.shape[1], "n": n, "nlist": NLIST, "nprobe": nprobe,
                         "recall1": round(float(np.mean(got[:, 0] == truth[:, 0])), 3),
                         "recall10": round(float(at10), 3), "build_s": round(build_s, 1)})
    return rows


def child_sqlite(d: int, n: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from facemeta.gallery import Gallery

    x = unit_vectors(n, d, seed=7)
    per_person = 5
    names = [f"Person {i // per_person:07d}" for i in range(n)]
    # ~60-character paths, like an LFW-style tree on a data disk
    sources = [f"/data/faces/lfw/images/Person_{i // per_person:07d}/Person_{i // per_person:07d}_{i % per_person:04d}.jpg"
               for i in range(n)]
    rng = np.random.default_rng(3)
    hashes = [rng.bytes(32).hex() for _ in range(n)]
    fingerprint = "0123456789abcdef"  # FaceEmbedder.fingerprint: 16 hex digits
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        path = Path(tmp) / "g"
        g = Gallery.create(path, dim=d, fingerprint=fingerprint)
        g.close()
        db = path / "gallery.sqlite"
        empty = db.stat().st_size
        g = Gallery.open(path, mode="w")
        t0 = time.perf_counter()
        for s in range(0, n, 1000):
            g.enroll_many(names[s:s + 1000], x[s:s + 1000], fingerprint=fingerprint, sources=sources[s:s + 1000],
                          scores=[0.999] * len(names[s:s + 1000]), content_hashes=hashes[s:s + 1000])
        enroll_s = time.perf_counter() - t0
        g.close()
        import sqlite3

        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        freelist = conn.execute("PRAGMA freelist_count").fetchone()[0]
        conn.close()
        wal = db.with_name(db.name + "-wal")
        files = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}
        size = db.stat().st_size
    return {"dim": d, "n": n, "db_bytes": size, "empty_db_bytes": empty,
            "wal_bytes": files.get(wal.name, 0), "page_size": page, "page_count": pages, "freelist": freelist,
            "bytes_per_row": round((size - empty) / n, 1), "index_file_bytes": files.get("index.faiss", None),
            "files": files, "avg_source_chars": round(float(np.mean([len(s) for s in sources])), 1),
            "identities": n // per_person, "enroll_rows_per_s": round(n / enroll_s, 1)}


def run_child(args: list[str], timeout: float) -> dict | list:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{' '.join(args)} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mb(b: float) -> float:
    return round(b / 1e6, 1)


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# Memory per face: FAISS index sizes and the SQLite record",
        "",
        f"Measured {m['date']} on {m['machine']}, {m['cpus']} CPU cores (shared with other jobs), Python {m['python']}, "
        f"faiss {m['faiss']}, numpy {m['numpy']}, SQLite {m['sqlite']}, with `python benchmarks/bench_index_memory.py`. "
        f"Random unit vectors, int64 ids added with add_with_ids (as facemeta/gallery/faiss_index.py does), inner "
        f"product, FAISS on {THREADS} threads. IVF: {NLIST} lists, k-means 10 iterations on at most "
        f"{TRAIN_PER_LIST_MEMORY} points a list (sizes do not depend on it), after a BLAS warm-up. "
        f"HNSW: M={HNSW_M}, efConstruction {HNSW_EF_CONSTRUCTION} (memory does not depend on it). Load average "
        f"{m.get('load_start')} at start, {m.get('load_end')} at end; the run took {m.get('total_s')} s.",
        "",
        "**Per 10^6 vectors is extrapolated linearly from 10^5** (10 x the size at 10^5; for IVF this counts the fixed "
        "centroids and codebooks ten times, so it slightly overstates). The 2 x 10^5 columns check linearity: size at "
        "2 x 10^5 over size at 10^5 (2.00 = linear) and the marginal bytes per vector between the two sizes (fixed "
        "costs cancel). MB = 10^6 bytes. Formula MB per 10^6 = per-vector bytes x 10^6 + the fixed bytes.",
        "",
        "| dim | index | formula, bytes/vector | formula MB per 10^6 | serialized MB at 10^5 | **serialized MB per 10^6** | "
        "RSS growth MB per 10^6 | x at 2x10^5 | marginal serialized B/vector | marginal RSS B/vector | "
        "build s at 10^5 |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    check = {(r["kind"], r["dim"]): r for r in res["index"] if r["n"] == res["check_n"]}
    for r in sorted((r for r in res["index"] if r["n"] == res["n"]), key=lambda r: (r["dim"], KINDS.index(r["kind"]))):
        f = formula(r["kind"], r["dim"])
        scale = 1e6 / r["n"]
        c = check.get((r["kind"], r["dim"]))
        ratio = f"{c['serialized_bytes'] / r['serialized_bytes']:.3f}" if c else "-"
        marginal = f"{(c['serialized_bytes'] - r['serialized_bytes']) / (c['n'] - r['n']):.1f}" if c else "-"
        marginal_rss = f"{(c['rss_growth_bytes'] - r['rss_growth_bytes']) / (c['n'] - r['n']):.1f}" if c else "-"
        label = r["kind"] if not r["kind"].startswith("ivf_pq") else f"ivf_pq m={pq_m(r['kind'], r['dim'])}"
        lines.append(
            f"| {r['dim']} | {label} | {f['text']} | {mb(f['per_vector'] * 1e6 + f['fixed'])} | "
            f"{mb(r['serialized_bytes'])} | **{mb(r['serialized_bytes'] * scale)}** | {mb(r['rss_growth_bytes'] * scale)} | "
            f"{ratio} | {marginal} | {marginal_rss} | {r['build_s']} |")
    if res.get("recall"):
        lines += ["", f"## Recall against exact search (clustered 512-d data of bench_gallery.py, "
                      f"{res['recall'][0]['n']:,} identities, 1,000 queries, {NLIST} lists, k-means on 256 points "
                      f"a list)", "",
                  "recall@1: the same top-1 as exact flat search (what identification uses); recall@10: the share "
                  "of the exact top-10 returned (sensitive to the quantisation error among near neighbours). "
                  "ivf (float32 codes, same lists and nprobe) is the reference: the gap to it is the quantisation "
                  "loss, the gap from it to 1.0 the probing loss.", "",
                  "| index | nprobe | recall@1 | recall@10 | build s |", "|---|---:|---:|---:|---:|"]
        for r in res["recall"]:
            label = r["kind"] if not r["kind"].startswith("ivf_pq") else f"ivf_pq m={pq_m(r['kind'], r['dim'])}"
            lines.append(f"| {label} | {r['nprobe']} | {r['recall1']:.3f} | {r['recall10']:.3f} | {r['build_s']} |")
    if res.get("sqlite"):
        lines += ["", "## SQLite record per embedding (gallery.sqlite through `Gallery.enroll_many`)", "",
                  "Rows of the `embeddings` table (float32 BLOB, source path, score, 16-hex fingerprint, time, 64-hex "
                  "content hash, identity id) plus the identities table (5 photos per identity) and the "
                  "identity index, committed 1,000 rows a transaction; bytes/row = (file size after - empty file) / rows, "
                  "after close (WAL checkpointed).", "",
                  "| dim | rows | avg source chars | vector BLOB bytes | **bytes/row** | MB per 10^6 rows | page size | "
                  "rows/s enrolled | index file MB (flat) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["sqlite"]:
            idx = mb(r["index_file_bytes"]) if r.get("index_file_bytes") else "-"
            lines.append(f"| {r['dim']} | {r['n']:,} | {r['avg_source_chars']} | {4 * r['dim']} | **{r['bytes_per_row']}** | "
                         f"{mb(r['bytes_per_row'] * 1e6)} | {r['page_size']} | {r['enroll_rows_per_s']} | {idx} |")
    lines += ["", "Notes:", "",
              "- Serialized size = what FAISS writes and what a loaded index holds; RSS growth adds the allocator's "
              "slack and, for IndexIDMap2 (flat, hnsw), its in-memory reverse id map, which is not serialized.",
              "- Build-time peaks (k-means samples, PQ training, add buffers) are not reported: they size the machine "
              "that builds an index, not the one that serves it.",
              "- These are FAISS's layouts (what the gallery uses today). Milvus builds its in-memory indexes with "
              "its own engine (knowhere); the per-vector terms (codes + id) are the same order, but Milvus's own "
              "per-row costs (primary key, timestamps, scalar fields, growing segments) were not measured here."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--check-n", type=int, default=200_000, help="second size that checks linearity")
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS))
    ap.add_argument("--check", nargs="+", default=["flat:512", "ivf_sq8:512", "ivf_pq_d8:512", "hnsw:128"],
                    help="KIND:DIM pairs measured at --check-n")
    ap.add_argument("--parts", nargs="+", default=["index", "recall", "sqlite"])
    ap.add_argument("--sqlite-dims", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/index_memory"))
    ap.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        what = args.child[0]
        if what == "index":
            out = child_index(args.child[1], int(args.child[2]), int(args.child[3]))
        elif what == "recall":
            out = child_recall(int(args.child[1]), int(args.child[2]))
        else:
            out = child_sqlite(int(args.child[1]), int(args.child[2]))
        print(json.dumps(out))
        return 0

    if args.render:
        res = json.loads(args.out.with_suffix(".json").read_text())
        args.out.with_suffix(".md").write_text(markdown(res))
        return 0

    import sqlite3

    import faiss

    res = {"machine": {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                       "machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                       "faiss": faiss.__version__, "numpy": np.__version__, "sqlite": sqlite3.sqlite_version,
                       "load_start": round(os.getloadavg()[0], 2)},
           "n": args.n, "check_n": args.check_n, "index": [], "recall": [], "sqlite": []}
    t_start = time.perf_counter()
    if "index" in args.parts:
        jobs = [(k, d, args.n) for d in args.dims for k in args.kinds]
        jobs += [(k, int(d), args.check_n) for k, d in (c.split(":") for c in args.check) if k in args.kinds]
        for kind, d, n in jobs:
            t0 = time.perf_counter()
            r = run_child(["index", kind, str(d), str(n)], timeout=600)
            res["index"].append(r)
            print(f"{kind:11s} d={d:4d} n={n:7d} serialized {mb(r['serialized_bytes']):8.1f} MB  "
                  f"rss +{mb(r['rss_growth_bytes']):8.1f} MB  build {r['build_s']:6.1f}s  ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
    if "recall" in args.parts:
        res["recall"] = run_child(["recall", str(args.n), "1000"], timeout=600)
        for r in res["recall"]:
            print(f"recall {r['kind']} nprobe={r['nprobe']}: {r['recall1']}", flush=True)
    if "sqlite" in args.parts:
        for d in args.sqlite_dims:
            r = run_child(["sqlite", str(d), str(args.n)], timeout=600)
            res["sqlite"].append(r)
            print(f"sqlite d={d}: {r['bytes_per_row']} bytes/row ({r['enroll_rows_per_s']} rows/s)", flush=True)
    res["machine"]["load_end"] = round(os.getloadavg()[0], 2)
    res["machine"]["total_s"] = round(time.perf_counter() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(res))
    print(f"wrote {args.out}.json and .md in {res['machine']['total_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
