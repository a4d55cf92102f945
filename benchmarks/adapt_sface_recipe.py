"""Candidate adapt settings for SFace through `facemeta benchmark adapt`'s grid (issue 26; results in
benchmarks/results/adapt/sface-recipe/, README there).

    python benchmarks/adapt_sface_recipe.py --targets mfr2-mask,ar-scarf --ks 10 --seeds 0,1 \
        --out benchmarks/results/adapt/sface-recipe/choice

Runs facemeta.experiments.adapt_bench.run_adapt_bench with the candidates of facemeta.experiments.adapt_bench.sface_choices
(`--only` a comma list of their names), with the benchmark's +stats rows, the enrolment photos told apart and
adapt's own per-backbone settings (SFace's other_blocks). Resumable like the benchmark.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def table(results: dict) -> str:
    """A compact Markdown table of a results document: per row (base, stats-only, each candidate and its +stats),
    per (protocol, k) the mean TAR (%) over draws and the paired difference against the base model and against
    statistics only (points, mean ± std over draws)."""
    from facemeta.experiments.adapt_bench import summarise

    summary = summarise(results)
    cols = sorted({(r["protocol"], r["k"]) for r in summary}, key=lambda c: [r["protocol"] for r in summary]
                  .index(c[0]) * 100 + c[1])
    rows = list(dict.fromkeys(r["row"] for r in summary))
    cell = {(r["row"], r["protocol"], r["k"]): r for r in summary}

    def fmt(r) -> str:
        if r is None:
            return ""
        text = f"{100 * r['mean']:.1f}"
        for ref in ("base", "stats-only"):
            d = r.get(f"vs {ref}")
            text += "" if d is None else f" / {100 * d[0]:+.1f}±{100 * d[1]:.1f}"
        return text

    head = "| row | " + " | ".join(f"{p} k={k} (n={max(cell[(rw, p, k)]['n'] for rw in rows if (rw, p, k) in cell)})"
                                   for p, k in cols) + " |"
    lines = [head, "| --- |" + " --- |" * len(cols)]
    lines += ["| " + r + " | " + " | ".join(fmt(cell.get((r, p, k))) for p, k in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Parse the arguments, run the grid, print where the table went."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="runs/zero-shot/sface.safetensors", help="single model to adapt")
    ap.add_argument("--targets", help="comma list of adapt_bench protocols")
    ap.add_argument("--ks", default="10", help="comma list of k")
    ap.add_argument("--seeds", default="0,1", help="comma list of draws")
    ap.add_argument("--only", help="comma list of candidate names (default: all)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--table", action="store_true", help="print OUT's compact table (TAR / Δ base / Δ stats-only)")
    args = ap.parse_args(argv)
    if args.table:
        import json

        print(table(json.loads((args.out / "results.json").read_text(encoding="utf-8"))))
        return 0
    if not args.targets:
        ap.error("--targets is required (unless --table)")

    from facemeta.experiments import adapt_bench

    cands = adapt_bench.sface_choices()
    if args.only:
        missing = [n for n in args.only.split(",") if n not in cands]
        if missing:
            ap.error(f"unknown candidates {missing}; known: {', '.join(cands)}")
        cands = {n: cands[n] for n in args.only.split(",")}

    def on_cell(results):
        c = results["cells"][-1]
        tars = " ".join(f"{n}={100 * r['tar']:.1f}" for n, r in c["rows"].items())
        print(f"{c['protocol']} k={c['k']} seed={c['seed']}: {tars}", flush=True)

    adapt_bench.run_adapt_bench(args.base, args.targets.split(","), [int(k) for k in args.ks.split(",")],
                                [int(s) for s in args.seeds.split(",")], cands, args.out, progress=False,
                                on_cell=on_cell, stats_rows=True)
    print(args.out / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
