"""Cost of the facemeta.meta steps relative to a plain SGD step (timm resnet18, 112x112, CPU).

Every variant sees the same batch of B images (default 16) once per step:
- sgd:      one forward/backward on all B, optimiser step (the baseline);
- maml_fo / maml_so: MAML with 1 inner step on the first B/2 (support) and the outer loss on the
            other B/2 (query), first / second order, then an optimiser step;
- mldg_fo / mldg_so: the meta-train/meta-test step (γ = 0.5) on the same halves;
- reptile:  2 inner SGD steps (one per half) on a copy, then θ ← θ + ε(θ̃ − θ).

Time: all variants in one process, after a warm-up, in R rounds; each round runs every variant
once in a rotated order, so contention from other jobs on the shared CPU hits them alike. We
report the median wall seconds per step and the median over rounds of the per-round ratio to
sgd, and the same for process CPU time (less sensitive to other jobs, most so with 1 thread).

Peak memory: each variant runs in a fresh subprocess. After building the model and batch it
resets the kernel's peak-RSS mark (writing "5" to /proc/self/clear_refs), reads the current RSS,
runs 2 steps, and reports the kernel's peak RSS (VmHWM in /proc/self/status) minus that starting
RSS: the extra memory the step needs (activations, graphs, gradients, optimiser state). Without
the reset, ru_maxrss would be dominated by the peak of importing timm and building the model.
Where clear_refs is not writable we fall back to resource.getrusage(RUSAGE_SELF).ru_maxrss and
say so. This is RSS, so it includes allocator slack; tracemalloc would not see torch's C++
allocations at all.

Usage: python benchmarks/bench_meta.py [--rounds 5] [--batch 16] [--threads 2] [--out results]
       python benchmarks/bench_meta.py --summary   # merge speed, sinusoid and ORL results into meta.md/json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from facemeta.meta import MAML, Reptile, functional_forward, meta_train_test_step

VARIANTS = ["sgd", "maml_fo", "maml_so", "mldg_fo", "mldg_so", "reptile"]
NUM_CLASSES = 64


def build(batch: int, size: int, seed: int = 0):
    """resnet18 (timm, pretrained=False), a fixed random batch and labels, and an SGD optimiser."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("resnet18", pretrained=False, num_classes=NUM_CLASSES).train()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, x, y, opt


def make_steps(model, x, y, opt):
    """One callable per variant, each doing a full training step on (x, y)."""
    h = x.shape[0] // 2
    xs, ys, xq, yq = x[:h], y[:h], x[h:], y[h:]

    def ce(xb, yb):
        return lambda p: F.cross_entropy(functional_forward(model, p, xb), yb)

    maml_fo = MAML(model, inner_steps=1, inner_lr=0.01, first_order=True)
    maml_so = MAML(model, inner_steps=1, inner_lr=0.01, first_order=False)
    reptile = Reptile(model, inner_steps=2, inner_lr=0.01, epsilon=0.5)

    def sgd():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def maml(m):
        def step():
            opt.zero_grad(set_to_none=True)
            m.meta_backward([(ce(xs, ys), ce(xq, yq))])
            opt.step()
        return step

    def mldg(first_order):
        def step():
            opt.zero_grad(set_to_none=True)
            meta_train_test_step(model, ce(xs, ys), ce(xq, yq), alpha=0.01, gamma=0.5, first_order=first_order)
            opt.step()
        return step

    def reptile_step():
        halves = iter([(xs, ys), (xq, yq)])

        def loss(p):
            xb, yb = next(halves)
            return ce(xb, yb)(p)

        reptile.step([loss])

    return {"sgd": sgd, "maml_fo": maml(maml_fo), "maml_so": maml(maml_so), "mldg_fo": mldg(True),
            "mldg_so": mldg(False), "reptile": reptile_step}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_child(variant: str, batch: int, size: int, threads: int) -> None:
    """Run in a fresh process: print the peak extra RSS (KB) of two steps of ``variant``."""
    torch.set_num_threads(threads)
    model, x, y, opt = build(batch, size)
    step = make_steps(model, x, y, opt)[variant]
    reset = _reset_peak()
    start = _status_kb("VmRSS")
    for _ in range(2):
        step()
    peak = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"variant": variant, "start_kb": start, "peak_kb": peak, "extra_kb": peak - start,
                      "method": "VmHWM after clear_refs" if reset else "ru_maxrss"}))


