"""Compare the starts of `facemeta benchmark adapt` run into separate folders, paired over the same draws of
people (a draw depends only on the seed, k and the people of the protocol): writes starts.md beside this file.

    python benchmarks/results/adapt/compare_starts.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from facemeta.experiments.adapt_bench import PROTOCOLS, compare_starts, fmt_diff, summarise

HERE = Path(__file__).resolve().parent
STARTS = {"shipped": (HERE, HERE / "ar-sunglasses"), "prior": (HERE / "start-prior",),
          "sface": (HERE / "start-sface",)}
STATS = {"erm": (HERE / "stats-variant" / "start-erm",),
         "adapt-stats": (HERE / "stats-variant" / "start-adapt-stats",),
         "adapt-stats-proto": (HERE / "stats-variant" / "start-adapt-stats-proto",),
         "adapt-stats-proto-gamma1": (HERE / "stats-variant" / "start-adapt-stats-proto-gamma1",)}


STATS_ADAPT = {"erm": (HERE / "stats-variant" / "adapt-start-erm",),
               "adapt-stats": (HERE / "stats-variant" / "adapt-start-adapt-stats",)}


def load(folders: tuple[Path, ...]) -> dict | None:
    """The results of one start, its folders' cells together (None when none has results)."""
    docs = [json.loads((f / "results.json").read_text(encoding="utf-8")) for f in folders
            if (f / "results.json").is_file()]
    if not docs:
        return None
    return {**docs[0], "cells": [c for d in docs for c in d["cells"]]}


def table(docs: dict[str, dict]) -> list[str]:
    """TAR (%) mean ± std per (protocol, k) and start: base, statistics only, adapt."""
    cells: dict = {}
    for name, doc in docs.items():
        for r in summarise(doc):
            cells.setdefault((r["protocol"], r["k"]), {})[(name, r["row"])] = r
    lines = ["| protocol | k | start | n | base | stats-only | adapt | adapt − stats-only [95% CI] | adapt − base |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    order = {p: i for i, p in enumerate(PROTOCOLS)}
    for (proto, k), rows in sorted(cells.items(), key=lambda c: (order.get(c[0][0], len(order)), c[0][1])):
        for name in docs:
            base = rows.get((name, "base"))
            if base is None:
                continue
            st, ad = rows.get((name, "stats-only")), rows.get((name, "adapt"))

            def tar(r):
                return "" if r is None else f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}"

            lines.append(f"| {proto} | {k} | {name} | {base['n']} | {tar(base)} | {tar(st)} | {tar(ad)} | "
                         f"{fmt_diff(ad and ad['vs stats-only'], ad and ad['vs stats-only ci'])} | "
                         f"{fmt_diff(ad and ad['vs base'])} |")
    return lines


def paired(a: dict, b: dict, row: str, label: str) -> list[str]:
    lines = [f"| protocol | k | n | {label} [95% CI] |", "| --- | --- | --- | --- |"]
    for r in compare_starts(a, b, row):
        lines.append(f"| {r['protocol']} | {r['k']} | {r['n']} | {fmt_diff((r['mean'], r['std']), r['ci'])} |")
    return lines


def curves(docs: dict[str, dict], path: Path) -> None:
    """curves.png: TAR against k per target, for each start's base, statistics only and adapt (mean ± std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for name, doc in docs.items() for r in summarise(doc) for r in [{**r, "start": name}]]
    targets = [p for p in PROTOCOLS if any(r["protocol"] == p for r in rows)]
    fig, axes = plt.subplots(1, len(targets), figsize=(3.2 * len(targets), 3.2), squeeze=False)
    styles = {"base": ":", "stats-only": "--", "adapt": "-"}
    colours = {"shipped": "C0", "prior": "C1", "sface": "C2"}
    for ax, target in zip(axes[0], targets, strict=True):
        for name in docs:
            for row, style in styles.items():
                pts = sorted((r["k"], r["mean"], r["std"]) for r in rows if r["start"] == name
                             and r["protocol"] == target and (r["row"] == row or (r["k"] == 0 and row == "adapt"
                                                                                   and r["row"] == "base")))
                if len(pts) < 2:
                    continue
                k, m, sd = (np.array(v) for v in zip(*pts, strict=True))
                ax.errorbar(k, 100 * m, yerr=100 * sd, linestyle=style, color=colours.get(name), marker="o",
                            markersize=3, capsize=2, label=f"{name} {row}")
        ax.set_title(target, fontsize=9)
        ax.set_xlabel("labelled people k")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("TAR@FAR=1e-2 on the other people (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=6)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Write starts.md (and curves.png) from whatever results the folders hold."""
    docs = {n: d for n, f in STARTS.items() if (d := load(f)) is not None}
    out = ["# Starts compared (paired over the same draws of people)", "",
           "TAR at FAR=1e-2 (%) of every enrolment-vs-target pair among the people who did not adapt the model; mean ± "
           "std over draws; differences in points, mean ± std [95% t interval] over draws. Starts: `shipped` (the "
           "shipped model v2, fingerprint 4e4b8b24732e7798), `prior` (dlib's encoder zero-shot: `facemeta train "
           "prior --steps 0`), `sface` (SFace zero-shot: `facemeta train sface --steps 0`; adapt trains its embedding "
           "head only).", "", *table(docs), ""]
    if "shipped" in docs:
        for other in ("prior", "sface"):
            if other in docs:
                out += [f"## {other} + adapt − shipped + adapt (k = 0: the base models)", "",
                        *paired(docs["shipped"], docs[other], "adapt", f"{other} − shipped"), ""]
    stats = {n: d for n, f in STATS.items() if (d := load(f)) is not None}
    if "erm" in stats and len(stats) > 1:
        out += ["## The statistics variant: statistics only from adapt-stats starts − from the ERM start", "",
                "Every start: 20 steps from the prior on MFR2 and ORL (same preset, data and budget; AR, Yale B and "
                "thermal never seen); scored with `--no-adapt` (base model and statistics only). `adapt-stats`: "
                "ERM's head and loss on every raw embedding (weight meta.gamma 0.5) plus on the outer people's "
                "embeddings centred by their domain's few-photo mean (0.5). `adapt-stats-proto`, the first form: "
                "adapt's prototype CosFace (s 30, m 0.2) instead of the head, 0.5 raw + 0.5 centred; "
                "`adapt-stats-proto-gamma1`: that loss on the raw embeddings only (no centring: the ablation that "
                "separates the centring from the loss itself).", "", *table(stats), ""]
        for name in stats:
            if name != "erm":
                out += [f"Paired, statistics only (k = 0: base models), {name} − erm:", "",
                        *paired(stats["erm"], stats[name], "stats-only", f"{name} − erm"), ""]
    labelled = {n: d for n, f in STATS_ADAPT.items() if (d := load(f)) is not None}
    if len(labelled) == 2:
        out += ["## The same two starts with labelled adaptation (adapt's defaults)", "", *table(labelled), "",
                "Paired, adapt, adapt-stats start − ERM start:", "",
                *paired(labelled["erm"], labelled["adapt-stats"], "adapt", "adapt-stats − erm"), ""]
    (HERE / "starts.md").write_text("\n".join(out) + "\n", encoding="utf-8")
    curves(docs, HERE / "curves.png")
    print("\n".join(out))


if __name__ == "__main__":
    main()
