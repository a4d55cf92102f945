"""Model speed on CPU: training images/s and peak memory, embedding images/s (batch 1 / 64, channels_last).

One run measures every variant, each in a fresh subprocess (so its peak resident memory is its own),
interleaved over several rounds (the machine's CPUs are shared with other jobs, so a slow spell hits
every variant alike); the median over rounds is reported, with ratios against a baseline measured in
the same run:
- training: forward + backward + SGD step of FaceEmbeddingModel + CosFaceHead (1,000 classes) on
  112x112 inputs already in memory (no image decoding); baseline resnet18;
- embedding: facemeta.models.embed from uint8 RGB faces (preprocessing included) under inference mode;
  baseline resnet18 at batch 64 without channels_last.

    python benchmarks/bench_model.py [--rounds 3] [--threads 2] [--out benchmarks/results/model_speed]
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
from datetime import datetime, timezone
from pathlib import Path

BACKBONES = {"resnet18": "resnet18-class", "mobilenetv3_large_100": "mobile-class"}
BASE = "resnet18"
SIZE = 112


def _rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker_train(spec: dict) -> dict:
    """Time `steps` SGD steps after `warmup` steps; report images/s and peak memory."""
    import torch

    from facemeta.models import ModelConfig, build_model
    from facemeta.objectives import CosFaceHead

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    rss_start = _rss_mb()
    model = build_model(ModelConfig(backbone=spec["backbone"], image_size=SIZE)).train()
    head = CosFaceHead(512, 1000)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.1, momentum=0.9, weight_decay=5e-4)
    bs = spec["batch"]
    x = torch.randn(bs, 3, SIZE, SIZE)
    y = torch.randint(0, 1000, (bs,))
    rss_built = _rss_mb()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = head.loss(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(spec["warmup"]):
        step()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(spec["steps"]):
        step()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"images_per_s": spec["steps"] * bs / dt, "images_per_cpu_s": spec["steps"] * bs / cpu,
            "seconds": dt, "peak_rss_mb": _rss_mb(),
            "rss_after_build_mb": rss_built, "rss_start_mb": rss_start,
            "train_extra_mb": _rss_mb() - rss_built,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def worker_embed(spec: dict) -> dict:
    """Embedding images/s for each (batch size, channels_last) setting, in the order given."""
    import numpy as np
    import torch

    from facemeta.models import ModelConfig, build_model, embed

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=spec["backbone"], image_size=SIZE)).eval()
    rng = np.random.default_rng(0)
    out = {}
    for bs, cl, threads in spec["settings"]:
        torch.set_num_threads(threads)
        n = spec["images"][str(bs)]
        faces = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
        embed(model, faces[: min(n, bs * 2)], batch_size=bs, channels_last=cl)  # warm-up (+ layout change)
        t0, c0 = time.perf_counter(), time.process_time()
        embed(model, faces, batch_size=bs, channels_last=cl)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        out[f"{bs}-{'cl' if cl else 'nchw'}{'' if threads == spec['threads'] else f'-t{threads}'}"] = {"images_per_s": n / dt, "images_per_cpu_s": n / cpu,
                                                  "seconds": dt}
    out["peak_rss_mb"] = _rss_mb()
    return out


def run_worker(kind: str, spec: dict) -> dict:
    """Run one measurement in a fresh interpreter; returns its JSON answer."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(spec)],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} {spec} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages (how busy the shared CPUs were)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="training batch size")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "model_speed"))
    args = ap.parse_args(argv)

    import torch

    started = datetime.now(timezone.utc)
    load_before = loadavg()
    train: dict[str, list[dict]] = {b: [] for b in BACKBONES}
    emb: dict[str, dict[str, list[float]]] = {b: {} for b in BACKBONES}
    emb_cpu: dict[str, dict[str, list[float]]] = {b: {} for b in BACKBONES}
    emb_rss: dict[str, list[float]] = {b: [] for b in BACKBONES}
    t = args.threads
    settings = [(1, False, t), (1, True, t), (64, False, t), (64, True, t), (1, False, 1), (1, True, 1)]
    images = {"1": 48, "64": 128}
    names = list(BACKBONES)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
        for b in order:
            spec = {"backbone": b, "threads": args.threads, "batch": args.batch,
                    "steps": args.steps, "warmup": 2}
            res = run_worker("train", spec)
            train[b].append(res)
            print(f"round {r + 1} train {b}: {res['images_per_s']:.1f} img/s, peak {res['peak_rss_mb']:.0f} MB",
                  flush=True)
        for b in order:
            rot = settings[r % len(settings):] + settings[: r % len(settings)]
            res = run_worker("embed", {"backbone": b, "threads": args.threads, "settings": rot, "images": images})
            emb_rss[b].append(res.pop("peak_rss_mb"))
            for k, v in res.items():
                emb[b].setdefault(k, []).append(v["images_per_s"])
                emb_cpu[b].setdefault(k, []).append(v["images_per_cpu_s"])
            print(f"round {r + 1} embed {b}: " + ", ".join(f"{k} {v['images_per_s']:.1f}" for k, v in res.items()),
                  flush=True)

    med = statistics.median
    base_train = med(x["images_per_s"] for x in train[BASE])
    base_emb = med(emb[BASE]["64-nchw"])
    result = {
        "date": started.isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "threads": args.threads, "rounds": args.rounds,
        "loadavg_before": load_before, "loadavg_after": loadavg(),
        "image_size": SIZE, "train_batch": args.batch, "train_steps_timed": args.steps,
        "train": {b: {"class": BACKBONES[b],
                      "images_per_s": med(x["images_per_s"] for x in train[b]),
                      "images_per_s_all": [round(x["images_per_s"], 2) for x in train[b]],
                      "images_per_cpu_s": med(x["images_per_cpu_s"] for x in train[b]),
                      "ratio_vs_resnet18": med(x["images_per_s"] for x in train[b]) / base_train,
                      "peak_rss_mb": max(x["peak_rss_mb"] for x in train[b]),
                      "train_extra_mb": med(x["train_extra_mb"] for x in train[b]),
                      "params_m": train[b][0]["params_m"]} for b in BACKBONES},
        "embed": {b: {k: {"images_per_s": med(v), "images_per_s_all": [round(x, 2) for x in v],
                          "images_per_cpu_s": med(emb_cpu[b][k]),
                          "ratio_vs_resnet18_b64_nchw": med(v) / base_emb}
                      for k, v in emb[b].items()} | {"peak_rss_mb": max(emb_rss[b])} for b in BACKBONES},
    }
    for b in BACKBONES:
        e = result["embed"][b]
        for bs in ("1", "64", "1-t1"):
            cl, nchw = (f"{bs}-cl", f"{bs}-nchw") if "-" not in bs else ("1-cl-t1", "1-nchw-t1")
            e[f"channels_last_speedup_b{bs}"] = e[cl]["images_per_s"] / e[nchw]["images_per_s"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(result))
    print(render(result))
    return 0


