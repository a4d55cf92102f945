"""Gallery search benchmark: flat vs HNSW vs IVF on clustered synthetic 512-d unit vectors.

Data model (stated so the numbers can be judged): G=1024 "group" directions (random unit
vectors, think demographics); each identity centre = normalise(group + 1.53 u) so identities of
one group have cosine ~0.3; each enrolled image and each query = normalise(centre + 0.816 n), so
two images of one person have cosine ~0.6 and of two people of one group ~0.18 (u, n ~ N(0, I/512)).
One image is enrolled per identity (N identities); queries are new images of enrolled identities.

For every gallery size and index it reports build time, single-query latency p50/p99 (one query
per call, as a live identification service sees them), batched QPS, recall@1 against exact flat
search, and the index size; each (size, index) runs in its own subprocess so the peak RSS it
reports is that configuration's. FAISS runs on 2 threads (the target machine has 2 cores).

    python benchmarks/bench_gallery.py --sizes 10000 100000 1000000 --out benchmarks/results/gallery
    python benchmarks/bench_gallery.py --part store --sizes 10000 100000   # through Gallery (SQLite + index)
    python benchmarks/bench_gallery.py --part files --people 10           # enroll from image files
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 512
GROUPS = 1024
TAU = 1.53  # identity spread around its group
SIGMA = 0.816  # image noise around the identity centre
THREADS = 2
NLIST = int(os.environ.get("BENCH_NLIST", "0"))  # 0: about 4*sqrt(N), at most 4096
HNSW_M = int(os.environ.get("BENCH_HNSW_M", "32"))


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_data(n: int, nq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Enrolled vectors [n, 512], queries [nq, 512] and each query's true identity (row index)."""
    rng = np.random.default_rng(seed)
    groups = _unit(rng.standard_normal((GROUPS, DIM), dtype=np.float32))
    truth = np.sort(rng.choice(n, nq, replace=False))
    enrolled = np.empty((n, DIM), np.float32)
    queries = np.empty((nq, DIM), np.float32)
    chunk = 50_000
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        crng = np.random.default_rng([seed, start])
        g = groups[crng.integers(0, GROUPS, m)]
        centres = _unit(g + TAU * crng.standard_normal((m, DIM), dtype=np.float32) / np.sqrt(DIM))
        enrolled[start:start + m] = _unit(centres + SIGMA * crng.standard_normal((m, DIM), dtype=np.float32) / np.sqrt(DIM))
        sel = (truth >= start) & (truth < start + m)
        c = centres[truth[sel] - start]
        queries[sel] = _unit(c + SIGMA * crng.standard_normal(c.shape, dtype=np.float32) / np.sqrt(DIM))
    return enrolled, queries, truth


def _latency(fn, queries: np.ndarray, limit: int) -> tuple[float, float]:
    times = []
    for q in queries[:limit]:
        t0 = time.perf_counter()
        fn(q[None])
        times.append(time.perf_counter() - t0)
    t = np.array(times) * 1000.0
    return float(np.percentile(t, 50)), float(np.percentile(t, 99))


