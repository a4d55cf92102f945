"""FAISS vs Milvus Lite behind the gallery: enroll, open, search, disk and memory through the public API.

For every gallery size N (one synthetic identity per vector), search backend (``faiss``: the index file
in the gallery folder; ``milvus``: a Milvus Lite file in the gallery folder) and index kind (``flat``;
``ivf_sq8``, the measured choice for 10^6 faces in benchmarks/results/gallery.md; the gallery maps them to
Milvus FLAT and IVF_SQ8, see facemeta/gallery/milvus_index.py ``index_params``) one *cell* measures,
only through ``facemeta.gallery.Gallery``:

- enroll: ``Gallery.create(path, dim=512, fingerprint="bench", index=KIND, backend=BACKEND)`` then
  ``enroll_many(names, vectors)`` in batches of ``--batch`` rows (one SQLite transaction each; names
  ``id<i>``, one vector per identity) and ``close()`` (the final index save / Milvus flush, which for
  Milvus Lite also waits for its background index builds). Gallery defaults otherwise, so both backends
  also save / flush every 30 s (``save_interval``) while enrolling. Throughput = N / (enroll + close).
- open: ``Gallery.open(path)`` (a reader) and the first ``search`` (which loads the index when open did
  not), timed separately and together.
- search: ``--queries`` single-query calls ``g.search(q[None], k=1)`` after ``--warmup`` untimed ones
  (a slow cell stops after ``--search-budget-s`` of them once ``--min-queries`` are done), p50 / p99 latency, recall@1 (top-1 is the exact top-1 of numpy brute force over the enrolled vectors)
  and acc@1 (top-1 is the query's true identity).
- disk: bytes of the gallery folder after close (SQLite database and the backend's files separately).
- memory: peak RSS of the enroll process and of the open+search process (each phase runs in its own
  subprocess, so the figures are that cell's only; Milvus Lite 3.x runs in-process, which the recorded
  child-process RSS confirms).

Threads: the enroll process runs FAISS / OpenMP / BLAS on 2 threads (``faiss.omp_set_num_threads(2)``,
the machine has 2 cores), the search process on 1 (one query per thread, as bench_gallery.py measures
single-query latency; set through OMP_NUM_THREADS too, because Milvus Lite searches on its own gRPC server
threads, which ``omp_set_num_threads`` in the main thread does not reach).

Data: bench_gallery.py's ``make_data`` (imported from it): 1,024 group directions, identity centres with
cosine ~0.3 inside a group, images with same-person cosine ~0.6; queries are new images of enrolled
identities. Generated once per N into ``--data-dir`` with the exact top-1 of every query.

Resumable: each finished cell is appended to OUT.json at once and OUT.md is rewritten from it; a rerun
skips every cell already in OUT.json (finished, or recorded as not run), ``--force`` reruns the selected
cells. A cell is recorded as "not run: <reason>" instead of being measured when the same backend and index
at the next smaller size, scaled linearly in N, predicts more than ``--cell-limit-s`` seconds, or when it
is stopped at that limit, or when a process of the cell passes ``--max-rss-gib`` or the shared machine falls
below ``--min-free-gib`` available (the reason names what was measured and the phase). Parity: where both
backends' flat cells of one N exist, their top-1 names must agree for every query and their scores within
1e-5 (printed and recorded).

    nice -n 5 .venv/bin/python benchmarks/bench_backends.py                     # 10^4, 10^5, 10^6 x both x both
    nice -n 5 .venv/bin/python benchmarks/bench_backends.py --sizes 10000       # a quick run
    .venv/bin/python benchmarks/bench_backends.py --sizes 1000000 --backends milvus --indexes flat --force
    .venv/bin/python benchmarks/bench_backends.py --render                      # only rewrite OUT.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from results_files import cpu_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DIM = 512
BUILD_THREADS = 2
SEARCH_THREADS = 1
FINGERPRINT = "bench"
PARITY_TOL = 1e-5


def _bench_gallery():
    """benchmarks/bench_gallery.py as a module (for its make_data and data-model constants)."""
    spec = importlib.util.spec_from_file_location("bench_gallery", HERE / "bench_gallery.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _set_threads(threads: int) -> None:
    import faiss

    faiss.omp_set_num_threads(threads)
    if "torch" in sys.modules:  # the gallery does not import torch; if something did, same budget
        sys.modules["torch"].set_num_threads(threads)


def _peak_rss_mb() -> tuple[float, float]:
    """Peak RSS of this process and of its largest finished child, MiB (Linux reports KiB)."""
    return (round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1))


def _progress(data_dir: Path, cell: str, text: str) -> None:
    """The cell's last phase, for the log and for the reason of a cell stopped at the time limit."""
    line = f"{time.strftime('%H:%M:%S')} {cell}: {text}"
    print(line, file=sys.stderr, flush=True)
    with open(data_dir / f"progress-{cell}.txt", "a") as fh:
        fh.write(line + "\n")


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


