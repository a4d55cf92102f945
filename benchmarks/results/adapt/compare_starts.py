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
STARTS = {"v3": (HERE / "v3",), "v2": (HERE, HERE / "ar-sunglasses"), "prior": (HERE / "start-prior",),
          "sface": (HERE / "start-sface",)}
# starts trained for 20 steps from the prior on MFR2 + ORL by each method (same preset, data and budget)
ERM = (HERE / "start-erm", HERE / "stats-variant" / "start-erm", HERE / "stats-variant" / "adapt-start-erm",
       HERE / "mfr-cdt" / "erm-k10-k20" / "start-erm", HERE / "mfr-cdt" / "more-draws" / "start-erm")
METHODS = {"adapt-maml-fo": (HERE / "start-adapt-maml-fo",), "adapt-reptile": (HERE / "start-adapt-reptile",),
           "adapt-stats": (HERE / "stats-variant" / "start-adapt-stats", HERE / "stats-variant" / "adapt-start-adapt-stats"),
           **{m: (HERE / "mfr-cdt" / f"start-{m}", HERE / "mfr-cdt" / "more-draws" / f"start-{m}")
              for m in ("mfr", "cdt", "adapt-cdt", "adapt-mfr", "adapt-cdt-erm", "adapt-mfr-erm")}}
STATS = {"erm": (HERE / "stats-variant" / "start-erm",),
         "adapt-stats": (HERE / "stats-variant" / "start-adapt-stats",),
         "adapt-stats-proto": (HERE / "stats-variant" / "start-adapt-stats-proto",),
         "adapt-stats-proto-gamma1": (HERE / "stats-variant" / "start-adapt-stats-proto-gamma1",)}


STATS_ADAPT = {"erm": (HERE / "stats-variant" / "adapt-start-erm",),
               "adapt-stats": (HERE / "stats-variant" / "adapt-start-adapt-stats",)}


def load(folders: tuple[Path, ...]) -> dict | None:
    """The results of one start, its folders' cells together, the rows of the same draw merged (e.g. a --no-adapt
    run and an adapt run of the same start); None when no folder has results."""
    docs = [json.loads((f / "results.json").read_text(encoding="utf-8")) for f in folders
            if (f / "results.json").is_file()]
    if not docs:
        return None
    if len({d["fingerprint"] for d in docs}) > 1:
        raise SystemExit(f"the folders of one start hold different models: {[str(f) for f in folders]}")
    cells: dict = {}
    for d in docs:
        for c in d["cells"]:
            cells.setdefault((c["protocol"], c["k"], c["seed"]), {**c, "rows": {}})["rows"].update(c["rows"])
    return {**docs[0], "cells": list(cells.values())}


