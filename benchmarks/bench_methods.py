"""Step cost of each training method as a ratio to an ERM step on the same images, in one run.

Real aligned faces (ORL, MFR2, Yale B; cached alignment), one episode of 3 domains x B identities
x 2 images, the same backbone; each method's step (gradient + optimiser step) is timed over the
same pre-loaded episodes, interleaved round-robin so that load changes on a shared CPU hit every
method alike. Reports the median wall time and process CPU time per step and both as ratios to ERM.

    python benchmarks/bench_methods.py [--backbone resnet10t --size 64 --b 8 --repeats 5 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from facemeta.align.cache import aligned_set
from facemeta.data.episodes import EpisodicDomainSampler
from facemeta.data.samplers import FaceDataset
from facemeta.data.transforms import AugmentConfig, build_train_transform
from facemeta.models.backbone import ModelConfig, build_model
from facemeta.objectives.margins import CosFaceHead
from facemeta.train.methods import METHODS, Joint, MethodSettings, build_heads, load_episode, train_step

OUT = Path(__file__).resolve().parent / "results"


def main() -> None:
    """Time every method on the same episodes and write results/methods.{md,json}."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="resnet10t")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--embedding", type=int, default=256)
    ap.add_argument("--b", type=int, default=8, help="identities per domain")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--second-order", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for name in ("orl", "mfr2", "yaleb"):
        got = aligned_set(name, 112, limit_per_identity=4)
        rows += [r for r in got if r.identity in sorted({x.identity for x in got})[:20]]
    for r in rows:
        r.identity = f"{r.domain}/{r.identity}"
    ident = {n: i for i, n in enumerate(sorted({r.identity for r in rows}))}
    ds = FaceDataset(rows, build_train_transform(AugmentConfig(), args.size), ident, {"orl": 0, "mfr2": 1, "yaleb": 2})
    sampler = EpisodicDomainSampler(ds.labels, ds.domains, identities_per_domain=args.b, seed=0)
    batches = [load_episode(ds, sampler.episode(s), seed=0) for s in range(args.repeats + 1)]
    settings = MethodSettings(first_order=not args.second_order)

    joints, opts = {}, {}
    for m in METHODS:
        torch.manual_seed(0)
        model = build_model(ModelConfig(backbone=args.backbone, embedding_size=args.embedding, image_size=args.size))
        heads = build_heads(m, args.embedding, len(ident),
                            lambda: CosFaceHead(args.embedding, len(ident), s=32.0, m=0.3), settings)
        joints[m] = Joint(model, heads).train()
        opts[m] = torch.optim.SGD(joints[m].parameters(), lr=0.01, momentum=0.9)
    wall: dict[str, list[float]] = {m: [] for m in METHODS}
    cpu: dict[str, list[float]] = {m: [] for m in METHODS}
    for i, batch in enumerate(batches):
        for m in METHODS:
            t0, c0 = time.perf_counter(), time.process_time()
            train_step(m, joints[m], batch, opts[m], settings, grad_clip=5.0)
            if i > 0:  # the first round warms up
                wall[m].append(time.perf_counter() - t0)
                cpu[m].append(time.process_time() - c0)
    med = {m: statistics.median(wall[m]) for m in METHODS}
    med_cpu = {m: statistics.median(cpu[m]) for m in METHODS}
    result = {
        "setup": {"backbone": args.backbone, "image_size": args.size, "embedding": args.embedding,
                  "identities_per_domain": args.b, "domains": 3, "images_per_step": batches[0].num_images,
                  "repeats": args.repeats, "threads": args.threads, "first_order": settings.first_order,
                  "reptile_inner_steps": settings.reptile_inner_steps, "maml_inner_steps": settings.inner_steps,
                  "torch": torch.__version__, "machine": platform.processor() or platform.machine()},
        "seconds_per_step": med, "cpu_seconds_per_step": med_cpu,
        "ratio_to_erm": {m: med[m] / med["erm"] for m in METHODS},
        "cpu_ratio_to_erm": {m: med_cpu[m] / med_cpu["erm"] for m in METHODS},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "methods.json").write_text(json.dumps(result, indent=2) + "\n")
    s = result["setup"]
    lines = ["# Step cost per method (ratio to ERM on the same images)", "",
             f"{s['backbone']} at {s['image_size']}x{s['image_size']}, {s['images_per_step']} real aligned faces per "
             f"step (3 domains x {s['identities_per_domain']} identities x 2), {s['threads']} thread(s), "
             f"{'first' if s['first_order'] else 'second'}-order meta steps, median of {s['repeats']} "
             "interleaved steps on a shared 2-core CPU (CPU-time ratios are the steadier figure).", "",
             "| method | s/step | ratio to ERM | CPU s/step | CPU ratio to ERM |", "|---|---|---|---|---|"]
    for m in METHODS:
        lines.append(f"| {m} | {med[m]:.3f} | {result['ratio_to_erm'][m]:.2f} | {med_cpu[m]:.3f} | "
                     f"{result['cpu_ratio_to_erm'][m]:.2f} |")
    (OUT / "methods.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