# ---------------------------------------------------------------------------------------------- data


def prepare(n: int, nq: int, data_dir: Path) -> dict:
    """Generate the data for N (enrolled vectors, queries, true identities) and the exact top-1 of every
    query (numpy brute force, in chunks); cached in data_dir."""
    tag = f"{n}-{nq}"
    if (data_dir / f"exact-{tag}.npy").exists():
        return {"cached": True}
    bg = _bench_gallery()
    t0 = time.perf_counter()
    enrolled, queries, truth = bg.make_data(n, nq)
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    best = np.full(nq, -np.inf, np.float32)
    exact = np.zeros(nq, np.int64)
    for start in range(0, n, 50_000):
        sims = queries @ enrolled[start:start + 50_000].T
        arg = np.argmax(sims, axis=1)
        val = sims[np.arange(nq), arg]
        better = val > best
        best[better], exact[better] = val[better], arg[better] + start
    exact_s = time.perf_counter() - t0
    np.save(data_dir / f"enrolled-{n}.npy", enrolled)
    np.save(data_dir / f"queries-{tag}.npy", queries)
    np.save(data_dir / f"truth-{tag}.npy", truth)
    np.save(data_dir / f"exact-{tag}.npy", exact)  # last: its presence means the rest is there
    return {"generate_s": round(gen_s, 1), "exact_s": round(exact_s, 1)}


