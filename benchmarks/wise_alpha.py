"""Choose the interpolation weight `interpolate` (WiSE-FT, facemeta.train.interpolation) on held-out SOURCE
identities only, from the finished runs of a benchmark preset (default: `prior`).

For every finished run (target, method, seed) it interpolates the run's final weights with the zero-shot
row's weights of the same target at each alpha, and measures TAR@FAR=1e-2 on all pairs of the held-out
identities of each source domain (the identities the trainer kept out of training for calibration: never a
target). The chosen alpha maximises the mean over runs of the mean over source domains.

    python benchmarks/wise_alpha.py --preset prior --out benchmarks/results/wise_alpha
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from results_files import machine, write_results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="prior")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--methods", nargs="+", default=["erm", "mfr", "cdt", "reptile"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/wise_alpha")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from facemeta.eval.benchmark import embed_rows, evaluate_rows
    from facemeta.experiments.presets import ZERO_SHOT, load_bench_preset, run_config, run_dir
    from facemeta.models.checkpoint import load_checkpoint
    from facemeta.train.data import prepare_data
    from facemeta.train.interpolation import interpolate_state

    preset = load_bench_preset(args.preset)
    cells = []
    for target in preset.targets:
        start_path = run_dir(preset, target, ZERO_SHOT, preset.seeds[0]) / "model.safetensors"
        if not start_path.is_file():
            print(f"skip {target}: no zero-shot run at {start_path}", file=sys.stderr)
            continue
        start, _ = load_checkpoint(start_path)
        start_state = {k: v.clone() for k, v in start.state_dict().items()}
        heldout = prepare_data(run_config(preset, target, "erm", preset.seeds[0])).heldout
        domains = sorted({r.domain for r in heldout})
        for method in args.methods:
            for seed in preset.seeds:
                path = run_dir(preset, target, method, seed) / "model.safetensors"
                if not path.is_file():
                    continue
                cell = {"target": target, "method": method, "seed": seed, "alphas": {}}
                model, _ = load_checkpoint(path)  # read once; each alpha interpolates from the trained weights
                trained = {k: v.clone() for k, v in model.state_dict().items()}
                for alpha in args.alphas:
                    model.load_state_dict(interpolate_state(start_state, trained, alpha))
                    emb = embed_rows(model, heldout, flip=False)
                    per = {}
                    for dom in domains:
                        idx = [i for i, r in enumerate(heldout) if r.domain == dom]
                        res = evaluate_rows(model, [heldout[i] for i in idx], flip=False, embeddings=emb[idx])
                        per[dom] = res["tar@far=1e-2"]
                    cell["alphas"][str(alpha)] = {"per_domain": per, "mean": statistics.fmean(per.values())}
                    print(f"{target} {method} s{seed} alpha {alpha}: "
                          + " ".join(f"{d} {v:.3f}" for d, v in per.items()) + f" mean {statistics.fmean(per.values()):.3f}",
                          flush=True)
                cells.append(cell)
    if not cells:
        print("no finished runs found", file=sys.stderr)
        return 1
    summary = {str(a): statistics.fmean(c["alphas"][str(a)]["mean"] for c in cells) for a in args.alphas}
    chosen = max(args.alphas, key=lambda a: summary[str(a)])
    lines = [f"# Interpolation weight chosen on held-out source identities (preset `{preset.name}`)", "",
             f"Machine: {machine()}. {len(cells)} finished runs; per run, TAR@FAR=1e-2 on all pairs of the held-out",
             "identities of each source domain (never a target), averaged over the domains; then over runs.", "",
             "| alpha | " + " | ".join(args.methods) + " | all runs |",
             "| --- | " + " | ".join("---" for _ in args.methods) + " | --- |"]
    for a in args.alphas:
        per_method = []
        for m in args.methods:
            vals = [c["alphas"][str(a)]["mean"] for c in cells if c["method"] == m]
            per_method.append(f"{statistics.fmean(vals):.3f}" if vals else "-")
        lines.append(f"| {a:g} | " + " | ".join(per_method) + f" | {summary[str(a)]:.3f} |")
    lines += ["", f"Chosen: alpha = {chosen:g} (highest mean over all runs). alpha 0 is the zero-shot prior, "
              "1 the fine-tuned weights."]
    write_results(Path(args.out), {"preset": preset.name, "alphas": args.alphas, "cells": cells,
                                   "summary": summary, "chosen": chosen, "machine": machine()}, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
