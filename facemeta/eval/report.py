"""Reports: ROC curves as PNG (log-scale FAR) and Markdown tables of mean ± std with the best in bold."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from facemeta.atomic import atomic_write


def plot_roc(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | os.PathLike,
             title: str = "ROC", far_min: float | None = None,
             marks: Iterable[float] = (1e-3, 1e-2)) -> Path:
    """Plot TAR against FAR (log axis) for each named curve and write a PNG atomically; returns the path.

    Points at FAR 0 cannot sit on a log axis and are dropped; `far_min` sets the left edge (default:
    the smallest positive FAR of all curves). Dotted verticals mark the FARs in `marks`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        raise ValueError("no curves to plot")
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    lows = []
    try:
        for name, (far, tar) in curves.items():
            far, tar = np.asarray(far, dtype=float), np.asarray(tar, dtype=float)
            keep = far > 0
            if keep.any():
                lows.append(far[keep].min())
            ax.step(far[keep], tar[keep], where="post", label=str(name), linewidth=1.4)
        left = far_min or (min(lows) if lows else 1e-4)
        ax.set_xscale("log")
        ax.set_xlim(left, 1.0)
        ax.set_ylim(0.0, 1.01)
        for m in marks:
            if m >= left:
                ax.axvline(m, color="grey", linestyle=":", linewidth=0.8)
        ax.set_xlabel("false accept rate (FAR)")
        ax.set_ylabel("true accept rate (TAR)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    path = Path(path)
    with atomic_write(path, "wb") as fh:
        fh.write(buf.getvalue())
    return path


def _stats(value) -> tuple[float, float | None, int] | None:
    """(mean, std or None, n) of a number or a sequence of numbers (e.g. one per seed); None if empty."""
    if value is None:
        return None
    if isinstance(value, (int, float, np.floating, np.integer)):
        v = float(value)
        return None if math.isnan(v) else (v, None, 1)
    vals = np.asarray([float(v) for v in value if v is not None], dtype=float)
    vals = vals[~np.isnan(vals)]
    if vals.size == 0:
        return None
    return float(vals.mean()), (float(vals.std(ddof=1)) if vals.size > 1 else None), int(vals.size)


def markdown_table(results: Mapping[str, Mapping[str, object]], columns: Sequence[str] | None = None,
                   headers: Mapping[str, str] | None = None, scale: Mapping[str, float] | None = None,
                   digits: int | Mapping[str, int] = 2, lower_is_better: Iterable[str] = (),
                   row_header: str = "method", bold_best: bool = True) -> str:
    """A Markdown table: one row per entry of `results`, one column per metric.

    A cell holds a number or a list of numbers (one per seed), shown as ``mean ± std`` (sample std,
    ddof=1). `scale` multiplies a column (e.g. 100 for percentages); the best mean of each column is
    bold (ties all bold; `lower_is_better` flips the order). Missing values show as an em dash.
    """
    columns = list(columns) if columns is not None else \
        list(dict.fromkeys(k for r in results.values() for k in r))
    headers = dict(headers or {})
    scale = dict(scale or {})
    lower = set(lower_is_better)
    stats = {name: {c: _stats(r.get(c)) for c in columns} for name, r in results.items()}
    best: dict[str, float] = {}
    for c in columns:
        means = [s[c][0] * scale.get(c, 1.0) for s in stats.values() if s[c] is not None]
        if means and len(stats) > 1:
            best[c] = min(means) if c in lower else max(means)
    lines = ["| " + " | ".join([row_header] + [headers.get(c, c) for c in columns]) + " |",
             "| " + " | ".join(["---"] * (len(columns) + 1)) + " |"]
    for name, st in stats.items():
        cells = [str(name)]
        for c in columns:
            s = st[c]
            if s is None:
                cells.append("—")
                continue
            k = scale.get(c, 1.0)
            d = digits if isinstance(digits, int) else digits.get(c, 2)
            mean, std, _ = s
            text = f"{mean * k:.{d}f}" + (f" ± {std * k:.{d}f}" if std is not None else "")
            if bold_best and c in best and round(mean * k, d) == round(best[c], d):
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