def time_all(batch: int, size: int, rounds: int) -> dict:
    """Interleaved timing of every variant; per-variant seconds and per-round ratios to sgd."""
    model, x, y, opt = build(batch, size)
    steps = make_steps(model, x, y, opt)
    for fn in steps.values():  # warm-up (allocator, kernels, optimiser state)
        fn()
    secs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
        for v in order:
            t0, c0 = time.perf_counter(), time.process_time()
            steps[v]()
            secs[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
    out = {}
    for v in VARIANTS:
        ratios = [a / b for a, b in zip(secs[v], secs["sgd"], strict=True)]
        cratios = [a / b for a, b in zip(cpu[v], cpu["sgd"], strict=True)]
        out[v] = {"median_s": statistics.median(secs[v]), "ratio_median": statistics.median(ratios),
                  "ratio_min": min(ratios), "ratio_max": max(ratios), "seconds": [round(s, 3) for s in secs[v]],
                  "cpu_median_s": statistics.median(cpu[v]), "cpu_ratio_median": statistics.median(cratios),
                  "cpu_seconds": [round(s, 3) for s in cpu[v]]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--summary", action="store_true", help="only merge existing results into meta.md/json")
    ap.add_argument("--tag", default="", help="suffix of the result files (meta_speed<tag>.json/md)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    a = ap.parse_args(argv)
    if a.summary:
        summarise(a.out)
        return 0
    if a.memory_child:
        memory_child(a.memory_child, a.batch, a.size, a.threads)
        return 0
    torch.set_num_threads(a.threads)
    load_start = os.getloadavg()
    t0 = time.time()
    timing = time_all(a.batch, a.size, a.rounds)
    memory = {}
    for v in VARIANTS:
        cmd = [sys.executable, __file__, "--memory-child", v, "--batch", str(a.batch), "--size", str(a.size),
               "--threads", str(a.threads)]
        memory[v] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip())
    for v in VARIANTS:
        memory[v]["ratio"] = memory[v]["extra_kb"] / memory["sgd"]["extra_kb"]
    res = {
        "setup": {"model": "timm resnet18, pretrained=False, 64 classes, train mode", "batch": a.batch,
                  "image_size": a.size, "threads": a.threads, "rounds": a.rounds, "torch": torch.__version__,
                  "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                  "loadavg_start": [round(v, 2) for v in load_start],
                  "loadavg_end": [round(v, 2) for v in os.getloadavg()], "wall_s": round(time.time() - t0, 1)},
        "timing": timing,
        "memory": memory,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"meta_speed{a.tag}.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (a.out / f"meta_speed{a.tag}.md").write_text(md)
    print(md)
    summarise(a.out)
    return 0


PARTS = [("speed", "meta_speed"), ("speed_1thread", "meta_speed_1thread"),
         ("speed_highload", "meta_speed_highload"), ("sinusoid", "meta_sinusoid"), ("orl_fewshot", "meta_orl_fewshot")]


def summarise(out: Path) -> None:
    """Merge the three result sets (those present) into meta.json and meta.md."""
    merged, sections = {}, ["# facemeta.meta results", "",
                            "Produced by benchmarks/bench_meta.py, benchmarks/meta_sinusoid.py and "
                            "benchmarks/meta_orl_fewshot.py on a shared 2-core CPU.", ""]
    for key, stem in PARTS:
        js = out / f"{stem}.json"
        if js.exists():
            merged[key] = json.loads(js.read_text())
    t1 = merged.get("speed_1thread", {}).get("timing", {})
    if t1 and "cpu_ratio_median" in t1.get("sgd", {}):
        cells = ", ".join(f"{v} {t['cpu_ratio_median']:.2f}x" for v, t in t1.items() if v != "sgd")
        sections += ["Least contention-sensitive measure, process CPU time per step at 1 torch thread, as a "
                     f"ratio to the SGD step: {cells} (goals: first order <= 1.4x, second order <= 3x). "
                     "Wall-clock ratios on the shared CPU follow, with their spread.", ""]
    for _key, stem in PARTS:
        md = out / f"{stem}.md"
        if md.exists():
            sections.append("#" + md.read_text().strip())  # demote its title one level
            sections.append("")
    (out / "meta.json").write_text(json.dumps(merged, indent=1))
    (out / "meta.md").write_text("\n".join(sections) + "\n")


def markdown(res: dict) -> str:
    """The speed and memory table."""
    s = res["setup"]
    lines = [
        "# facemeta.meta step cost vs a plain SGD step",
        "",
        f"{s['model']}, batch {s['batch']} at {s['image_size']}x{s['image_size']}, CPU ({s['cores']} cores, "
        f"{s['threads']} torch threads), torch {s['torch']}, {s['rounds']} interleaved rounds. "
        f"Shared machine: load average {s['loadavg_start'][0]} at start, {s['loadavg_end'][0]} at end "
        "(other jobs were running: the rotation exposes every variant to them alike, but single rounds still "
        "swing widely - see the range - and the absolute seconds are inflated).",
        "",
        "| variant | median wall s/step | wall ratio (median over rounds) | range | CPU s/step | CPU ratio "
        "| peak extra RSS MB | memory ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v, t in res["timing"].items():
        m = res["memory"][v]
        cpu = (f"{t['cpu_median_s']:.2f} | {t['cpu_ratio_median']:.2f}x" if "cpu_ratio_median" in t
               else "n/a | n/a")
        lines.append(f"| {v} | {t['median_s']:.2f} | {t['ratio_median']:.2f}x | {t['ratio_min']:.2f}-{t['ratio_max']:.2f} "
                     f"| {cpu} | {m['extra_kb'] / 1024:.0f} | {m['ratio']:.2f}x |")
    method = next(iter(res["memory"].values())).get("method", "ru_maxrss")
    lines += ["", "Goals (issue 4): first order <= 1.4x, second order <= 3x the SGD step's time.",
              f"Memory: peak RSS ({method}) of a fresh process per variant minus its RSS before the first "
              "step (see the script)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