def _read_rows(path: Path, offset: int, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a float32 [N, DIM] .npy, read (not memory-mapped: mapped pages would count
    in the cell's RSS)."""
    return np.fromfile(path, dtype=np.float32, count=(stop - start) * DIM,
                       offset=offset + start * DIM * 4).reshape(stop - start, DIM)


# ---------------------------------------------------------------------------------------------- cell phases


def run_enroll(n: int, backend: str, kind: str, batch: int, data_dir: Path, path: Path, cell: str) -> dict:
    """Create the gallery and enroll N vectors in batches, then close it (timed together)."""
    _set_threads(BUILD_THREADS)
    from facemeta.gallery import Gallery

    src = data_dir / f"enrolled-{n}.npy"
    offset = np.load(src, mmap_mode="r").offset
    t0 = time.perf_counter()
    g = Gallery.create(path, dim=DIM, fingerprint=FINGERPRINT, index=kind, backend=backend)
    create_s = time.perf_counter() - t0
    enroll_s = 0.0
    last_report = time.monotonic()
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        names = [f"id{i}" for i in range(start, stop)]
        vecs = _read_rows(src, offset, start, stop)
        t0 = time.perf_counter()
        g.enroll_many(names, vecs, fingerprint=FINGERPRINT)
        enroll_s += time.perf_counter() - t0
        if time.monotonic() - last_report > 30 or stop == n:
            _progress(data_dir, cell, f"enrolled {stop:,}/{n:,} in {enroll_s:.0f} s")
            last_report = time.monotonic()
    info = g.info()  # not timed
    _progress(data_dir, cell, "closing (final save / flush)")
    t0 = time.perf_counter()
    g.close()
    close_s = time.perf_counter() - t0
    total = enroll_s + close_s
    db = sum(p.stat().st_size for p in path.glob("gallery.sqlite*"))
    disk = _folder_bytes(path)
    rss, rss_children = _peak_rss_mb()
    return {"create_s": round(create_s, 3), "enroll_calls_s": round(enroll_s, 2), "close_s": round(close_s, 2),
            "enroll_total_s": round(total, 2), "enroll_vps": round(n / total, 1),
            "index_built": info.get("index_built"), "nlist": info.get("nlist"),
            "disk_bytes": disk, "db_bytes": db, "backend_bytes": disk - db,
            "enroll_peak_rss_mb": rss, "enroll_child_rss_mb": rss_children}


def run_search(n: int, backend: str, kind: str, nq: int, warmup: int, data_dir: Path, path: Path, cell: str,
               min_queries: int, budget_s: float) -> dict:
    """Open the gallery (reader), first search, then single-query latency, recall@1 and acc@1."""
    _set_threads(SEARCH_THREADS)
    from facemeta.gallery import Gallery

    tag = f"{n}-{nq + warmup}"
    queries = np.load(data_dir / f"queries-{tag}.npy")
    truth = np.load(data_dir / f"truth-{tag}.npy")
    exact = np.load(data_dir / f"exact-{tag}.npy")
    _progress(data_dir, cell, "opening")
    t0 = time.perf_counter()
    g = Gallery.open(path)
    open_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    g.search(queries[0][None], k=1)
    first_s = time.perf_counter() - t0
    extra = {}
    if backend == "milvus":  # diagnostic only: what Milvus Lite reports it built (private attribute)
        try:
            d = g._index.client.describe_index(g._index.collection, "vec")
            extra = {"milvus_index_type": d.get("index_type"), "milvus_indexed_rows": d.get("indexed_rows"),
                     "milvus_total_rows": d.get("total_rows"), "milvus_index_state": d.get("state")}
        except Exception as exc:  # noqa: BLE001
            extra = {"milvus_describe_error": str(exc)[:200]}
        extra["milvus_ivf_segments"] = _loaded_ivf_lists()
    for q in queries[1:warmup]:
        g.search(q[None], k=1)
    _progress(data_dir, cell, f"searching {nq} queries")
    times, names, scores = [], [], []
    t_start = time.monotonic()
    for q in queries[warmup:]:
        if len(times) >= min_queries and time.monotonic() - t_start > budget_s:
            break  # a slow cell: fewer queries (recorded), always the first ones of the same sequence
        t0 = time.perf_counter()
        res = g.search(q[None], k=1)
        times.append(time.perf_counter() - t0)
        names.append(res[0][0].name if res[0] else None)
        scores.append(float(res[0][0].score) if res[0] else float("nan"))
    g.close()
    t = np.array(times) * 1000
    want_exact = [f"id{i}" for i in exact[warmup:warmup + len(names)]]
    want_truth = [f"id{i}" for i in truth[warmup:warmup + len(names)]]
    (data_dir / f"top1-{cell}.json").write_text(json.dumps({"names": names, "scores": scores}))
    rss, rss_children = _peak_rss_mb()
    return {"open_s": round(open_s, 3), "first_search_s": round(first_s, 3), "open_total_s": round(open_s + first_s, 3),
            "p50_ms": round(float(np.percentile(t, 50)), 3), "p99_ms": round(float(np.percentile(t, 99)), 3),
            "queries": len(times), "warmup": warmup,
            "recall1": float(np.mean([a == b for a, b in zip(names, want_exact, strict=True)])),
            "acc1": float(np.mean([a == b for a, b in zip(names, want_truth, strict=True)])),
            "search_peak_rss_mb": rss, "search_child_rss_mb": rss_children, **extra}


def _loaded_ivf_lists() -> list[list[int]]:
    """[nlist, vectors] of every non-empty FAISS IVF index alive in this process: for a Milvus Lite gallery,
    the per-segment indexes Milvus Lite loaded (describe_index does not report the lists it built)."""
    import gc

    import faiss

    out = []
    for obj in gc.get_objects():
        if isinstance(obj, faiss.Index):
            try:
                ivf = faiss.extract_index_ivf(obj)
            except (RuntimeError, TypeError):
                continue
            if ivf.ntotal > 0:
                out.append([int(ivf.nlist), int(ivf.ntotal)])
    return sorted(out)


# ---------------------------------------------------------------------------------------------- driver


def _cell_name(n: int, backend: str, kind: str) -> str:
    return f"{backend}-{kind}-{n}"


def _mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def _rss_gib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _child(args: argparse.Namespace, phase: str, n: int, backend: str, kind: str, path: Path,
           timeout: float) -> tuple[dict | None, str | None]:
    """Run one phase of a cell in a subprocess; (result, None) or (None, why it failed). The child is stopped
    at ``timeout`` seconds, when its RSS passes --max-rss-gib, or when the (shared) machine has less than
    --min-free-gib available: a cell must not push other jobs into the OOM killer."""
    threads = BUILD_THREADS if phase in ("enroll", "prepare") else SEARCH_THREADS
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", phase, str(n), backend, kind, str(path),
           "--queries", str(args.queries), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--data-dir", str(args.data_dir), "--min-queries", str(args.min_queries),
           "--search-budget-s", str(args.search_budget_s)]
    t0 = time.monotonic()
    peak = 0.0
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=None, text=True, env=_thread_env(threads), cwd=ROOT)
        why = None
        while proc.poll() is None:
            time.sleep(0.5)
            rss = _rss_gib(proc.pid)
            peak = max(peak, rss)
            free = _mem_available_gib()
            if time.monotonic() - t0 > max(1.0, timeout):
                why = "timeout"
            elif rss > args.max_rss_gib:
                why = f"memory: the {phase} process passed the {args.max_rss_gib:g} GiB RSS cap ({rss:.1f} GiB)"
            elif free < args.min_free_gib:
                why = (f"memory: the machine had {free:.1f} GiB available (floor {args.min_free_gib:g} GiB) with the "
                       f"{phase} process at {rss:.1f} GiB RSS")
            if why:
                proc.kill()
                proc.wait()
                return None, why
        if proc.returncode:
            return None, f"{phase} exited with status {proc.returncode}"
        out.seek(0)
        return json.loads(out.read().strip().splitlines()[-1]), None


