"""The benchmark's summary: results.md (mean ± std per target and metric, best in bold, the goal metric and
the verdicts against ERM and the zero-shot starting weights), results.json and a ROC plot per target."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from facemeta.experiments.presets import ZERO_SHOT, BenchPreset

METRICS = ("tar@far=1e-2", "tar@far=1e-3", "auc", "rank1")
ROC_GRID = np.logspace(-5, 0, 101)
GOAL = "mean TAR@FAR=1e-2 over targets"


def mean_roc(curves: list[dict[str, list[float]]]) -> tuple[np.ndarray, np.ndarray]:
    """Seeds' ROC curves averaged on a log-spaced FAR grid (step interpolation)."""
    tars = []
    for c in curves:
        far, tar = np.asarray(c["far"]), np.asarray(c["tar"])
        idx = np.searchsorted(far, ROC_GRID, side="right") - 1
        tars.append(np.where(idx >= 0, tar[np.clip(idx, 0, None)], 0.0))
    return ROC_GRID, np.mean(tars, axis=0)


def write_summary(preset: BenchPreset, results: list[dict[str, Any]], out_dir: Path) -> dict[str, Any]:
    """results.md (mean ± std per target and metric, best in bold), results.json and roc-<target>.png."""
    from facemeta.atomic import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(r["method"] for r in results))
    targets = list(dict.fromkeys(r["target"] for r in results))
    lines = [f"# Unseen-domain benchmark: preset `{preset.name}`", "",
             "Leave one domain out (DESIGN.md): train on LFW people.txt folds 1-5 + the other two of "
             "{yaleb, orl, mfr2}; test on all of the left-out target (all pairs) and LFW pairs.txt folds 6-10. "
             f"Mean ± sample std over seeds {sorted({r['seed'] for r in results})}; best mean per column in bold. "
             "Every method: same backbone, data, augmentation, steps and images per step.", ""]
    table = {}
    for t in targets:
        table[t], target_lines = _target_section(t, methods, results, out_dir)
        lines += target_lines
    goal = _goal(methods, targets, results)
    lines += _goal_lines(goal, methods) + _teacher_lines(methods, targets, results)
    summary = {"preset": preset.name, "train_preset": preset.train, "overrides": preset.overrides,
               "sources": preset.sources, "runs": [{k: v for k, v in r.items() if k != "metrics"} |
                                                   {"metrics": _strip_roc(r["metrics"])} for r in results],
               "table": table, "goal": goal}
    with atomic_write(out_dir / "results.json") as fh:
        json.dump(summary, fh, indent=1)
    with atomic_write(out_dir / "results.md") as fh:
        fh.write("\n".join(lines))
    return summary


def _target_section(t: str, methods: list[str], results: list[dict[str, Any]], out_dir: Path
                    ) -> tuple[dict[str, dict[str, list[float]]], list[str]]:
    """One target's table (per method, every metric of the target, MFR2's pairs and LFW) and its ROC plot."""
    from facemeta.eval.report import markdown_table, plot_roc

    rows: dict[str, dict[str, list[float]]] = {}
    sets = [t] + (["mfr2-pairs"] if t == "mfr2" else []) + ["lfw"]
    curves: dict[str, tuple] = {}
    no_roc: list[str] = []
    for m in methods:
        runs = [r for r in results if r["target"] == t and r["method"] == m]
        cells: dict[str, list[float]] = {}
        for s in sets:
            for k in list(METRICS) + (["acc"] if s != t else []):
                cells[f"{s} {k}"] = [r["metrics"][s].get(k) for r in runs if s in r["metrics"]]
        rows[m] = cells
        if runs and all("roc" in r["metrics"][t] for r in runs):
            curves[m] = mean_roc([r["metrics"][t]["roc"] for r in runs])
        elif runs:  # e.g. a result.json rebuilt from a results.json, which keeps no ROC points
            no_roc.append(m)
    cols = list(next(iter(rows.values())))
    lines = [f"## Target {t}", "", markdown_table(rows, columns=cols, digits=3), ""]
    if curves:
        plot_roc(curves, out_dir / f"roc-{t}.png", title=f"unseen target {t} (mean over seeds)", far_min=1e-5)
        lines += [f"![ROC {t}](roc-{t}.png)", ""]
    if no_roc:
        lines += [f"ROC curve not drawn for {', '.join(no_roc)}: some of its runs carry no ROC points.", ""]
    return rows, lines


def _goal(methods: list[str], targets: list[str], results: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """The goal metric: mean TAR@FAR=1e-2 over the unseen targets, per seed (seeds with every target only)."""
    per_seed: dict[str, dict[int, list[float]]] = {m: {} for m in methods}
    for r in results:
        if r["target"] in targets:
            per_seed[r["method"]].setdefault(r["seed"], []).append(r["metrics"][r["target"]]["tar@far=1e-2"])
    return {m: {GOAL: [float(np.mean(v)) for _, v in sorted(per_seed[m].items()) if len(v) == len(targets)]}
            for m in methods}


def _goal_lines(goal: dict[str, dict[str, list[float]]], methods: list[str]) -> list[str]:
    """The goal table and, per method, whether it beats ERM by more than the spread over seeds."""
    from facemeta.eval.report import markdown_table

    lines = ["## Mean over the unseen targets", "", markdown_table(goal, digits=3), ""]
    if "erm" not in goal:
        return lines
    base = goal["erm"][GOAL]
    for m in methods:
        vals = goal[m][GOAL]
        if m in ("erm", ZERO_SHOT) or not vals or not base:
            continue
        diff = float(np.mean(vals) - np.mean(base))
        spread = max(float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                     float(np.std(base, ddof=1)) if len(base) > 1 else 0.0)
        if len(vals) < 2 or len(base) < 2:
            verdict = "one seed only: no spread over seeds to judge by"
        elif diff > spread:
            verdict = "beats ERM by more than the spread over seeds"
        else:
            verdict = "does NOT beat ERM by more than the spread over seeds"
        lines.append(f"- {m}: {diff:+.3f} vs ERM (spread {spread:.3f}): {verdict}.")
    return lines + [""]


def _teacher_lines(methods: list[str], targets: list[str], results: list[dict[str, Any]]) -> list[str]:
    """Each method against the zero-shot starting weights, TAR@FAR=1e-2 per target (when that row ran)."""
    if ZERO_SHOT not in methods:
        return []
    lines = [f"Against the zero-shot starting weights (`{ZERO_SHOT}`), TAR@FAR=1e-2 per target "
             "(mean over seeds):", ""]
    for m in methods:
        if m == ZERO_SHOT:
            continue
        parts, below = [], []
        for t in targets:
            mine = [r["metrics"][t]["tar@far=1e-2"] for r in results if r["target"] == t and r["method"] == m]
            ref = [r["metrics"][t]["tar@far=1e-2"] for r in results if r["target"] == t and r["method"] == ZERO_SHOT]
            if mine and ref:
                diff = float(np.mean(mine) - np.mean(ref))
                parts.append(f"{t} {diff:+.3f}")
                if diff < 0:
                    below.append(t)
        verdict = f"below the teacher on {', '.join(below)}" if below else "not below the teacher on any target"
        lines.append(f"- {m}: {', '.join(parts)}: {verdict}.")
    return lines + [""]


def _strip_roc(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics without the ROC point lists (they go into the PNGs; keeps results.json small)."""
    return {s: {k: v for k, v in d.items() if k != "roc"} for s, d in metrics.items()}
