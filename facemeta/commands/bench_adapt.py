"""`facemeta benchmark adapt`: adaptation from k labelled people of a target domain, scored on its other people
(issue 26, item 3; facemeta.experiments.adapt_bench), dispatched by name from `facemeta benchmark`."""

from __future__ import annotations

import argparse

DESCRIPTION = ("adapt: `facemeta adapt` from k labelled people of a target condition (AR neutral vs scarf or "
               "sunglasses, MFR2 unmasked vs masked, Yale B frontal vs side light, thermal gallery vs probes), scored "
               "on the target's OTHER people (TAR@FAR=1e-2 of every enrolment-vs-target pair), against the base model "
               "and statistics only; --targets picks protocols, --ks the numbers of people, --seeds the draws, "
               "--base the start (a single model or an ensemble such as the shipped v3, adapted member by member), "
               "--with-stats adds adapt with the domain statistics. Resumable: cells already in --out "
               "(same model and settings) are kept and not run again.")
PROTOCOLS = ("ar-scarf", "ar-sunglasses", "mfr2-mask", "yaleb-side", "thermal")  # adapt_bench.PROTOCOLS


def add_options(group: argparse._ArgumentGroup) -> None:
    """The options of `benchmark adapt` (ignored by the presets)."""
    group.add_argument("--ks", help="adapt: comma list of labelled people per draw (default 0,2,5,10,20)")
    group.add_argument("--base", metavar="MODEL", help="adapt: the model adapted (default: the shipped model)")
    group.add_argument("--choices", action="store_true",
                       help="adapt: compare the candidate settings adapt's defaults were chosen from instead")
    group.add_argument("--with-stats", action="store_true",
                       help="adapt: also score each setting with the domain statistics (rows '<setting>+stats': the "
                            "target's mean removed inside adapt's loss, as `facemeta adapt --domain` does, then each "
                            "condition centred as for statistics only)")
    group.add_argument("--no-adapt", action="store_true",
                       help="adapt: score the base model and statistics only (no fine-tuning; e.g. to compare starts "
                            "trained for statistics)")


def run(args: argparse.Namespace) -> int:
    """Score the grid and write results.json and results.md under --out (default benchmarks/results/adapt)."""
    from pathlib import Path

    from facemeta.embedder import default_model_path
    from facemeta.errors import ConfigError
    from facemeta.experiments.adapt_bench import choices, run_adapt_bench
    from facemeta.train.adapt import AdaptSettings

    protocols = tuple(args.targets or PROTOCOLS)
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad:
        raise ConfigError(f"unknown adapt protocol {bad[0]!r}; one of {', '.join(PROTOCOLS)}")
    try:
        ks = [int(k) for k in (args.ks or "0,2,5,10,20").split(",") if k.strip()]
    except ValueError:
        raise ConfigError(f"--ks must be a comma list of integers, got {args.ks!r}") from None
    if not ks or min(ks) < 0:
        raise ConfigError(f"--ks must be a comma list of integers >= 0, got {args.ks!r}")
    out = Path(args.out) if args.out else Path("benchmarks") / "results" / "adapt"
    base = args.base or default_model_path()
    settings = {} if args.no_adapt else choices() if args.choices else {"adapt": AdaptSettings()}
    if args.with_stats and not settings:
        raise ConfigError("--with-stats scores adapt's settings with statistics; --no-adapt has none to score")
    run_adapt_bench(base, protocols, ks, args.seeds or [0, 1, 2], settings, out, data=args.data,
                    progress=args.progress, stats_rows=args.with_stats)
    print((out / "results.md").read_text(encoding="utf-8"))
    return 0