def run_index(n: int, kind: str, nq: int, data_dir: Path) -> list[dict]:
    """Build one index over the cached data and sweep its search knob; one row per setting."""
    import faiss

    from facemeta.gallery import faiss_index as gallery_index
    from facemeta.gallery.faiss_index import IndexSpec, build_index, search_vectors, set_search_params
    from facemeta.gallery.index_file import save_index

    faiss.omp_set_num_threads(THREADS)
    enrolled = np.load(data_dir / f"enrolled-{n}.npy", mmap_mode="r")
    queries = np.load(data_dir / f"queries-{n}.npy")
    truth = np.load(data_dir / f"truth-{n}.npy")
    exact = np.load(data_dir / f"exact-{n}.npy")
    ids = np.arange(n, dtype=np.int64)
    nlist = NLIST or max(16, min(4096, 2 ** int(np.log2(max(16, 4 * np.sqrt(n))))))
    while nlist > 16 and n < 39 * nlist:
        nlist //= 2
    spec = IndexSpec(kind=kind, m=HNSW_M, ef_construction=40, nlist=nlist if kind.startswith("ivf") else 0)
    t0 = time.perf_counter()
    built = build_index(spec, DIM, np.asarray(enrolled), ids)
    build_s = time.perf_counter() - t0
    del enrolled
    with tempfile.TemporaryDirectory() as tmp:  # the gallery's own streaming save (no in-memory copy)
        t0 = time.perf_counter()
        save_index(built, Path(tmp) / "index.faiss", 0, "bench")
        save_s = time.perf_counter() - t0
        index_bytes = (Path(tmp) / "index.faiss").stat().st_size
    sweep = {"flat": [None], "hnsw": [16, 32, 64, 128, 256], "ivf": [1, 4, 8, 16, 32, 64, 128], "ivf_sq8": [1, 4, 8, 16, 32, 64, 128]}[kind]
    rows = []
    for knob in sweep:
        s = spec.with_search(ef_search=knob if kind == "hnsw" else None, nprobe=knob if kind.startswith("ivf") else None)
        built.spec = s
        set_search_params(built, s)
        limit = 100 if (kind == "flat" and n >= 1_000_000) else min(nq, 500)
        faiss.omp_set_num_threads(1)  # one query per thread: OpenMP on a busy 2-core box costs 40 ms a call
        p50, p99 = _latency(lambda q: search_vectors(built, q, 1), queries, limit)
        faiss.omp_set_num_threads(THREADS)
        t0 = time.perf_counter()
        _, top = search_vectors(built, queries, 1)
        qps = nq / (time.perf_counter() - t0)
        rows.append({"n": n, "index": kind if kind != "hnsw" else f"hnsw M={HNSW_M}",
                     "train": (f"{gallery_index.MAX_TRAIN_POINTS_PER_LIST}/list x{gallery_index.KMEANS_ITERATIONS}"
                               if kind.startswith("ivf") else None), "knob": None if knob is None else ("efSearch" if kind == "hnsw" else "nprobe"),
                     "value": knob, "nlist": built.nlist or None, "build_s": round(build_s, 2), "save_s": round(save_s, 2),
                     "p50_ms": round(p50, 3), "p99_ms": round(p99, 3), "qps_batch": round(qps, 1),
                     "recall1_vs_flat": float(np.mean(top[:, 0] == exact)),
                     "acc1_vs_truth": float(np.mean(top[:, 0] == truth)),
                     "index_mb": round(index_bytes / 2**20, 1), "latency_queries": limit})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    for r in rows:
        r["peak_rss_mb"] = round(peak, 1)
    return rows


def prepare(n: int, nq: int, data_dir: Path) -> None:
    """Generate and cache the data and the exact (flat) top-1 of every query."""
    import faiss
    faiss.omp_set_num_threads(THREADS)
    if (data_dir / f"exact-{n}.npy").exists():
        return
    enrolled, queries, truth = make_data(n, nq)
    np.save(data_dir / f"enrolled-{n}.npy", enrolled)
    np.save(data_dir / f"queries-{n}.npy", queries)
    np.save(data_dir / f"truth-{n}.npy", truth)
    index = faiss.IndexFlatIP(DIM)
    index.add(enrolled)
    _, top = index.search(queries, 1)
    np.save(data_dir / f"exact-{n}.npy", top[:, 0])