def render(r: dict) -> str:
    """The Markdown report of one run."""

    def spread(v: list[float]) -> str:
        return f"{min(v):.1f}–{max(v):.1f}"

    lines = [
        "# Model speed on CPU (facemeta.models)",
        "",
        f"Run {r['date']}, torch {r['torch']}, {r['cpu_count']} CPUs, torch threads {r['threads']}, "
        f"{r['rounds']} interleaved rounds (each variant in a fresh process), median shown with the "
        f"range over rounds. Load average before/after: {r['loadavg_before']} / {r['loadavg_after']}"
        + (": the CPUs were shared with other jobs during the run, so absolute figures are low and noisy; "
           if max(r["loadavg_before"][0], r["loadavg_after"][0]) > 2.5 else
           " (no other heavy job ran). ")
        + "The ratios compare variants measured side by side in the same rounds. Images per CPU-second "
        "(time the process itself ran, all threads) is the figure least sensitive to other jobs.",
        "",
        f"## Training ({r['image_size']}x{r['image_size']}, batch {r['train_batch']}, forward + backward + "
        "SGD step, CosFace head over 1,000 classes, inputs in memory)",
        "",
        "| backbone | class | params (M) | images/s (range) | vs resnet18 | images per CPU-s | "
        "peak RSS (MB) | RSS added by training (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b, t in r["train"].items():
        lines.append(f"| {b} | {t['class']} | {t['params_m']:.1f} | {t['images_per_s']:.1f} "
                     f"({spread(t['images_per_s_all'])}) | {t['ratio_vs_resnet18']:.2f} | "
                     f"{t['images_per_cpu_s']:.1f} | {t['peak_rss_mb']:.0f} | {t['train_extra_mb']:.0f} |")
    lines += [
        "",
        "Peak RSS is the whole process (Python, torch, model, optimiser state, activations); the last "
        "column is the growth from the built model to the end of training (activations, gradients, "
        "momentum).",
        "",
        "## Embedding (facemeta.models.embed from uint8 faces, inference mode, 112x112)",
        "",
        "| backbone | batch | NCHW images/s (range) | channels_last images/s (range) | channels_last speed-up | "
        "NCHW vs resnet18 b64 NCHW | NCHW / channels_last images per CPU-s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for b, e in r["embed"].items():
        for bs in ("1", "64", "1-t1"):
            n, c = (e[f"{bs}-nchw"], e[f"{bs}-cl"]) if bs != "1-t1" else (e["1-nchw-t1"], e["1-cl-t1"])
            label = bs if bs != "1-t1" else "1, one thread"
            lines.append(f"| {b} | {label} | {n['images_per_s']:.1f} ({spread(n['images_per_s_all'])}) | "
                         f"{c['images_per_s']:.1f} ({spread(c['images_per_s_all'])}) | "
                         f"{e[f'channels_last_speedup_b{bs}']:.2f} | {n['ratio_vs_resnet18_b64_nchw']:.2f} | "
                         f"{n['images_per_cpu_s']:.1f} / {c['images_per_cpu_s']:.1f} |")
    lines += [
        "",
        f"Rows without a thread count use {r['threads']} torch threads. At batch 1 each operator is too "
        "small to split between threads, and on CPUs busy with other jobs the threads wait for each "
        "other at every operator: the one-thread rows measure that cost.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--worker":
        kind, spec = sys.argv[2], json.loads(sys.argv[3])
        print(json.dumps(worker_train(spec) if kind == "train" else worker_embed(spec)))
        sys.exit(0)
    sys.exit(main())
