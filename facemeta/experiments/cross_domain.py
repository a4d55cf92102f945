"""The cross-domain benchmark of issue 25: does a domain's statistics, estimated from unlabelled photos of other
people of that domain, help matching across domains, and at what cost where the shift is small?

For each protocol of :mod:`facemeta.experiments.cross_domain_protocols` and each draw, the people of the set are
split in halves at random: one half is scored, the other half's photos are the unlabelled pool. From each domain's
pool ``count`` photos are drawn (0 = raw, or all of them), the statistic is estimated on their vectors
(:mod:`facemeta.gallery.domain_stats`), every scored vector is normalised by its own domain's statistics, and the
enrolled domain is matched against each probe domain: TAR at FAR 1e-2 and 1e-3 over every enrolled x probe pair,
rank-1 (each probe against every enrolled photo). LFW's control scores its pairs.txt folds 6-10 and takes its
unlabelled photos from people.txt folds 1-5. Thermal adds the open-set false-accept rate: never-enrolled people's
probes accepted at the threshold calibrated at FAR 1e-2 on the enrolled people's impostor pairs (normalised the
same way).

Vectors come from :mod:`facemeta.experiments.cross_domain_embed` (each image embedded once per model, cached);
everything here is numpy.
"""

from __future__ import annotations

import json
import time
import zlib
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from facemeta.experiments.cross_domain_protocols import Protocol

STATISTICS = ("mean", "coral-diag", "auto", "auto-pair", "offset")
COUNTS = (0, 5, 10, 20, 50, -1)  # unlabelled photos per domain; -1: every photo of the pool
DRAWS = 5
FARS = (1e-2, 1e-3)
OPEN_SET_FAR = 1e-2
METRICS = ("tar@far=1e-2", "tar@far=1e-3", "rank-1")


def _seed(*parts) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode())


