"""`facemeta benchmark cross-domain`: the cross-domain benchmark of issue 25 (domain statistics from unlabelled
photos, on the shared sets), dispatched by name from `facemeta benchmark`."""

from __future__ import annotations

import argparse

DESCRIPTION = ("cross-domain: an enrolled domain against probe domains on the shared sets (MFR2 unmasked vs masked, "
               "Yale B frontal vs light angle, AR neutral vs expression/light/sunglasses/scarf/other session, thermal "
               "gallery vs probes with never-enrolled people; LFW pairs.txt folds 6-10 and ORL as in-domain "
               "controls), raw and with each domain statistic estimated from N unlabelled photos of OTHER people "
               "per domain; TAR@FAR=1e-2/1e-3, rank-1, thermal open-set FAR. Each image is embedded once per model "
               "and cached; the rest is numpy.")


def _ints(text: str) -> list[int]:
    out = []
    for t in text.split(","):
        t = t.strip()
        if t:
            out.append(-1 if t == "all" else int(t))
    return out


def add_options(group: argparse._ArgumentGroup) -> None:
    """The options of `benchmark cross-domain` (ignored by the presets)."""
    from facemeta.experiments.cross_domain import COUNTS, DRAWS, STATISTICS
    from facemeta.experiments.cross_domain_embed import MODELS
    from facemeta.experiments.cross_domain_protocols import SETS

    group.add_argument("--models", help=f"cross-domain: comma list of {','.join(MODELS)} or checkpoint files (single "
                                        "models or ensembles; default: all four names)")
    group.add_argument("--sets", help=f"cross-domain: comma list of {','.join(SETS)} (default: all)")
    group.add_argument("--statistics", help=f"cross-domain: comma list of {','.join(STATISTICS)} (default: all)")
    group.add_argument("--counts", help="cross-domain: unlabelled photos per domain, comma list, 'all' for every "
                                        "photo of the pool (default: " + ",".join(
                                            "all" if c < 0 else str(c) for c in COUNTS) + ")")
    group.add_argument("--draws", type=int, default=DRAWS, help=f"cross-domain: random halvings (default {DRAWS})")
    group.add_argument("--points", default="five",
                       help="cross-domain: landmark rule of facemeta.align.robust (five, eyes-nose, plausible)")
    group.add_argument("--alignment", help="cross-domain: also score these landmark rules raw with the shipped model "
                                           "(comma list, e.g. five,plausible,eyes-nose; issue 25 item 4)")
    group.add_argument("--figure", action="store_true",
                       help="cross-domain: also draw aligned_faces.png (AR and thermal faces as the benchmark aligns them)")
    group.add_argument("--json", action="store_true", help="cross-domain: print the results as JSON")
    group.add_argument("--quick", action="store_true",
                       help="cross-domain: only AR neutral (01, 14) vs sunglasses (08, 21), shipped model, about 400 "
                            "images embedded once (cached): TAR@FAR=1e-2 raw and with domains as `facemeta domain "
                            "add` makes them (10 unlabelled photos per domain), printed; writes nothing")


def run(args: argparse.Namespace) -> int:
    """Score the grid and write results.json, results.md and the plots."""
    import json
    from pathlib import Path

    from facemeta.align.robust import RULES
    from facemeta.errors import ConfigError
    from facemeta.experiments.cross_domain import COUNTS, STATISTICS, alignment_rows, run_benchmark, save
    from facemeta.experiments.cross_domain_embed import MODELS
    from facemeta.experiments.cross_domain_protocols import SETS
    from facemeta.experiments.cross_domain_report import aligned_faces_figure, write_report

    if getattr(args, "quick", False):
        from facemeta.experiments.cross_domain_quick import format_quick, run_quick

        quick = run_quick(args.data, progress=not args.json)
        print(json.dumps(quick) if args.json else format_quick(quick))
        return 0
    def choose(text: str | None, known: tuple[str, ...], what: str, files: bool = False) -> tuple[str, ...]:
        if not text:
            return known
        items = tuple(t.strip() for t in text.split(",") if t.strip())
        bad = [t for t in items if t not in known and not (files and Path(t).is_file())]
        if bad or not items:
            raise ConfigError(f"--{what}: unknown {', '.join(bad) or '(empty)'}; known: {', '.join(known)}")
        return items

    models = choose(args.models, MODELS, "models", files=True)
    sets = choose(args.sets, SETS, "sets")
    statistics = choose(args.statistics, STATISTICS, "statistics")
    try:
        counts = tuple(_ints(args.counts)) if args.counts else COUNTS
    except ValueError:
        raise ConfigError(f"--counts: expected numbers or 'all', got {args.counts!r}") from None
    if any(c < -1 for c in counts) or args.draws < 1:
        raise ConfigError("--counts must be >= 0 (or 'all') and --draws >= 1")
    if args.points not in RULES:
        raise ConfigError(f"--points must be one of {', '.join(RULES)}, not {args.points!r}")
    out = Path(args.out) if args.out else Path("benchmarks") / "results" / "cross_domain"
    result = run_benchmark(models, sets, statistics, (0, *[c for c in counts if c != 0]), args.draws,
                           points=args.points, progress=not args.json, root=args.data)
    if args.alignment:
        rules = choose(args.alignment, RULES, "alignment")
        result["alignment"] = alignment_rows(sets, rules, draws=args.draws, progress=not args.json,
                                             root=args.data)
    save(result, out)
    write_report(result, out)
    if args.figure:
        aligned_faces_figure(out)
    if args.json:
        print(json.dumps(result))
    else:
        print((out / "results.md").read_text(encoding="utf-8"))
    return 0