def run_store(n: int, nq: int) -> list[dict]:
    """End to end through facemeta.gallery.Gallery: enroll throughput (vectors/s, committed in
    batches of 1,000 identities), open time, and identify latency against raw FAISS flat search."""
    import faiss

    from facemeta.gallery import Gallery
    from facemeta.gallery.faiss_index import search_vectors

    faiss.omp_set_num_threads(THREADS)
    enrolled, queries, truth = make_data(n, nq)
    names = [f"id{i:07d}" for i in range(n)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "g"
        g = Gallery.create(path, dim=DIM, fingerprint="bench")
        t0 = time.perf_counter()
        for start in range(0, n, 1000):
            g.enroll_many(names[start:start + 1000], enrolled[start:start + 1000], fingerprint="bench")
        g.save()
        enroll_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        one_by_one = 200
        extra = _unit(np.random.default_rng(99).standard_normal((one_by_one, DIM), dtype=np.float32))
        for i in range(one_by_one):
            g.enroll(f"extra{i}", extra[i], fingerprint="bench")
        single_s = (time.perf_counter() - t0) / one_by_one
        g.close()
        t0 = time.perf_counter()
        g = Gallery.open(path)
        open_s = time.perf_counter() - t0
        faiss.omp_set_num_threads(1)
        # Interleaved (gallery call, raw FAISS call) per query so both see the same machine load.
        t_gal, t_raw = [], []
        for q in queries[:500]:
            t0 = time.perf_counter()
            g.search(q[None], k=1)
            t1 = time.perf_counter()
            search_vectors(g._index.built, q[None], 1)
            t_gal.append(t1 - t0)
            t_raw.append(time.perf_counter() - t1)
        p50, p99 = (float(np.percentile(np.array(t_gal) * 1000, p)) for p in (50, 99))
        raw50, raw99 = (float(np.percentile(np.array(t_raw) * 1000, p)) for p in (50, 99))
        faiss.omp_set_num_threads(THREADS)
        got = [m[0].name for m in g.search(queries, k=1)]
        acc = float(np.mean([a == names[t] for a, t in zip(got, truth, strict=True)]))
        db_mb = (path / "gallery.sqlite").stat().st_size / 2**20
        g.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows.append({"n": n, "enroll_vectors_per_s_batched": round(n / enroll_s, 1),
                 "enroll_single_ms": round(single_s * 1000, 2), "open_s": round(open_s, 3),
                 "search_p50_ms": round(p50, 3), "search_p99_ms": round(p99, 3),
                 "raw_faiss_p50_ms": round(raw50, 3), "raw_faiss_p99_ms": round(raw99, 3),
                 "acc1": acc, "db_mb": round(db_mb, 1), "peak_rss_mb": round(peak, 1)})
    return rows


def run_files(data: Path, people: int, threads: int) -> dict:
    """End to end from image files: FaceRecognizer.enroll_folder over ORL people (MTCNN, alignment,
    model, SQLite, index). Uses the project's model when weights/ has one, else a randomly initialised
    mobilenetv3_small_100 (512-d, 112 px): speed does not depend on the weights' values."""
    import torch

    from facemeta.embedder import FaceEmbedder, default_model_path
    from facemeta.errors import CheckpointError
    from facemeta.recognizer import FaceRecognizer

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        try:
            model = default_model_path()
            cfg = FaceEmbedder(model).model.config
            which = f"shipped model weights/{model.name} ({cfg.backbone}, {cfg.image_size} px)"
        except CheckpointError:
            from facemeta.models.backbone import ModelConfig, build_model
            from facemeta.models.checkpoint import save_checkpoint
            cfg = ModelConfig(backbone="mobilenetv3_small_100", image_size=112, embedding_size=512)
            model = save_checkpoint(build_model(cfg).eval(), tmp / "random.safetensors")
            which = "random-init mobilenetv3_small_100 (no trained model yet)"
        src = tmp / "people"
        src.mkdir()
        subjects = sorted((p for p in (data / "orl").iterdir() if p.is_dir()), key=lambda p: int(p.name[1:]))[:people]
        for s in subjects:
            (src / s.name).symlink_to(s, target_is_directory=True)
        images = sum(len(list(s.glob("*.pgm"))) for s in subjects)
        emb = FaceEmbedder(model)
        emb.embed_file(subjects[0] / "1.pgm")  # warm-up: MTCNN and model loaded
        with FaceRecognizer(tmp / "g", embedder=emb) as fr:
            t0 = time.perf_counter()
            res = fr.enroll_folder(src)
            fr.close()
            secs = time.perf_counter() - t0
    return {"images": images, "enrolled": res.total, "seconds": round(secs, 2),
            "images_per_s": round(images / secs, 2), "torch_threads": threads, "model": which}


def _markdown(results: dict) -> str:
    lines = ["# Gallery search benchmark", "",
             "Produced by `benchmarks/bench_gallery.py` on this machine: " + results.get("machine", ""), "",
             "Synthetic clustered 512-d unit vectors (1,024 groups; same-person cosine ~0.6, same-group "
             "different-person ~0.18), one enrolled vector per identity, queries are new noisy images of "
             "enrolled identities. Latency = one query per call on one thread; QPS = all queries in one "
             "batch; recall@1 = same top-1 as exact flat search; acc@1 = top-1 is the true identity.", "",
             "IVF training: k-means sample (points per list) x iterations.", "",
             "| N | index | knob | nlist | IVF training | build s | p50 ms | p99 ms | QPS (batch) | recall@1 vs flat | acc@1 | index MB | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results.get("index", []):
        knob = f"{r['knob']}={r['value']}" if r["knob"] else "-"
        lines.append(f"| {r['n']:,} | {r['index']} | {knob} | {r['nlist'] or '-'} | {r.get('train') or '-'} | {r['build_s']} | {r['p50_ms']} | "
                     f"{r['p99_ms']} | {r['qps_batch']} | {r['recall1_vs_flat']:.3f} | {r['acc1_vs_truth']:.3f} | "
                     f"{r['index_mb']} | {r['peak_rss_mb']} |")
    if results.get("store"):
        lines += ["", "## End to end through `facemeta.gallery.Gallery` (flat index, SQLite records)", "",
                  "Enroll = vectors in (no images: the embedder is not part of this figure).", "",
                  "| N | enroll vectors/s (1,000 per transaction) | enroll one (ms) | open s | search p50 ms | p99 ms | raw FAISS p50 ms | acc@1 | DB MB | peak RSS MB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["store"]:
            lines.append(f"| {r['n']:,} | {r['enroll_vectors_per_s_batched']} | {r['enroll_single_ms']} | {r['open_s']} | "
                         f"{r['search_p50_ms']} | {r['search_p99_ms']} | {r['raw_faiss_p50_ms']} | {r['acc1']:.3f} | "
                         f"{r['db_mb']} | {r['peak_rss_mb']} |")
    if results.get("files"):
        lines += ["", "## Enroll end to end from image files (ORL photos, `FaceRecognizer.enroll_folder`)", "",
                  "| images | enrolled | seconds | images/s | torch threads | model |", "|---|---|---|---|---|---|"]
        for r in results["files"]:
            lines.append(f"| {r['images']} | {r['enrolled']} | {r['seconds']} | {r['images_per_s']} | "
                         f"{r['torch_threads']} | {r['model']} |")
    if results.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    """Run the requested parts and merge the results into OUT.json / OUT.md."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivf", "ivf_sq8"])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--part", choices=["index", "store", "files"], default="index")
    ap.add_argument("--people", type=int, default=10, help="ORL people for --part files (10 photos each)")
    ap.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "facemeta-bench-gallery")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gallery"))
    ap.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json")
    ap.add_argument("--child", nargs=2, metavar=("N", "KIND"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_index(int(args.child[0]), args.child[1], args.queries, args.data_dir)))
        return 0
    out_json = args.out.with_suffix(".json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    if args.render:
        args.out.with_suffix(".md").write_text(_markdown(results))
        return 0
    results["machine"] = (f"{os.cpu_count()} CPU cores shared with other jobs (load average at start "
                          f"{os.getloadavg()[0]:.1f}), FAISS on {THREADS} threads for builds and batches, "
                          "1 thread per single-query call")
    if args.part == "store":
        results["store"] = [r for n in args.sizes for r in run_store(n, args.queries)]
    elif args.part == "files":
        from facemeta.paths import data_root
        results["files"] = [run_files(data_root(), args.people, t) for t in (1, THREADS)]
    else:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        done = list(results.get("index", []))
        for n in args.sizes:
            prepare(n, args.queries, args.data_dir)
            for kind in args.kinds:
                t0 = time.time()
                proc = subprocess.run([sys.executable, __file__, "--child", str(n), kind, "--queries", str(args.queries),
                                       "--data-dir", str(args.data_dir)], capture_output=True, text=True)
                if proc.returncode:
                    print(proc.stderr[-2000:], file=sys.stderr)
                    continue
                rows = json.loads(proc.stdout.strip().splitlines()[-1])
                keys = {(r["n"], r["index"], r["nlist"], r.get("train")) for r in rows}  # a rerun replaces its rows
                done = [r for r in done if (r["n"], r["index"], r["nlist"], r.get("train")) not in keys] + rows
                print(f"n={n} {kind}: {time.time() - t0:.0f}s " + json.dumps(rows), flush=True)
                results["index"] = sorted(done, key=lambda r: (r["n"], r["index"], r["nlist"] or 0, r.get("train") or "",
                                                               r["value"] or 0))
                args.out.parent.mkdir(parents=True, exist_ok=True)
                out_json.write_text(json.dumps(results, indent=1))
                args.out.with_suffix(".md").write_text(_markdown(results))
    out_json.write_text(json.dumps(results, indent=1))
    args.out.with_suffix(".md").write_text(_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