def _last_phase(data_dir: Path, cell: str) -> str:
    p = data_dir / f"progress-{cell}.txt"
    lines = p.read_text().strip().splitlines() if p.exists() else []
    return lines[-1].split(": ", 1)[1] if lines else "starting"


def _prediction(results: dict, n: int, backend: str, kind: str) -> tuple[float, dict] | None:
    """Linear-in-N prediction of a cell's wall time from the same backend and index at the largest smaller N."""
    smaller = [r for r in results.get("cells", []) if r["backend"] == backend and r["index"] == kind
               and r["n"] < n and "cell_s" in r]
    if not smaller:
        return None
    prev = max(smaller, key=lambda r: r["n"])
    return prev["cell_s"] * n / prev["n"], prev


def run_cell(args: argparse.Namespace, results: dict, n: int, backend: str, kind: str) -> dict:
    cell = _cell_name(n, backend, kind)
    row = {"n": n, "backend": backend, "index": kind, "batch": args.batch,
           "load_at_start": round(os.getloadavg()[0], 2), "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}
    pred = _prediction(results, n, backend, kind)
    if pred and pred[0] > args.cell_limit_s:
        est, prev = pred
        row["not_run"] = (f"the {prev['n']:,} cell took {prev['cell_s']:.0f} s (enroll+close {prev['enroll_total_s']:.0f} s, "
                          f"open {prev['open_total_s']:.1f} s, {prev['queries']} queries at p50 {prev['p50_ms']} ms); "
                          f"linear in N that is ~{est:.0f} s at {n:,}, over the {args.cell_limit_s:.0f} s cell limit")
        return row
    if pred:
        print(f"{cell}: predicted ~{pred[0]:.0f} s (linear from {pred[1]['n']:,})", flush=True)
    (args.data_dir / f"progress-{cell}.txt").unlink(missing_ok=True)
    (args.data_dir / f"top1-{cell}.json").unlink(missing_ok=True)  # parity must never read an older run's
    work = Path(tempfile.mkdtemp(prefix=f"{cell}-", dir=args.data_dir))
    path = work / "g"
    t_cell = time.perf_counter()
    try:
        enroll, err = _child(args, "enroll", n, backend, kind, path, args.cell_limit_s)
        search = None
        if enroll is not None:
            search, err = _child(args, "search", n, backend, kind, path,
                                 args.cell_limit_s - (time.perf_counter() - t_cell))
        elapsed = time.perf_counter() - t_cell
        if err is not None:
            why = (f"stopped at the {args.cell_limit_s:.0f} s cell limit" if err == "timeout"
                   else f"stopped ({err})" if err.startswith("memory") else f"failed ({err}; see the log)")
            row["not_run"] = f"{why} after {elapsed:.0f} s; last phase: {_last_phase(args.data_dir, cell)}"
            if enroll is not None:
                row["partial"] = enroll
            return row
        row.update(enroll)
        row.update(search)
        row["cell_s"] = round(elapsed, 1)
        row["peak_rss_mb"] = max(row["enroll_peak_rss_mb"], row["search_peak_rss_mb"])
        return row
    finally:
        shutil.rmtree(work, ignore_errors=True)


def parity(args: argparse.Namespace, results: dict) -> None:
    """FAISS vs Milvus top-1 at every (N, index) where both cells' top-1 files exist. For flat (exact on
    both) it must be the same name for every query and scores within PARITY_TOL; for approximate indexes the
    agreement is only reported."""
    out = {}
    finished = {(r["n"], r["backend"], r["index"]) for r in results.get("cells", []) if "cell_s" in r}
    for n, kind in sorted({(r["n"], r["index"]) for r in results.get("cells", [])}):
        if not {(n, "faiss", kind), (n, "milvus", kind)} <= finished:
            continue
        files = [args.data_dir / f"top1-{_cell_name(n, b, kind)}.json" for b in ("faiss", "milvus")]
        if not all(f.exists() for f in files):
            continue
        a, b = (json.loads(f.read_text()) for f in files)
        m = min(len(a["names"]), len(b["names"]))  # a slow cell may have stopped early: the common first queries
        same = [x == y for x, y in zip(a["names"][:m], b["names"][:m], strict=True)]
        diff = np.abs(np.array(a["scores"][:m]) - np.array(b["scores"][:m]))
        ok = all(same) and bool(np.all(diff <= PARITY_TOL))
        out[(n, kind)] = {"n": n, "index": kind, "queries": len(same), "top1_agree": int(sum(same)),
                          "max_score_diff": float(np.max(diff)), "ok": ok if kind == "flat" else None}
        verdict = ("PASS" if ok else "FAIL") if kind == "flat" else "(approximate: reported only)"
        print(f"parity n={n:,} {kind}: FAISS vs Milvus top-1 agree on {sum(same)}/{len(same)} queries, "
              f"max |score diff| {float(np.max(diff)):.2e} {verdict}", flush=True)
    results["parity"] = [out[k] for k in sorted(out, key=lambda k: (k[1] != "flat", k[0], k[1]))]


# ---------------------------------------------------------------------------------------------- report


def _mb(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.1f}"


def _versions() -> dict:
    out = {}
    for pkg in ("faiss-cpu", "pymilvus", "milvus-lite", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    if out.get("faiss-cpu") is None:
        import faiss

        out["faiss-cpu"] = faiss.__version__
    return out


def _what_it_shows(cells: list[dict]) -> list[str]:
    """Sentences computed from the finished cells (no number here that is not in the table)."""
    done = {(r["n"], r["backend"], r["index"]): r for r in cells if "cell_s" in r}
    lines = []
    for n in sorted({k[0] for k in done}):
        for kind in ("flat", "ivf_sq8"):
            f, m = done.get((n, "faiss", kind)), done.get((n, "milvus", kind))
            if not (f and m):
                continue
            enr = f["enroll_vps"] / m["enroll_vps"]
            faster = f"FAISS {enr:.2f}x faster" if enr >= 1 else f"Milvus Lite {1 / enr:.2f}x faster"
            lat = m["p50_ms"] / f["p50_ms"] if f["p50_ms"] else float("nan")
            lines.append(f"{n:,} {kind}: FAISS enrolls {f['enroll_vps']:,.0f} vectors/s vs Milvus Lite "
                         f"{m['enroll_vps']:,.0f} ({faster}); single-query p50 "
                         f"{f['p50_ms']} ms vs {m['p50_ms']} ms (Milvus {lat:.1f}x the FAISS time); open+first search "
                         f"{f['open_total_s']} s vs {m['open_total_s']} s; recall@1 {f['recall1']:.3f} vs {m['recall1']:.3f}; "
                         f"folder {_mb(f['disk_bytes'])} MiB vs {_mb(m['disk_bytes'])} MiB; peak RSS "
                         f"{f['peak_rss_mb']:,.0f} vs {m['peak_rss_mb']:,.0f} MiB.")
    return lines


def _runs_line(results: dict) -> str:
    runs = results.get("invocations", [])
    if not runs:
        return f"run took {results.get('run_wall', '?')}"
    parts = [f"{r['start'][11:16]} `{' '.join(r['argv']) or '(defaults)'}` {r.get('wall_min', '?')} min" for r in runs]
    total = sum(r.get("wall_min", 0) for r in runs)
    return f"{len(runs)} invocation{'s' if len(runs) > 1 else ''}, {total:.1f} min in all: " + "; ".join(parts)


def _markdown(results: dict) -> str:
    v = results.get("versions", {})
    cells = sorted(results.get("cells", []), key=lambda r: (r["n"], r["backend"], r["index"]))
    lines = ["# Gallery search backends: FAISS vs Milvus Lite", "",
             "Produced by `benchmarks/bench_backends.py` (see its docstring for the method).", "",
             f"- Machine: {results.get('machine', '?')}",
             f"- Date: {results.get('date', '?')}; " + _runs_line(results),
             f"- Versions: faiss-cpu {v.get('faiss-cpu')}, pymilvus {v.get('pymilvus')}, milvus-lite "
             f"{v.get('milvus-lite')}, numpy {v.get('numpy')}, Python {results.get('python', '?')}; "
             f"facemeta at {results.get('git', '?')}",
             "- Data: bench_gallery.py's `make_data`: clustered 512-d unit vectors (1,024 group directions; "
             "identities of one group have cosine ~0.3, two images of one person ~0.6, of two people of one "
             "group ~0.18); one enrolled vector per identity (N identities); queries are new images of "
             "enrolled identities.",
             "- Everything goes through `facemeta.gallery.Gallery` with its defaults (records in SQLite, the "
             "backend a cache of them; index saved / Milvus flushed every 30 s while enrolling). FAISS IVF "
             "picks about sqrt(N) lists (retrained after 8x growth, so a gallery enrolled from empty to N "
             "trains several times). Milvus builds an index per segment; with the gallery's automatic nlist it "
             "used its default, 128 lists per segment (the *built* column shows what was loaded: segments and "
             "lists, read from the FAISS objects Milvus Lite holds). nprobe 16 on both.",
             "- Threads: enroll process 2 (FAISS/OpenMP/BLAS), search process 1 (one query per call per thread).",
             "",
             "Columns: **enroll vec/s** = N / (enroll_many calls + close); batches of "
             f"{cells[0]['batch'] if cells else '?'} rows, one SQLite transaction each. **close s** = the final "
             "save / flush inside that total (Milvus Lite also finishes its index builds there). **open s** = "
             "`Gallery.open` (reader) + the first search (which loads what open did not). **p50/p99 ms** = "
             "single-query `g.search(q[None], k=1)` after warm-up, over *queries* calls (the first of one fixed "
             "sequence; a cell stops early after its search budget once it has done the minimum). **recall@1** = top-1 "
             "equals the exact top-1 (numpy brute force); **acc@1** = top-1 is the true identity. **disk MiB** = "
             "the gallery folder after close (SQLite / backend files). **RSS MiB** = peak RSS of the enroll process "
             "/ of the open+search process. **built** = the index searched: FAISS as the gallery "
             "reports it (IVF lists in brackets), Milvus as Milvus Lite reports it (segments and IVF lists per "
             "segment in brackets). **cell s** = wall time of the cell (both subprocesses).", "",
             "| N | backend | index | built | enroll vec/s | enroll+close s | close s | open s | p50 ms | p99 ms | "
             "queries | recall@1 | acc@1 | disk MiB (SQLite / backend) | RSS MiB (enroll / search) | cell s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in cells:
        if "not_run" in r:
            lines.append(f"| {r['n']:,} | {r['backend']} | {r['index']} | not run: {r['not_run']} |"
                         + " |" * 12)
            continue
        built = r.get("milvus_index_type") or r.get("index_built") or "?"
        if r.get("nlist") and r["backend"] == "faiss" and r["index_built"] != "flat":
            built += f" ({r['nlist']} lists)"
        segs = r.get("milvus_ivf_segments")
        if segs:
            lists = sorted({s[0] for s in segs})
            built += f" ({len(segs)} segment{'s' if len(segs) > 1 else ''}, {'/'.join(map(str, lists))} lists)"
        lines.append(f"| {r['n']:,} | {r['backend']} | {r['index']} | {built} | {r['enroll_vps']:,.0f} | "
                     f"{r['enroll_total_s']} | {r['close_s']} | {r['open_total_s']} | {r['p50_ms']} | {r['p99_ms']} | "
                     f"{r['queries']} | {r['recall1']:.3f} | {r['acc1']:.3f} | {_mb(r['disk_bytes'])} "
                     f"({_mb(r['db_bytes'])} / {_mb(r['backend_bytes'])}) | {r['enroll_peak_rss_mb']:,.0f} / "
                     f"{r['search_peak_rss_mb']:,.0f} | {r['cell_s']} |")
    if results.get("parity"):
        lines += ["", "## Parity: the same queries through the FAISS and the Milvus gallery", "",
                  f"flat (FAISS IndexFlatIP vs Milvus Lite FLAT, both exact): pass = the same top-1 name for every "
                  f"query and scores within {PARITY_TOL:g}. Approximate indexes: agreement reported only.", "",
                  "| N | index | queries | same top-1 | max abs score diff | result |", "|---|---|---|---|---|---|"]
        for p in results["parity"]:
            verdict = "-" if p.get("ok") is None else ("pass" if p["ok"] else "FAIL")
            lines.append(f"| {p['n']:,} | {p.get('index', 'flat')} | {p['queries']} | {p['top1_agree']} | "
                         f"{p['max_score_diff']:.2e} | {verdict} |")
    shows = _what_it_shows(cells)
    if shows or results.get("notes") or results.get("summary"):
        lines += ["", "## What this shows", ""]
        if results.get("summary"):
            lines += [results["summary"], ""]
        lines += [f"- {s}" for s in shows]
        lines += [f"- {s}" for s in results.get("notes", [])]
        lines += ["- All of this is one 2-core machine. Milvus's point is serving many processes and scaling past "
                  "one machine with a Milvus server (standalone or cluster); Milvus Lite is its single-process "
                  "embedded form, and this benchmark does not measure a server."]
    return "\n".join(lines) + "\n"


def _write(out: Path, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out.with_suffix(".json"))
    out.with_suffix(".md").write_text(_markdown(results))


def main() -> int:
    ap = argparse.ArgumentParser(
        description="FAISS vs Milvus Lite behind facemeta's Gallery: enroll throughput, open time, single-query "
                    "latency, recall@1 / acc@1, disk and peak RSS, one subprocess per cell and phase. Resumable: "
                    "finished cells are kept in OUT.json and skipped on a rerun (unless --force).",
        epilog="Example: nice -n 5 .venv/bin/python benchmarks/bench_backends.py --sizes 10000 100000 1000000",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                    help="gallery sizes N (stored vectors, one identity each); run smallest first")
    ap.add_argument("--backends", nargs="+", default=["faiss", "milvus"], choices=["faiss", "milvus"])
    ap.add_argument("--indexes", nargs="+", default=["flat", "ivf_sq8"], choices=["flat", "ivf_sq8", "ivf", "hnsw"],
                    help="gallery index kinds (Milvus: FLAT, IVF_SQ8, IVF_FLAT, HNSW)")
    ap.add_argument("--queries", type=int, default=500, help="timed single-query searches per cell")
    ap.add_argument("--min-queries", type=int, default=300,
                    help="a cell whose searches outlast --search-budget-s stops after this many (at least)")
    ap.add_argument("--search-budget-s", type=float, default=300.0,
                    help="seconds of timed searches per cell before it may stop early (never below --min-queries)")
    ap.add_argument("--max-rss-gib", type=float, default=12.0,
                    help="stop a cell whose process passes this RSS (recorded as not run, with the phase)")
    ap.add_argument("--min-free-gib", type=float, default=3.0,
                    help="stop a cell when the shared machine has less memory than this available")
    ap.add_argument("--warmup", type=int, default=20, help="untimed searches first (the first one is the open's)")
    ap.add_argument("--batch", type=int, default=10_000, help="rows per enroll_many call (one transaction)")
    ap.add_argument("--cell-limit-s", type=float, default=1500.0,
                    help="a cell predicted (linearly from the next smaller N) to take longer, or still running "
                         "after this long, is recorded as not run with the measured reason")
    ap.add_argument("--force", action="store_true", help="rerun the selected cells even if OUT.json has them")
    ap.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "facemeta-bench-backends",
                    help="cached synthetic data, per-cell progress and the galleries being measured")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/backends",
                    help="results: OUT.json (cells) and OUT.md (table)")
    ap.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json")
    ap.add_argument("--child", nargs=5, metavar=("PHASE", "N", "BACKEND", "INDEX", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)

    if args.child:
        phase, n, backend, kind, path = args.child
        n, path, cell = int(n), Path(path), _cell_name(int(n), backend, kind)
        if phase == "prepare":
            _set_threads(BUILD_THREADS)
            res = prepare(n, args.queries + args.warmup, args.data_dir)
        elif phase == "enroll":
            res = run_enroll(n, backend, kind, args.batch, args.data_dir, path, cell)
        else:
            res = run_search(n, backend, kind, args.queries, args.warmup, args.data_dir, path, cell,
                             args.min_queries, args.search_budget_s)
        print(json.dumps(res), flush=True)
        return 0

    out_json = args.out.with_suffix(".json")
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    if args.render:
        _write(args.out, results)
        return 0
    t_run = time.time()
    results["machine"] = (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}, "
                          f"{cpu_model()}), {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB "
                          "RAM, shared with other jobs (each cell records the load average at its start); run under "
                          "nice -n 5")
    results.setdefault("date", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"))
    runs = results.setdefault("invocations", [])
    runs.append({"start": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"), "argv": sys.argv[1:],
                 "load_at_start": round(os.getloadavg()[0], 2)})
    results["versions"] = _versions()
    results["python"] = platform.python_version()
    results["git"] = _git()
    cells = results.setdefault("cells", [])
    _write(args.out, results)
    for n in sorted(args.sizes):
        t0 = time.perf_counter()
        _, err = _child(args, "prepare", n, "-", "-", args.data_dir, 3600)
        if err:
            print(f"data for N={n:,} failed: {err}", file=sys.stderr)
            return 1
        print(f"data for N={n:,} ready ({time.perf_counter() - t0:.0f} s)", flush=True)
        for backend in args.backends:
            for kind in args.indexes:
                key = (n, backend, kind)
                have = [r for r in cells if (r["n"], r["backend"], r["index"]) == key]
                if have and not args.force:
                    print(f"{_cell_name(n, backend, kind)}: already in {out_json}, skipped", flush=True)
                    continue
                t0 = time.time()
                row = run_cell(args, results, n, backend, kind)
                cells[:] = [r for r in cells if (r["n"], r["backend"], r["index"]) != key] + [row]
                cells.sort(key=lambda r: (r["n"], r["backend"], r["index"]))
                parity(args, results)
                runs[-1]["wall_min"] = round((time.time() - t_run) / 60, 1)
                _write(args.out, results)
                print(f"{_cell_name(n, backend, kind)} done in {time.time() - t0:.0f} s: {json.dumps(row)}", flush=True)
    runs[-1]["wall_min"] = round((time.time() - t_run) / 60, 1)
    _write(args.out, results)
    return 0


def _git() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "facemeta"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return head + (" with uncommitted changes under facemeta/" if dirty else "")
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