def table(docs: dict[str, dict]) -> list[str]:
    """TAR (%) mean ± std per (protocol, k) and start: base, statistics only, adapt."""
    cells: dict = {}
    for name, doc in docs.items():
        for r in summarise(doc):
            cells.setdefault((r["protocol"], r["k"]), {})[(name, r["row"])] = r
    lines = ["| protocol | k | start | n | base | stats-only | adapt | adapt − stats-only [95% CI] | adapt − base | "
             "adapt+stats | adapt+stats − stats-only [95% CI] |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    order = {p: i for i, p in enumerate(PROTOCOLS)}
    for (proto, k), rows in sorted(cells.items(), key=lambda c: (order.get(c[0][0], len(order)), c[0][1])):
        for name in docs:
            base = rows.get((name, "base"))
            if base is None:
                continue
            st, ad, ads = rows.get((name, "stats-only")), rows.get((name, "adapt")), rows.get((name, "adapt+stats"))

            def tar(r):
                return "" if r is None else f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}"

            lines.append(f"| {proto} | {k} | {name} | {base['n']} | {tar(base)} | {tar(st)} | {tar(ad)} | "
                         f"{fmt_diff(ad and ad['vs stats-only'], ad and ad['vs stats-only ci'])} | "
                         f"{fmt_diff(ad and ad['vs base'])} | {tar(ads)} | "
                         f"{fmt_diff(ads and ads['vs stats-only'], ads and ads['vs stats-only ci'])} |")
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
    styles = {"base": ":", "stats-only": "--", "adapt": "-", "adapt+stats": "-."}
    colours = {"v3": "C3", "v2": "C0", "prior": "C1", "sface": "C2"}
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
    seen: dict = {}
    for ax in axes[0]:  # every start and row once, whichever targets it ran on
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, h)
    fig.legend(list(seen.values()), list(seen), fontsize=7, loc="lower center", ncol=7)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def method_starts() -> list[str]:
    """Each method's 20-step start + adapt − the ERM start + adapt, paired over the same draws (k = 0: base)."""
    erm = load(ERM)
    docs = {n: d for n, f in METHODS.items() if (d := load(f)) is not None}
    if erm is None or not docs:
        return []
    diffs = {name: {(r["protocol"], r["k"]): r for r in compare_starts(erm, doc, "adapt")} for name, doc in docs.items()}
    keys = sorted({key for d in diffs.values() for key in d}, key=lambda x: (PROTOCOLS.index(x[0]), x[1]))
    lines = ["## Starts trained by each method, + adapt − the ERM start + adapt", "",
             "Every start: 20 steps from dlib's prior on MFR2 and ORL, the same preset, data and budget (`facemeta train "
             "adapt-maml-fo --method M --steps 20`, sources MFR2 + ORL); AR, Yale B and thermal are unseen by all of "
             "them. k = 0: the base models (no adaptation; every draw scores the same people, so the difference is exact). In each cell: the paired difference in points, mean ± std "
             "[95% t interval] (n draws); **bold** where the interval is clear of zero.", "",
             "| protocol | k | " + " | ".join(docs) + " |", "| --- | --- | " + " | ".join("---" for _ in docs) + " |"]
    for proto, k in keys:
        cells = []
        for name in docs:
            r = diffs[name].get((proto, k))
            if r is None:
                cells.append("")
                continue
            if k == 0:  # the base models: the same people in every draw, an exact difference
                cells.append(f"{100 * r['mean']:+.1f}")
                continue
            text = f"{fmt_diff((r['mean'], r['std']), r['ci'])} ({r['n']})"
            clear = r["ci"] is not None and (r["ci"][0] > 0 or r["ci"][1] < 0)
            cells.append(f"**{text}**" if clear else text)
        lines.append(f"| {proto} | {k} | " + " | ".join(cells) + " |")
    return lines + [""]


def main() -> None:
    """Write starts.md (and curves.png) from whatever results the folders hold."""
    docs = {n: d for n, f in STARTS.items() if (d := load(f)) is not None}
    out = ["# Starts compared (paired over the same draws of people)", "",
           "TAR at FAR=1e-2 (%) of every enrolment-vs-target pair among the people who did not adapt the model; mean ± "
           "std over draws; differences in points, mean ± std [95% t interval] over draws. Starts: `v3` (the shipped "
           "model v3, fingerprint 2eed910b51e210c6: the ensemble of dlib's prior and SFace, both zero-shot, adapted "
           "member by member: the dlib member's last 4 blocks and embedding layer, SFace's embedding head), `v2` (the "
           "shipped model v2, fingerprint 4e4b8b24732e7798: dlib's prior fine-tuned on LFW, Yale B and MFR2), `prior` "
           "(dlib's encoder zero-shot: `facemeta train prior --steps 0`), `sface` (SFace zero-shot: `facemeta train "
           "sface --steps 0`; adapt trains its embedding head only). `adapt+stats` (v3 only, `--with-stats`): adapt "
           "with the target's mean removed in the loss, then each condition centred.", "", *table(docs), ""]
    pairs = [("v2", "prior"), ("v2", "sface"), ("sface", "v3"), ("v2", "v3")]
    for ref, other in pairs:
        if ref in docs and other in docs:
            out += [f"## {other} + adapt − {ref} + adapt (k = 0: the base models)", "",
                    *paired(docs[ref], docs[other], "adapt", f"{other} − {ref}"), ""]
    out += method_starts()
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
