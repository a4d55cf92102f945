"""Choose settings of MFR and CDT on held-out SOURCE identities only: the weights of their own terms, or any
one setting over a list of values.

Candidates (besides `base`, the preset's recipe as it is):
- `--shares R ...`: from the prior, every term that makes MFR or CDT more than a classifier pulls on the
  backbone with a small fraction of the classifier's gradient (benchmarks/results/term_gradients.md: hard
  pairs ~9%, domain alignment ~1.5%, triplet ~3%, the cross-domain triplet ~0.1%), and the clipped step
  follows the classifier. Candidate `share-r` weights each term so that its gradient at the prior is r times
  the classifier's: weight = r / (measured ratio), for hp_weight, da_weight (MFR) and triplet_weight,
  cdt_weight (CDT).
- `--vary KEY V ...`: candidate `KEY=V` overrides one config key (e.g. `meta.alpha`, the virtual step).

For each leave-one-out split of the preset, each method and candidate, one run (seed 0, the preset's recipe
otherwise) is trained and scored by the trainer's own validation: TAR@FAR=1e-2 on all pairs of the held-out
identities of each source domain (never a target image), averaged over the domains. A method's chosen
candidate maximises the mean of that over the splits. Resumable: finished runs are read, not retrained.

    python benchmarks/heldout_select.py --shares 0.25 1 --out benchmarks/results/term_weights
    python benchmarks/heldout_select.py --vary meta.alpha 0 0.002 0.005 --out benchmarks/results/virtual_step
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import yaml
from results_files import machine, write_results

# The weight each method's terms take, and the rows of term_gradients.json that give the term's ratio to the
# classifier's gradient (mean over the rows listed: meta-train and meta-test where both were measured).
TERMS = {
    "mfr": {"hp_weight": ["mfr: L_hp meta-train", "mfr: L_hp meta-test"], "da_weight": ["mfr: L_da meta-train"]},
    "cdt": {"triplet_weight": ["cdt: triplet meta-train"], "cdt_weight": ["cdt: L_cdt meta-test"]},
}


def share_weights(terms: dict[str, dict[str, float]], method: str, share: float) -> dict[str, float]:
    """The weights (meta.* overrides, 2 significant digits) giving each of `method`'s terms a gradient `share`
    times the classifier's, from the measured ratios in `terms` (term_gradients.json's "terms")."""
    out = {}
    for weight, rows in TERMS[method].items():
        ratio = statistics.fmean(terms[r]["ratio"] for r in rows)
        out[f"meta.{weight}"] = float(f"{share / ratio:.2g}")
    return out


def candidates(args, method: str) -> dict[str, dict[str, Any]]:
    """Candidate name -> the config overrides it makes, for one method (`base` first: none)."""
    out: dict[str, dict[str, Any]] = {"base": {}}
    if args.shares:
        terms = json.loads(Path(args.gradients).read_text())["terms"]
        for share in args.shares:
            out[f"share-{share:g}"] = share_weights(terms, method, share)
    if args.vary:
        key, *values = args.vary
        for value in values:
            out[f"{key.removeprefix('meta.')}-{value}"] = {key: yaml.safe_load(value)}  # numbers, true/false
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="prior-styled", help="benchmark preset whose recipe is trained")
    ap.add_argument("--shares", type=float, nargs="+", default=[],
                    help="gradient shares of MFR's and CDT's own terms to try (e.g. 0.25 1)")
    ap.add_argument("--vary", nargs="+", metavar="KEY V", default=[],
                    help="one config key and the values to try (e.g. meta.alpha 0 0.002)")
    ap.add_argument("--methods", nargs="+", default=["mfr", "cdt"], choices=["erm", *sorted(TERMS)],
                    help="methods whose candidates are trained (erm: with --vary only; it has no own terms)")
    ap.add_argument("--reference", action="store_true",
                    help="also train ERM as it is (row `erm base`, not a candidate): the level to beat")
    ap.add_argument("--targets", nargs="+", default=None, help="left-out targets (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gradients", default="benchmarks/results/term_gradients.json",
                    help="the measured gradient ratios (benchmarks/term_gradients.py), for --shares")
    ap.add_argument("--runs", default="runs/heldout_select", help="folder for the training runs")
    ap.add_argument("--out", required=True, help="results file stem (OUT.md, OUT.json)")
    args = ap.parse_args(argv)
    if not args.shares and len(args.vary) < 2:
        ap.error("give --shares, or --vary KEY and at least one value")
    if args.shares and "erm" in args.methods:
        ap.error("--shares weights MFR's and CDT's own terms; ERM has none")
    if args.reference and "erm" in args.methods:
        ap.error("--reference adds ERM's base row; ERM is already among --methods")

    from facemeta.experiments.presets import load_bench_preset, run_config
    from facemeta.train.config import apply_overrides, config_from_dict
    from facemeta.train.data import prepare_data
    from facemeta.train.trainer import Trainer

    preset = load_bench_preset(args.preset)
    targets = args.targets or list(preset.targets)
    cells = []
    grid = [("erm", {"base": {}})] if args.reference else []
    grid += [(method, candidates(args, method)) for method in args.methods]
    for target in targets:
        data = None
        for method, named in grid:
            for name, over in named.items():
                out = Path(args.runs) / args.preset / name / target / method / f"seed{args.seed}"
                final = out / "model.json"
                if not final.is_file():
                    base = run_config(preset, target, method, args.seed).to_dict()
                    cfg = config_from_dict(apply_overrides(base, {**over, "output": str(out),
                                                                  "name": f"select-{target}-{method}-{name}"}))
                    data = data or prepare_data(cfg)  # the same sources for every method and candidate of a target
                    print(f"train {target} {method} {name} {over}", flush=True)
                    Trainer(cfg, data, progress=False).fit()
                val = json.loads(final.read_text())["meta"]["validation"]["per_domain"]
                per = {d: v["tar@far=1e-2"] for d, v in val.items()}
                cells.append({"target": target, "method": method, "candidate": name, "overrides": over,
                              "per_domain": per, "mean": statistics.fmean(per.values())})
                print(f"{target} {method} {name}: " + " ".join(f"{d} {v:.3f}" for d, v in per.items())
                      + f" mean {cells[-1]['mean']:.3f}", flush=True)

    lines = [f"# Settings chosen on held-out source identities (preset `{preset.name}`)", "",
             f"Machine: {machine()}. One run per split, method and candidate (seed {args.seed}, the preset's "
             "recipe otherwise); score: TAR@FAR=1e-2 on all pairs of the held-out identities of each source domain "
             "(never a target), mean over the domains. `base`: the preset as it is."
             + (" `share-r`: each of the method's own terms weighted so its gradient at the prior is r times the "
                "classifier's (ratios from term_gradients.json)." if args.shares else "")
             + (" Row `erm base`: ERM as it is, the level to beat (not a candidate)." if args.reference else ""), "",
             "| method | candidate | overrides | " + " | ".join(f"leave-{t}-out" for t in targets) + " | mean |",
             "| --- | --- | --- | " + " | ".join("---" for _ in targets) + " | --- |"]
    chosen = {}
    for method, named in grid:
        means = {}
        for name in named:
            got = [c for c in cells if c["method"] == method and c["candidate"] == name]
            means[name] = statistics.fmean(c["mean"] for c in got)
            over = ", ".join(f"{k} {v}" for k, v in got[0]["overrides"].items()) or "none"
            lines.append(f"| {method} | {name} | {over} | " + " | ".join(f"{c['mean']:.3f}" for c in got)
                         + f" | {means[name]:.3f} |")
        if method in args.methods:
            chosen[method] = max(means, key=lambda n: means[n])
    lines += ["", "Chosen (highest mean): " + "; ".join(f"{m} `{c}`" for m, c in chosen.items()) + "."]
    write_results(args.out, {"preset": preset.name, "seed": args.seed, "targets": targets, "cells": cells,
                             "chosen": chosen, "machine": machine()}, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
