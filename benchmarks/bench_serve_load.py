"""A bounded load test of `facemeta serve`: identify requests from concurrent clients while enrolls run, against a
real server process (uvicorn on 127.0.0.1, started and stopped here), with latency percentiles.

The gallery starts with photo 1 of ten ORL subjects; CLIENTS threads send REQUESTS identify requests in all (ORL
photos 2-10 of those subjects, in turn) while one more thread enrolls ENROLLS new subjects one by one. Reported:
status codes, p50 / p95 / max latency of identify and enroll, requests per second, and whether every enrolment is
in the gallery at the end. tests/test_serve_live.py runs a smaller load with the same code.

    python benchmarks/bench_serve_load.py --out benchmarks/results/serve_load
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from results_files import machine, write_results

SEED_SUBJECTS = [f"s{i}" for i in range(1, 11)]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(gallery: Path, model: Path | None, threads: int = 1, api_key_file: Path | None = None,
                   timeout: float = 180):
    """`python -m facemeta serve GALLERY` on a free port for the duration; yields its base URL."""
    import httpx

    port = free_port()
    argv = [sys.executable, "-m", "facemeta", "serve", str(gallery), "--port", str(port), "--threads", str(threads),
            "--log-level", "warning"]
    argv += ["--model", str(model)] if model else []
    argv += ["--api-key-file", str(api_key_file)] if api_key_file else []
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"facemeta serve did not start: {log.read().decode()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def run_load(url: str, orl: Path, requests: int, clients: int, enrolls: int, headers: dict | None = None) -> dict:
    """The load described in the module docstring against a server whose gallery is empty; returns the figures."""
    import httpx

    headers = headers or {}

    def photo(path: Path) -> tuple:
        return (path.name, path.read_bytes(), "image/x-portable-graymap")

    with httpx.Client(base_url=url, headers=headers, timeout=300) as c:
        for s in SEED_SUBJECTS:
            r = c.post("/api/enroll", data={"name": s}, files=[("images", photo(orl / s / "1.pgm"))])
            r.raise_for_status()
    probes = [orl / s / f"{i}.pgm" for i in range(2, 11) for s in SEED_SUBJECTS]
    newcomers = [f"s{i}" for i in range(11, 11 + enrolls)]
    lock = threading.Lock()
    counter = iter(range(requests))
    identify_ms: list[float] = []
    enroll_ms: list[float] = []
    statuses: Counter = Counter()
    right = 0

    def client() -> None:
        nonlocal right
        with httpx.Client(base_url=url, headers=headers, timeout=300) as c:
            while True:
                with lock:
                    k = next(counter, None)
                if k is None:
                    return
                probe = probes[k % len(probes)]
                t0 = time.perf_counter()
                r = c.post("/api/identify", files={"image": photo(probe)}, data={"top_k": "1"})
                dt = 1000 * (time.perf_counter() - t0)
                with lock:
                    identify_ms.append(dt)
                    statuses[f"identify {r.status_code}"] += 1
                    if r.status_code == 200 and r.json()["faces"]:
                        right += r.json()["faces"][0]["identity"] == probe.parent.name

    def enroller() -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=300) as c:
            for s in newcomers:
                t0 = time.perf_counter()
                r = c.post("/api/enroll", data={"name": s}, files=[("images", photo(orl / s / "1.pgm"))])
                with lock:
                    enroll_ms.append(1000 * (time.perf_counter() - t0))
                    statuses[f"enroll {r.status_code}"] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)] + [threading.Thread(target=enroller)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
        people = {p["name"] for p in c.get("/api/people").json()["people"]}

    def pct(values: list[float], q: float) -> float:
        return round(float(np.percentile(values, q)), 1) if values else float("nan")

    return {"requests": requests, "clients": clients, "enrolls": enrolls, "wall_seconds": round(wall, 2),
            "identify_per_s": round(len(identify_ms) / wall, 2), "statuses": dict(sorted(statuses.items())),
            "server_errors": sum(v for k, v in statuses.items() if k.split()[1].startswith("5")),
            "identify_ms": {"p50": pct(identify_ms, 50), "p95": pct(identify_ms, 95), "max": pct(identify_ms, 100)},
            "enroll_ms": {"p50": pct(enroll_ms, 50), "p95": pct(enroll_ms, 95), "max": pct(enroll_ms, 100)},
            "identify_rank1": round(right / max(1, len(identify_ms)), 3),
            "missing_enrolments": sorted(set(SEED_SUBJECTS + newcomers) - people)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--enrolls", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per request in the server")
    ap.add_argument("--out", default="benchmarks/results/serve_load")
    args = ap.parse_args()
    from facemeta.paths import data_root

    with tempfile.TemporaryDirectory() as tmp, running_server(Path(tmp) / "g", None, args.threads) as url:
        res = run_load(url, data_root() / "orl", args.requests, args.clients, args.enrolls)
    res["machine"] = machine()
    res["server_threads"] = args.threads
    i, e = res["identify_ms"], res["enroll_ms"]
    lines = ["# `facemeta serve` under a bounded load", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {res['machine']} with "
             f"`python benchmarks/bench_serve_load.py`: a real server (uvicorn on 127.0.0.1, the model in weights/, "
             f"{args.threads} torch thread per request, inference slots = cores / threads), {args.requests} identify "
             f"requests from {args.clients} concurrent clients (ORL photos) while {args.enrolls} people are enrolled "
             "one by one.", "",
             "| requests | p50 ms | p95 ms | max ms |", "| --- | ---: | ---: | ---: |",
             f"| identify | {i['p50']} | {i['p95']} | {i['max']} |",
             f"| enroll | {e['p50']} | {e['p95']} | {e['max']} |", "",
             f"Answers: {', '.join(f'{v} x {k}' for k, v in res['statuses'].items())}. "
             f"{res['identify_per_s']} identify requests per second over {res['wall_seconds']} s; server errors "
             f"(5xx): {res['server_errors']}; enrolments missing at the end: {res['missing_enrolments'] or 'none'}; "
             f"rank-1 of the identify answers: {res['identify_rank1']}.", ""]
    write_results(args.out, res, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
