"""Choose the weights of MFR's and CDT's own terms on held-out SOURCE identities only.

From the prior, every term that makes MFR or CDT more than a classifier pulls on the backbone with a small
fraction of the classifier's gradient (benchmarks/results/term_gradients.md: hard pairs ~9%, domain alignment
~1%, triplet ~3%, the cross-domain triplet ~0.1%), and the clipped step follows the classifier. A candidate
"share r" sets each term's weight so that its gradient at the prior is r times the classifier's:
weight = r / (measured ratio), for hp_weight, da_weight (MFR) and triplet_weight, cdt_weight (CDT). The
candidate "1" keeps every weight at 1 (DESIGN.md's plain sum, the presets so far).

For each leave-one-out split of the preset, each method and candidate, one run (seed 0, the preset's recipe
otherwise) is trained and scored by the trainer's own validation: TAR@FAR=1e-2 on all pairs of the held-out
identities of each source domain (never a target image), averaged over the domains. The chosen candidate of a
method maximises the mean of that over the splits. Resumable: finished runs are read, not retrained.

    python benchmarks/term_weights.py --out benchmarks/results/term_weights
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from results_files import machine, write_results

# The weight each method's terms take, and the row of term_gradients.json that gives the term's ratio to the
# classifier's gradient (mean over the rows listed: meta-train and meta-test where both were measured).
TERMS = {
    "mfr": {"hp_weight": ["mfr: L_hp meta-train", "mfr: L_hp meta-test"], "da_weight": ["mfr: L_da meta-train"]},
    "cdt": {"triplet_weight": ["cdt: triplet meta-train"], "cdt_weight": ["cdt: L_cdt meta-test"]},
}


def share_weights(terms: dict[str, dict[str, float]], method: str, share: float) -> dict[str, float]:
    """The weights giving each of `method`'s terms a gradient `share` times the classifier's (2 significant
    digits), from the measured ratios in `terms` (term_gradients.json's "terms")."""
    out = {}
    for weight, rows in TERMS[method].items():
        ratio = statistics.fmean(terms[r]["ratio"] for r in rows)
        out[weight] = float(f"{share / ratio:.2g}")
    return out


def candidate_name(share: float | None) -> str:
    """"1" for the plain weights, else "share-<r>"."""
    return "1" if share is None else f"share-{share:g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="prior-styled", help="benchmark preset whose recipe is trained")
    ap.add_argument("--shares", type=float, nargs="+", default=[0.25, 1.0],
                    help="gradient shares to try besides the plain weights 1 (default 0.25 1)")
    ap.add_argument("--methods", nargs="+", default=["mfr", "cdt"], choices=sorted(TERMS))
    ap.add_argument("--targets", nargs="+", default=None, help="left-out targets (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gradients", default="benchmarks/results/term_gradients.json",
                    help="the measured gradient ratios (benchmarks/term_gradients.py)")
    ap.add_argument("--runs", default="runs/term_weights", help="folder for the training runs")
    ap.add_argument("--out", default="benchmarks/results/term_weights")
    args = ap.parse_args(argv)

    from facemeta.experiments.presets import load_bench_preset, run_config
    from facemeta.train.config import apply_overrides, config_from_dict
    from facemeta.train.data import prepare_data
    from facemeta.train.trainer import Trainer

    preset = load_bench_preset(args.preset)
    terms = json.loads(Path(args.gradients).read_text())["terms"]
    targets = args.targets or list(preset.targets)
    candidates = [None, *args.shares]
    cells = []
    for target in targets:
        data = None
        for method in args.methods:
            for share in candidates:
                weights = {} if share is None else share_weights(terms, method, share)
                out = Path(args.runs) / args.preset / candidate_name(share) / target / method / f"seed{args.seed}"
                final = out / "model.json"
                if not final.is_file():
                    base = run_config(preset, target, method, args.seed).to_dict()
                    over = {f"meta.{k}": v for k, v in weights.items()}
                    over.update({"output": str(out), "name": f"term-weights-{target}-{method}-{candidate_name(share)}"})
                    cfg = config_from_dict(apply_overrides(base, over))
                    data = data or prepare_data(cfg)  # the same sources for every method and candidate of a target
                    print(f"train {target} {method} {candidate_name(share)} {weights}", flush=True)
                    Trainer(cfg, data, progress=False).fit()
                val = json.loads(final.read_text())["meta"]["validation"]["per_domain"]
                per = {d: v["tar@far=1e-2"] for d, v in val.items()}
                cell = {"target": target, "method": method, "candidate": candidate_name(share), "weights": weights,
                        "per_domain": per, "mean": statistics.fmean(per.values())}
                cells.append(cell)
                print(f"{target} {method} {cell['candidate']}: "
                      + " ".join(f"{d} {v:.3f}" for d, v in per.items()) + f" mean {cell['mean']:.3f}", flush=True)

    names = [candidate_name(s) for s in candidates]
    lines = [f"# Weights of MFR's and CDT's own terms, chosen on held-out source identities (preset `{preset.name}`)",
             "", f"Machine: {machine()}. One run per split, method and candidate (seed {args.seed}, the preset's "
             "recipe otherwise); score: TAR@FAR=1e-2 on all pairs of the held-out identities of each source domain "
             "(never a target), mean over the domains. Candidate `share-r`: each term weighted so its gradient at "
             "the prior is r times the classifier's (ratios from term_gradients.json); `1`: every weight 1.", "",
             "| method | candidate | weights | " + " | ".join(f"leave-{t}-out" for t in targets) + " | mean |",
             "| --- | --- | --- | " + " | ".join("---" for _ in targets) + " | --- |"]
    chosen = {}
    for method in args.methods:
        means = {}
        for name in names:
            got = [c for c in cells if c["method"] == method and c["candidate"] == name]
            means[name] = statistics.fmean(c["mean"] for c in got)
            weights = ", ".join(f"{k} {v:g}" for k, v in got[0]["weights"].items()) or "all 1"
            lines.append(f"| {method} | {name} | {weights} | " + " | ".join(f"{c['mean']:.3f}" for c in got)
                         + f" | {means[name]:.3f} |")
        chosen[method] = max(names, key=lambda n: means[n])
    lines += ["", "Chosen (highest mean): " + "; ".join(f"{m} `{c}`" for m, c in chosen.items()) + "."]
    write_results(args.out, {"preset": preset.name, "seed": args.seed, "targets": targets, "cells": cells,
                             "chosen": chosen, "machine": machine()}, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
