"""Each start in this folder against the ERM start, paired over the same draws of people (issue 26, item 3).

The ERM start's cells: ../stats-variant/start-erm (k = 0, the base model), ../stats-variant/adapt-start-erm
(k = 2, 5, adapt's defaults) and erm-k10-k20/start-erm (k = 10, 20, run here with the same model and settings);
facemeta.experiments.adapt_bench.compare_starts pairs the cells (protocol, k, seed) both documents hold (k = 0
compares the base row, k > 0 the adapt row). Writes comparison.md beside this file: run
`python benchmarks/results/adapt/mfr-cdt/compare.py` from the repository root.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from facemeta.experiments.adapt_bench import compare_starts, fmt_diff, interval

HERE = Path(__file__).resolve().parent
ERM = [HERE.parent / "stats-variant" / "start-erm" / "results.json",
       HERE.parent / "stats-variant" / "adapt-start-erm" / "results.json"]
STARTS = ("mfr", "cdt", "adapt-cdt", "adapt-mfr", "adapt-cdt-erm", "adapt-mfr-erm")
TARGETS = ("yaleb-side", "thermal", "ar-scarf")
KS = (0, 2, 5, 10, 20)


def erm_document() -> dict:
    """The ERM start's documents as one: k = 0 cells from start-erm, k = 2, 5 from adapt-start-erm, k = 10, 20
    from erm-k10-k20/start-erm."""
    base, adapted = (json.loads(p.read_text(encoding="utf-8")) for p in ERM)
    cells = [c for c in base["cells"] if c["k"] == 0] + [c for c in adapted["cells"] if c["k"] > 0]
    k10 = HERE / "erm-k10-k20" / "start-erm" / "results.json"
    if k10.is_file():
        cells += [c for c in json.loads(k10.read_text(encoding="utf-8"))["cells"] if c["k"] in (10, 20)]
    return {**adapted, "cells": cells}


def tar(doc: dict, proto: str, k: int, seeds: set | None = None) -> list[float]:
    """TAR of the compared row (k = 0: base, else adapt) over the draws of (proto, k) in doc."""
    row = "adapt" if k else "base"
    return [c["rows"][row]["tar"] for c in doc["cells"] if c["protocol"] == proto and c["k"] == k
            and row in c["rows"] and (seeds is None or c["seed"] in seeds)]


def gain(doc: dict, proto: str, k: int, seeds: set) -> str:
    """adapt − base over the draws of (proto, k), as text ("not run" when there is none)."""
    d = [c["rows"]["adapt"]["tar"] - c["rows"]["base"]["tar"] for c in doc["cells"] if c["protocol"] == proto
         and c["k"] == k and c["seed"] in seeds and "adapt" in c["rows"]]
    return fmt_diff((float(np.mean(d)), float(np.std(d))), interval(d)) if d else "not run"


def more_draws(erm: dict) -> list[str]:
    """The follow-up of the one cell where a start's mean was above ERM's (adapt-mfr-erm, thermal): draws 3-9 of
    both starts in more-draws/, pooled with draws 0-2 -> table lines (start − ERM and each start's gain)."""
    folder = HERE / "more-draws"
    paths = [folder / "start-erm" / "results.json", folder / "start-adapt-mfr-erm" / "results.json"]
    if not all(p.is_file() for p in paths):
        return []
    extra = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    first = json.loads((HERE / "start-adapt-mfr-erm" / "results.json").read_text(encoding="utf-8"))
    pooled = [{**doc, "cells": [c for c in [*doc["cells"], *more["cells"]] if c["protocol"] == "thermal"]}
              for doc, more in ((erm, extra[0]), (first, extra[1]))]
    seeds = {c["seed"] for c in pooled[1]["cells"]}
    lines = ["", f"Thermal, draws {min(seeds)}-{max(seeds)} (more-draws/ pooled with draws 0-2): adapt-mfr-erm − ERM, "
             "and each start's adapt − its own base:", "",
             "| k | n | adapt-mfr-erm − ERM | ERM gain | adapt-mfr-erm gain |", "| --- | --- | --- | --- | --- |"]
    for d in compare_starts(*pooled):
        if d["k"] in (2, 5):
            gains = [gain(doc, "thermal", d["k"], seeds) for doc in pooled]
            lines.append(f"| {d['k']} | {d['n']} | {fmt_diff((d['mean'], d['std']), d['ci'])} | {gains[0]} | {gains[1]} |")
    return lines


def main() -> None:
    """Write comparison.md: TAR per start (mean ± std over draws) and each start − ERM (paired, 95% CI)."""
    erm = erm_document()
    docs = {m: json.loads((HERE / f"start-{m}" / "results.json").read_text(encoding="utf-8"))
            for m in STARTS if (HERE / f"start-{m}" / "results.json").is_file()}
    lines = ["# Starts trained with MFR, CDT, adapt-cdt, adapt-mfr against the ERM start (TAR@FAR=1e-2, %)", "",
             "k = 0: the start itself (base row); k = 2-20: adapt's defaults from the start on k labelled people of "
             "the target, scored on its other people. Draws 0-2 (the ERM start's Yale B cells also hold draws 3-4, "
             "left out of the pairing). Start − ERM: paired over the same draws, mean ± std [95% t interval]; "
             "bold where the interval lies above zero (a start that beats ERM by more than the spread).", "",
             "| target | k | ERM | " + " | ".join(docs) + " |", "| --- | --- | --- | " + " | ".join("---" for _ in docs)
             + " |"]
    for proto in TARGETS:
        for k in KS:
            ref = tar(erm, proto, k, {0, 1, 2})
            cells = [f"{100 * np.mean(ref):.1f} ± {100 * np.std(ref):.1f}" if ref else ""]
            for doc in docs.values():
                got = tar(doc, proto, k)
                cells.append(f"{100 * np.mean(got):.1f} ± {100 * np.std(got):.1f}" if got else "not run")
            lines.append(f"| {proto} | {k} | " + " | ".join(cells) + " |")
    lines += ["", "| target | k | " + " − ERM | ".join(docs) + " − ERM |",
              "| --- | --- | " + " | ".join("---" for _ in docs) + " |"]
    diffs = {m: {(d["protocol"], d["k"]): d for d in compare_starts(erm, doc)} for m, doc in docs.items()}
    for proto in TARGETS:
        for k in KS:
            cells = []
            for m in docs:
                d = diffs[m].get((proto, k))
                if d is None:
                    cells.append("not run")
                    continue
                text = fmt_diff((d["mean"], d["std"]), d["ci"]) + f" (n {d['n']})"
                cells.append(f"**{text}**" if d["ci"] and d["ci"][0] > 0 else text)
            lines.append(f"| {proto} | {k} | " + " | ".join(cells) + " |")
    lines += ["", "Adapt − its own start (the base row of the same draw), points, mean ± std [95% t interval]:", "",
              "| target | k | ERM | " + " | ".join(docs) + " |", "| --- | --- | --- | " + " | ".join("---" for _ in docs)
              + " |"]
    for proto in TARGETS:
        for k in KS[1:]:
            cells = [gain(doc, proto, k, {0, 1, 2}) for doc in (erm, *docs.values())]
            lines.append(f"| {proto} | {k} | " + " | ".join(cells) + " |")
    lines += more_draws(erm)
    (HERE / "comparison.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
