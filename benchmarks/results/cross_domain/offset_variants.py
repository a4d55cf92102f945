"""Per-domain rules (no pairing) tried before choosing `offset` (issue 25): the cross-domain benchmark's protocols,
draws and cached vectors, 10 unlabelled photos per domain, each variant read against the acceptance goals.

    python benchmarks/results/cross_domain/offset_variants.py    # writes offset_variants.md beside it

Variants of v' = v - s (mean - source mean) - c x source mean, renormalised, s = top x gate(z) x reliability:
`top` the largest strength, `c` a share of the common source mean removed from every named domain's vectors, the
gate's z window, and `k`, how many times the estimate's own noise (spread / n) is discounted in z and in the
reliability (1 in domain_stats). Numpy on the benchmark's cache (embeds nothing new once the benchmark has run).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

import facemeta.experiments.cross_domain as cd
from facemeta.experiments.cross_domain_report import goals
from facemeta.gallery.domain_stats import estimate, offset_stats, shift

VARIANTS = {}
for _top in (1.0, 0.75, 0.5):
    for _c in (0.0, 0.3, 0.5):
        VARIANTS[f"top {_top:g}, c {_c:g}, z 0.15-0.25, k 1"] = (_top, _c, 0.15, 0.25, 1)
VARIANTS["top 1, c 1, z 0.15-0.25, k 1"] = (1.0, 1.0, 0.15, 0.25, 1)
for _top in (0.5, 0.6, 0.75):
    for _k in (1, 2, 3):
        for _zl, _zh in ((0.1, 0.3), (0.2, 0.3), (0.2, 0.4)):
            VARIANTS[f"top {_top:g}, c 0, z {_zl:g}-{_zh:g}, k {_k}"] = (_top, 0.0, _zl, _zh, _k)
_REF: dict = {}


def make_stats(statistic: str, pools: dict, source: np.ndarray) -> dict:
    """The variant's statistics of each domain."""
    top, c, zl, zh, k = VARIANTS[statistic]
    ref = _REF.setdefault(id(source), estimate(source))
    out = {}
    for d, v in pools.items():
        st = offset_stats(v, ref, top, c)
        s = shift(st, ref)
        z = (s["distance2"] - k * s["noise"]) / s["spread"]
        gate = float(np.clip((z - zl) / (zh - zl), 0.0, 1.0))
        rel = max(0.0, 1 - k * s["noise"] / s["distance2"]) if s["distance2"] > 0 else 0.0
        out[d] = replace(st, strength=top * gate * rel)
    return out


def main() -> None:
    """Score every variant and write the table of misses."""
    cd.make_stats = make_stats
    res = cd.run_benchmark(("shipped", "prior"), ("mfr2", "yaleb", "ar", "thermal", "lfw", "orl"), tuple(VARIANTS),
                           (0, 10), cd.DRAWS, progress=False)
    lines = ["# Per-domain rules tried (10 unlabelled photos per domain)", "",
             "`python benchmarks/results/cross_domain/offset_variants.py`; see its docstring. A miss: a goal of "
             "issue 25 not met (Δ TAR@FAR=1e-2 against raw, points; the goals as in results.md, where `mean` "
             "gains 5 on AR sunglasses and no statistic does elsewhere).", "",
             "| variant | misses | shipped misses | prior misses |", "| --- | ---: | --- | --- |"]
    rows = []
    for name in VARIANTS:
        miss = {m: [f"{g['protocol'].split(' ')[0]} {g['probe']} {g['delta']:+.1f}"
                    for g in _goals(res, m, name) if not g["met"]] for m in ("shipped", "prior")}
        rows.append((len(miss["shipped"]) + len(miss["prior"]), name, miss))
    for n, name, miss in sorted(rows, key=lambda r: (r[0], len(r[2]["shipped"]))):
        lines.append(f"| {name} | {n} | {'; '.join(miss['shipped']) or '-'} | {'; '.join(miss['prior']) or '-'} |")
    out = Path(__file__).with_name("offset_variants.md")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(out.read_text(encoding="utf-8"))


def _goals(res: dict, model: str, rule: str) -> list[dict]:
    """goals() with the best statistic taken from the benchmark's own table (mean gains 5 on AR sunglasses)."""
    found = goals(res, model, rule)
    for g in found:
        if g["protocol"].startswith("AR") and g["probe"] == "sunglasses":
            g["met"] = g["delta"] >= 5.0
        elif g["kind"] == "cross":
            g["met"] = g["delta"] >= -0.5
    return found


if __name__ == "__main__":
    main()
