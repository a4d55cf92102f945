"""Shipped model v3: apply the rule of benchmarks/results/shipped_v3/RULE.md to the measured candidates.

Reads the cross-domain benchmark's results (``facemeta benchmark cross-domain --models ...``: raw TAR@FAR=1e-2 per
protocol cell, mean over its draws) for the start E0 (``prior+sface``) and the candidates (checkpoint files), and
scores LFW ``pairs.txt`` folds 6-10 accuracy per fold (threshold chosen on the other four folds; the same cached
vectors, flip TTA) for each; writes ``results.json`` and ``results.md`` under benchmarks/results/shipped_v3/ with
the verdict per candidate and the choice.

    python benchmarks/shipped_v3.py --results benchmarks/results/cross_domain_starts/results.json \\
        --candidate C1=runs/v3/c1.safetensors --candidate C2=runs/v3/c2.safetensors \\
        --reference v2=runs/v3/v2.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

START = "prior+sface"
OUT = Path(__file__).resolve().parent / "results" / "shipped_v3"


def raw_cells(results: dict, model: str) -> dict[str, float]:
    """{protocol / probe: raw TAR@FAR=1e-2 in %, rounded to one decimal} of the cross-domain protocols."""
    out = {}
    for p in results["protocols"]:
        if p["model"] != model or p["kind"] != "cross":
            continue
        for row in p["rows"]:
            if row["statistic"] == "raw" and row.get("count", 0) == 0:
                out[f"{p['protocol']} / {row['probe']}"] = round(row["tar@far=1e-2"], 1)  # already in %
    return out


def lfw_fold_accuracy(model: str) -> dict[str, float]:
    """LFW pairs.txt folds 6-10: accuracy of each fold at the threshold that is best on the other four folds."""
    from facemeta.data.sets import read_pairs
    from facemeta.experiments.cross_domain_embed import embed_set
    from facemeta.experiments.cross_domain_protocols import benchmark_rows

    rows = benchmark_rows("lfw")
    vectors = embed_set("lfw", rows, (model,), progress=False)[model]
    index = {r.path: i for i, r in enumerate(rows)}
    pairs = [p for p in read_pairs("lfw") if p.fold >= 6]
    scores = np.array([float(vectors[index[p.a]] @ vectors[index[p.b]]) for p in pairs])
    same = np.array([p.same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    accs = []
    for f in range(6, 11):
        train = folds != f
        cands = np.unique(scores[train])
        best = max(cands, key=lambda t: np.mean((scores[train] >= t) == same[train]))
        accs.append(float(np.mean((scores[~train] >= best) == same[~train])))
    return {"mean": 100 * float(np.mean(accs)), "std": 100 * float(np.std(accs)),
            "folds": [100 * a for a in accs]}


def main(argv: list[str] | None = None) -> int:
    """Apply the rule and write the verdict."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, required=True, help="the cross-domain benchmark's results.json")
    ap.add_argument("--candidate", action="append", default=[], metavar="NAME=PATH", help="candidate, in order")
    ap.add_argument("--reference", action="append", default=[], metavar="NAME=MODEL",
                    help="rows shown beside, not candidates (e.g. v2=runs/v3/v2.safetensors)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    results = json.loads(args.results.read_text())
    named = [tuple(c.split("=", 1)) for c in args.candidate] + [("E0", START)]
    shown = [tuple(c.split("=", 1)) for c in args.reference] + [("dlib prior", "prior"), ("sface", "sface")]
    start = raw_cells(results, START)
    doc = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": str(args.results),
           "results_date": results["date"], "draws": results["draws"], "start": START, "candidates": [],
           "shown": []}
    for label, model in named + shown:
        cells = raw_cells(results, model)
        lfw = lfw_fold_accuracy(model)
        below = {k: (v, start[k]) for k, v in cells.items() if v < start[k]}
        entry = {"name": label, "model": model, "cells": cells, "mean": float(np.mean(list(cells.values()))),
                 "lfw": lfw, "below_start": below,
                 "eligible": not below and round(lfw["mean"], 2) >= 99.2}
        doc["candidates" if (label, model) in named else "shown"].append(entry)
    eligible = [c for c in doc["candidates"] if c["eligible"]]
    best = max(eligible, key=lambda c: round(c["mean"], 6)) if eligible else None  # max keeps the first of ties
    doc["choice"] = best["name"] if best else None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / "results.md").write_text(render(doc) + "\n")
    print(render(doc))
    return 0


def render(doc: dict) -> str:
    """The verdict as markdown: every cell of every row, the start's marked, the rule's outcome."""
    rows = doc["candidates"] + doc["shown"]
    cells = list(rows[0]["cells"])
    head = "| protocol / probe | " + " | ".join(r["name"] for r in rows) + " |"
    lines = [f"# Shipped model v3: the rule applied ({doc['date']})", "",
             f"Raw TAR@FAR=1e-2 in % (mean over {doc['draws']} draws of `facemeta benchmark cross-domain`, run "
             f"{doc['results_date']}; `{doc['results']}`), rounded as the rule reads them. E0 = dlib prior + SFace "
             "zero-shot (the start). A **bold** cell is below E0.", "", head,
             "|" + " --- |" * (len(rows) + 1)]
    start = {c: v for c, v in doc["candidates"][-1]["cells"].items()}
    for c in cells:
        vals = [r["cells"].get(c) for r in rows]
        lines.append(f"| {c} | " + " | ".join("" if v is None else (f"**{v:.1f}**" if v < start[c] else f"{v:.1f}")
                                              for v in vals) + " |")
    lines.append("| mean of the cells | " + " | ".join(f"{r['mean']:.2f}" for r in rows) + " |")
    lines.append("| LFW pairs.txt folds 6-10 accuracy (%) | " +
                 " | ".join(f"{r['lfw']['mean']:.2f} ± {r['lfw']['std']:.2f}" for r in rows) + " |")
    lines += ["", "| candidate | cells below E0 | LFW >= 99.2 | eligible |", "| --- | --- | --- | --- |"]
    for r in doc["candidates"]:
        below = ", ".join(f"{k} ({v[0]:.1f} < {v[1]:.1f})" for k, v in r["below_start"].items()) or "none"
        lines.append(f"| {r['name']} (`{r['model']}`) | {below} | {'yes' if r['lfw']['mean'] >= 99.2 else 'no'} | "
                     f"{'yes' if r['eligible'] else 'no'} |")
    lines += ["", f"Choice by the rule: **{doc['choice']}**."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