def pick(pool: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` indices drawn without replacement from `pool` (all of it when count < 0 or exceeds it)."""
    if count < 0 or count >= len(pool):
        return pool
    return rng.choice(pool, size=count, replace=False)


def make_stats(statistic: str, pool_vectors: dict[str, np.ndarray], source: np.ndarray | None):
    """{domain: DomainStats} for one cell from each domain's unlabelled vectors; `source` (the model's source
    photos, unlabelled) is the reference of the 'auto' rule. 'auto-pair' gives both domains of a comparison the
    smaller of their 'auto' strengths (domain_stats.pair_strength). 'offset' (the gallery's rule) moves each
    domain on its own towards the source statistics (domain_stats.offset_stats): no pairing."""
    from facemeta.gallery.domain_stats import auto_stats, estimate, offset_stats, pair_strength, with_strength

    if statistic == "offset":
        ref = estimate(source)
        return {d: offset_stats(v, ref) for d, v in pool_vectors.items()}
    if statistic in ("auto", "auto-pair"):
        stats = {d: auto_stats(v, source) for d, v in pool_vectors.items()}
        if statistic == "auto-pair" and len(stats) == 2:
            low = pair_strength(*stats.values())
            stats = {d: with_strength(st, low) for d, st in stats.items()}
        return stats
    return {d: estimate(v, statistic) for d, v in pool_vectors.items()}


def tar_figures(scores: np.ndarray, same: np.ndarray) -> dict[str, float]:
    """TAR (%) at each FAR of FARS."""
    from facemeta.eval.metrics import tar_at_far

    return {f"tar@far={far:.0e}".replace("e-0", "e-"): 100 * tar_at_far(scores, same, far) for far in FARS}


def score_cross(gal: np.ndarray, gal_ids: np.ndarray, probe: np.ndarray, probe_ids: np.ndarray) -> dict[str, float]:
    """Every enrolled x probe pair (TAR) and each probe's best enrolled photo (rank-1, %)."""
    sims = probe @ gal.T
    same = probe_ids[:, None] == gal_ids[None, :]
    out = tar_figures(sims.ravel(), same.ravel())
    out["rank-1"] = 100 * float(np.mean(gal_ids[sims.argmax(axis=1)] == probe_ids))
    return out


def score_all_pairs(vectors: np.ndarray, ids: np.ndarray) -> dict[str, float]:
    """In-domain control: every pair of the scored images (TAR); rank-1 with each person's first image enrolled."""
    iu, ju = np.triu_indices(len(vectors), k=1)
    sims = np.einsum("ij,ij->i", vectors[iu], vectors[ju])
    out = tar_figures(sims, ids[iu] == ids[ju])
    first = np.zeros(len(ids), bool)
    _, where = np.unique(ids, return_index=True)
    first[where] = True
    gal, probe = vectors[first], vectors[~first]
    out["rank-1"] = 100 * float(np.mean(ids[first][(probe @ gal.T).argmax(axis=1)] == ids[~first]))
    return out


def open_set_far(gal: np.ndarray, gal_ids: np.ndarray, probe: np.ndarray, probe_ids: np.ndarray,
                 strangers: np.ndarray) -> float:
    """Share (%) of never-enrolled probes whose best enrolled score passes the threshold calibrated at
    OPEN_SET_FAR on the enrolled people's impostor pairs."""
    from facemeta.eval.metrics import threshold_at_far

    sims = probe @ gal.T
    same = probe_ids[:, None] == gal_ids[None, :]
    thr = threshold_at_far(sims.ravel(), same.ravel(), OPEN_SET_FAR)
    return 100 * float(np.mean((strangers @ gal.T).max(axis=1) >= thr))


def split(proto: Protocol, ids: np.ndarray, draw: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw `draw` of a protocol -> (scored rows, rows of the unlabelled pool): a random half of the enrolled
    people is scored, the pool holds the other half's photos (never a scored person's, never a never-enrolled
    probe's). LFW scores its fixed pairs: every row is scored and the pool is empty (its unlabelled photos are
    the source photos of people.txt folds 1-5)."""
    rng = np.random.default_rng(_seed(proto.name, draw))
    people = np.unique(ids[proto.gallery])
    chosen = set(rng.permutation(people)[: len(people) // 2])
    scored = np.array([i in chosen for i in ids])
    if proto.set == "lfw":
        scored[:] = True
    other = ~scored & ~(proto.open_set if proto.open_set is not None else np.zeros(len(ids), bool))
    return scored, other


def _normalise(vectors: np.ndarray, stats) -> np.ndarray:
    from facemeta.gallery.domain_stats import normalise

    return vectors if stats is None else normalise(vectors, stats)


def run_protocol(proto: Protocol, vectors: np.ndarray, ids: np.ndarray, source: np.ndarray | None,
                 statistics: tuple[str, ...] = STATISTICS, counts: tuple[int, ...] = COUNTS, draws: int = DRAWS,
                 on_cell: Callable[[dict], None] | None = None) -> list[dict]:
    """Every cell of one protocol for one model's vectors: [{probe, statistic, count, draw, used, figures...}]."""
    cells = []
    for draw in range(draws):
        scored, other = split(proto, ids, draw)
        scored_people = set(ids[scored & proto.gallery])
        domains = {"enrolled": proto.gallery, **proto.probes}
        for statistic in ("raw", *statistics):
            for count in ([0] if statistic == "raw" else [c for c in counts if c != 0]):
                crng = np.random.default_rng(_seed(proto.name, draw, count))  # same photos for every statistic
                pools, used = {}, {}
                for d, mask in (domains.items() if statistic != "raw" else ()):
                    if proto.kind == "control" or proto.set == "thermal":
                        if d != "enrolled":
                            continue  # one domain: the enrolled domain's statistics serve every image
                    if proto.kind == "control" or proto.set == "thermal":  # one domain: all its photos
                        mask = proto.gallery | np.logical_or.reduce(list(proto.probes.values()))
                    pool = np.flatnonzero(mask & other) if proto.set != "lfw" else np.arange(len(source))
                    chosen = pick(pool, count, crng)
                    pools[d] = (source if proto.set == "lfw" else vectors)[chosen]
                    used[d] = len(chosen)
                stats = make_stats(statistic, pools, source) if statistic != "raw" else {}
                gal_mask = proto.gallery & scored
                for probe_name, mask in proto.probes.items():
                    if statistic == "auto-pair" and probe_name in stats:  # the pair's smaller strength
                        stats_pair = make_stats(statistic, {"enrolled": pools["enrolled"],
                                                            probe_name: pools[probe_name]}, source)
                        one, pstats = stats_pair["enrolled"], stats_pair[probe_name]
                    else:
                        one = stats.get("enrolled")
                        pstats = one if (proto.kind == "control" or proto.set == "thermal") else stats.get(probe_name)
                    gal = _normalise(vectors[gal_mask], one)
                    cell = {"probe": probe_name, "statistic": statistic, "count": count, "draw": draw,
                            "used": used, "people_scored": len(scored_people)}
                    if proto.set == "lfw":
                        ia, ib, same = proto.pairs
                        v = _normalise(vectors, one)
                        cell.update(tar_figures(np.einsum("ij,ij->i", v[ia], v[ib]), same))
                    elif proto.kind == "control":
                        cell.update(score_all_pairs(_normalise(vectors[mask & scored], one), ids[mask & scored]))
                    else:
                        pmask = mask & scored
                        probe = _normalise(vectors[pmask], pstats)
                        cell.update(score_cross(gal, ids[gal_mask], probe, ids[pmask]))
                        if proto.open_set is not None:
                            strangers = _normalise(vectors[proto.open_set], pstats)
                            cell["open-set far"] = open_set_far(gal, ids[gal_mask], probe, ids[pmask], strangers)
                    cells.append(cell)
                    if on_cell is not None:
                        on_cell(cell)
    return cells


def summarise(cells: list[dict]) -> list[dict]:
    """Mean and std over draws of each (probe, statistic, count) -> rows."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        groups[(c["probe"], c["statistic"], c["count"])].append(c)
    rows = []
    for (probe, statistic, count), cs in groups.items():
        row = {"probe": probe, "statistic": statistic, "count": count, "draws": len(cs),
               "used": {d: int(np.mean([c["used"].get(d, 0) for c in cs])) for d in cs[0]["used"]}}
        for m in (*METRICS, "open-set far"):
            vals = [c[m] for c in cs if c.get(m) is not None]
            if vals:
                row[m] = float(np.mean(vals))
                row[m + " std"] = float(np.std(vals))
        rows.append(row)
    return rows


def run_benchmark(models: tuple[str, ...], sets: tuple[str, ...], statistics: tuple[str, ...] = STATISTICS,
                  counts: tuple[int, ...] = COUNTS, draws: int = DRAWS, points: str = "five",
                  thermal_layouts: tuple[str, ...] = ("set", "foreground"), progress: bool = True,
                  root=None) -> dict:
    """Embed (cached) and score every protocol of `sets` for each model -> the results document. Thermal is
    scored once per template-crop layout of `thermal_layouts` (the first is the main one). `root`: the data
    folder (default: --data / $FACEMETA_DATA / ../shared/data)."""
    from facemeta.experiments.cross_domain_embed import embed_set
    from facemeta.experiments.cross_domain_protocols import benchmark_rows, protocols

    source_rows = benchmark_rows("lfw-source", root)
    source = embed_set("lfw", source_rows, models, progress=progress)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "draws": draws, "counts": list(counts),
              "statistics": ["raw", *statistics], "points": points, "thermal_layout": thermal_layouts[0],
              "protocols": []}
    for name in sets:
        rows = benchmark_rows(name, root)
        ids = np.array([r.identity for r in rows])
        for layout in (thermal_layouts if name == "thermal" else ("set",)):
            vectors = embed_set(name, rows, models, layout=layout, points=points, progress=progress)
            for proto in protocols(name, rows, root):
                if layout != thermal_layouts[0]:
                    proto.name += f" (template crop: {layout} layout)"
                for model in models:
                    cells = run_protocol(proto, vectors[model], ids, source[model], statistics, counts, draws)
                    result["protocols"].append({"protocol": proto.name, "set": name, "kind": proto.kind,
                                                "model": model, "notes": proto.notes, "rows": summarise(cells)})
    return result


def alignment_rows(sets: tuple[str, ...], rules: tuple[str, ...], model: str = "shipped", draws: int = DRAWS,
                   progress: bool = True, root=None) -> list[dict]:
    """Raw figures of each landmark rule of align.robust (issue 25, item 4) on every protocol of `sets`: the same
    draws, no statistics. Rules other than 'five' re-embed only the images whose points they change."""
    from facemeta.align.robust import robust_landmarks
    from facemeta.experiments.cross_domain_embed import CHIP, detect_landmarks, embed_set
    from facemeta.experiments.cross_domain_protocols import benchmark_rows, protocols

    out = []
    for name in sets:
        rows = benchmark_rows(name, root)
        ids = np.array([r.identity for r in rows])
        marks = detect_landmarks(name, rows, progress=progress)["landmarks"]
        for rule in rules:
            changed = np.array([not np.isnan(p[0, 0]) and not np.allclose(robust_landmarks(p, rule, CHIP), p)
                                for p in marks])
            vectors = embed_set(name, rows, (model,), points=rule, progress=progress,
                                only=changed if rule != "five" else None)[model]
            for proto in protocols(name, rows, root):
                for r in summarise(run_protocol(proto, vectors, ids, None, (), (0,), draws)):
                    out.append({"protocol": proto.name, "set": name, "rule": rule, "changed": int(changed.sum()),
                                "images": len(rows), **r})
    return out


def save(result: dict, out: Path) -> None:
    """results.json (atomic) under `out`."""
    from facemeta.atomic import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "results.json") as fh:
        fh.write(json.dumps(result, indent=1) + "\n")
