"""`facemeta benchmark PRESET`: the unseen-domain (leave-one-domain-out) benchmark of DESIGN.md."""

from __future__ import annotations

import argparse
import importlib

# Benchmarks run by name instead of a preset: name -> module with add_options(group) and run(args).
NAMED = {"cross-domain": "facemeta.commands.bench_cross_domain", "adapt": "facemeta.commands.bench_adapt"}


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `benchmark` and its options."""
    from facemeta.commands.options import shipped_presets

    names = shipped_presets("bench")
    p = subparsers.add_parser(
        "benchmark", help="leave-one-domain-out benchmark of the training methods on the real face sets",
        description="For each unseen target (yaleb, orl, mfr2), method and seed: train on LFW people folds 1-5 "
                    "plus the other two sets, evaluate on the target and on LFW pairs.txt folds 6-10, and write "
                    "results.md (mean ± std, best in bold), results.json and ROC PNGs per target to "
                    "benchmarks/results/<preset>/. Resumable: finished runs are skipped. Presets: "
                    f"facemeta/configs/bench/ ({names}) or a YAML file. Method `teacher`: the "
                    "starting weights themselves, zero-shot (run once per target). Named benchmarks with options "
                    "of their own: " + "; ".join(importlib.import_module(m).DESCRIPTION for m in NAMED.values()))
    p.add_argument("preset", metavar="PRESET",
                   help=f"benchmark preset name ({names}) or YAML file, or a named benchmark ({', '.join(NAMED)})")
    p.add_argument("--methods", type=_list, help="comma list, e.g. erm,mfr (default: the preset's)")
    p.add_argument("--targets", type=_list, help="comma list of yaleb,orl,mfr2 (default: the preset's)")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in _list(s)], help="comma list of seeds")
    p.add_argument("--out", help="results folder (default benchmarks/results/<preset>)")
    p.add_argument("--runs", help="folder for the training runs (default: the preset's, runs/bench)")
    p.add_argument("--data", help="root of the shared face sets (default $FACEMETA_DATA or ../shared/data)")
    p.add_argument("--progress", action="store_true", help="a progress bar per training run")
    p.add_argument("--summary-only", action="store_true",
                   help="train nothing: write the tables from the runs finished so far (to commit a long run's "
                        "cells as they finish)")
    for name, module in NAMED.items():
        importlib.import_module(module).add_options(p.add_argument_group(f"{name} options"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """A named benchmark (NAMED), or the preset's grid (skipping finished runs) and its summary files."""
    if args.preset in NAMED:
        return importlib.import_module(NAMED[args.preset]).run(args)
    from pathlib import Path

    from facemeta.errors import ConfigError
    from facemeta.experiments.lodo import finished_results, run_benchmark
    from facemeta.experiments.presets import check_grid, known_methods, load_bench_preset
    from facemeta.experiments.summary import write_summary

    preset = load_bench_preset(args.preset)
    if args.methods:
        preset.methods = args.methods
    if args.targets:
        preset.targets = args.targets
    if args.seeds:
        preset.seeds = args.seeds
    if args.runs:
        preset.runs = args.runs
    check_grid(preset.methods, preset.targets, preset.seeds, known_methods(preset))
    out = Path(args.out) if args.out else Path("benchmarks") / "results" / preset.name
    if args.summary_only:
        results = finished_results(preset)
        if not results:
            raise ConfigError(f"no finished runs of preset {preset.name} under {preset.runs}")
        write_summary(preset, results, out)
        print(f"wrote {out / 'results.md'} from {len(results)} finished runs")
        return 0
    try:
        run_benchmark(preset, out, data_root=args.data, progress=args.progress)
    except KeyboardInterrupt:
        raise ConfigError("interrupted; run the same command again to continue (finished runs are kept)") from None
    print(f"wrote {out / 'results.md'}")
    print((out / "results.md").read_text(encoding="utf-8"))
    return 0
