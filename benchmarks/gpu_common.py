"""Plumbing shared by benchmarks/gpu_check.py and benchmarks/gpu_adapt.py: atomic part files, the device, timers
and a stage's soft time budget."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- plumbing
def write_json(path: Path, doc: dict) -> None:
    """Atomic JSON write (temporary file, fsync, rename): a killed stage leaves the last complete part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(doc, indent=1) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Part:
    """One stage's part file: {setup, rows: {key: row}}; rows already there for the same setup are kept."""

    def __init__(self, out: Path, stage: str, setup: dict, fresh: bool):
        self.path = out / "parts" / f"{stage}.json"
        self.doc = {"stage": stage, "setup": setup, "rows": {}, "errors": {}}
        if self.path.is_file() and not fresh:
            old = json.loads(self.path.read_text(encoding="utf-8"))
            if old.get("setup") == setup:
                self.doc["rows"] = old.get("rows", {})
        self.save()

    def has(self, key: str) -> bool:
        return key in self.doc["rows"]

    def add(self, key: str, row: dict) -> None:
        self.doc["rows"][key] = row
        self.doc["errors"].pop(key, None)
        self.save()

    def error(self, key: str, exc: BaseException) -> None:
        self.doc["errors"][key] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        self.save()
        print(f"  {key}: FAILED {self.doc['errors'][key]}", flush=True)

    def save(self) -> None:
        self.doc["updated"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        write_json(self.path, self.doc)


def device_of(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, repeats: int) -> dict:
    """Median seconds of fn() over `repeats` calls after `warmup` (first-call compile time reported apart)."""
    import torch

    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    out = {"first_call_s": round(first, 3), "median_s": statistics.median(times), "min_s": min(times),
           "repeats": repeats}
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    return out


class Budget:
    """A stage's soft time limit: `over()` once `seconds` have passed since it began."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def over(self) -> bool:
        return time.monotonic() > self.end
