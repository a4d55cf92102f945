"""`facemeta benchmark adapt`: adaptation from k labelled people of a target domain, scored on its OTHER people.

Protocols (cross-domain: an enrolment photo against a probe of the target condition), per shared set:
- ``ar-scarf``: AR neutral (01, 14) vs scarf (11, 12, 13, 24, 25, 26), 100 people;
- ``ar-sunglasses``: AR neutral vs sunglasses (08, 09, 10, 21, 22, 23);
- ``mfr2-mask``: MFR2 unmasked vs masked (mfr2_labels.txt), 53 people.
For each seed, k people are drawn; the model adapts on their photos of both conditions (the enrolment photos in
the role of DIR/<person>/enrolled/); every cross-condition pair among the OTHER people is scored (genuine: same
person; impostor: different people) and TAR@FAR=1e-2 reported. Rows: the base model; statistics only (each
condition's mean, estimated from the k people's photos without their labels, removed: facemeta.gallery.domain_stats);
adapt with a setting. Faces are aligned once through the product's route (facemeta.train.adapt.align_photos) and
cached in cache_root()/adapt_bench/.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import numpy as np

AR_NEUTRAL = (1, 14)
AR_CONDITIONS = {"scarf": (11, 12, 13, 24, 25, 26), "sunglasses": (8, 9, 10, 21, 22, 23)}
PROTOCOLS = ("ar-scarf", "ar-sunglasses", "mfr2-mask")
FAR = 1e-2


def choices() -> dict:
    """The candidate settings of adapt compared on shared data to choose its defaults (`--choices`)."""
    from facemeta.train.adapt import AdaptSettings as S

    return {"head-lr1e-2": S(tail_blocks=0, lr=1e-2), "head-lr1e-4": S(tail_blocks=0, lr=1e-4),
            "t4-lr1e-4": S(tail_blocks=4, lr=1e-4), "t4-lr1e-4-i.5": S(tail_blocks=4, lr=1e-4, interpolate=0.5)}


def protocol_rows(name: str, data: str | os.PathLike | None = None) -> list[tuple[str, str, int]]:
    """(path, person, condition) of a protocol: condition 1 = enrolment photos, 0 = the target condition."""
    from facemeta.paths import data_root

    root = data_root(data)
    rows = []
    if name.startswith("ar-"):
        target = AR_CONDITIONS[name[3:]]
        for d in sorted((root / "ar").iterdir()):
            for n in AR_NEUTRAL + target:
                p = d / f"face_{d.name}_{n:02d}.png"
                if p.is_file():
                    rows.append((str(p), d.name, 1 if n in AR_NEUTRAL else 0))
    elif name == "mfr2-mask":
        for line in (root / "mfr2" / "mfr2_labels.txt").read_text().splitlines():
            parts = [t.strip() for t in line.split(",")]
            if len(parts) == 3 and parts[1].isdigit():
                p = root / "mfr2" / parts[0] / f"{parts[0]}_{int(parts[1]):04d}.png"
                if p.is_file():
                    rows.append((str(p), parts[0], 1 if parts[2].lower() == "no-mask" else 0))
    else:
        raise ValueError(f"unknown protocol {name!r}; one of {', '.join(PROTOCOLS)}")
    return rows


def aligned_protocol(name: str, embedder, data=None, progress: bool = False) -> dict:
    """Aligned faces of a protocol, cached: {faces, people (per face), conditions, paths}."""
    from facemeta.paths import cache_root
    from facemeta.train.adapt import align_photos

    path = cache_root() / "adapt_bench" / f"{name}-{embedder.align_chip}{embedder.align_size}-route2.npz"  # route2: FaceEmbedder.files_faces
    if path.is_file():
        z = np.load(path)
        return {k: z[k] for k in z.files}
    rows = protocol_rows(name, data)
    faces, _ = align_photos(embedder, [Path(r[0]) for r in rows], progress, desc=name)
    keep = [i for i, f in enumerate(faces) if f is not None]
    out = {"faces": np.stack([faces[i] for i in keep]), "people": np.array([rows[i][1] for i in keep]),
           "conditions": np.array([rows[i][2] for i in keep]), "paths": np.array([rows[i][0] for i in keep])}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def cross_scores(vectors: np.ndarray, people: np.ndarray, conditions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (enrolment photo, target-condition photo) pair -> (cosines, same person)."""
    g, p = np.flatnonzero(conditions == 1), np.flatnonzero(conditions == 0)
    scores = vectors[g] @ vectors[p].T
    same = people[g][:, None] == people[p][None, :]
    return scores.ravel(), same.ravel()


def score(vectors, people, conditions, threshold: float | None = None) -> dict:
    """TAR@FAR=1e-2 and ROC AUC of the cross-condition pairs; with `threshold`, the FAR it really gives."""
    from facemeta.eval.metrics import rates_at_threshold, roc_auc, tar_at_far

    s, y = cross_scores(vectors, people, conditions)
    out = {"tar": tar_at_far(s, y, FAR), "auc": roc_auc(s, y)}
    if threshold is not None:
        out["far_at_threshold"] = rates_at_threshold(s, y, threshold)[1]
    return out


def stats_only(vectors, conditions, adapt_idx) -> np.ndarray:
    """Each condition's vectors centred on that condition's mean over the adapting people's photos."""
    from facemeta.gallery.domain_stats import estimate, normalise

    out = vectors.copy()
    for c in (0, 1):
        mask = conditions == c
        stats = estimate(vectors[np.intersect1d(adapt_idx, np.flatnonzero(mask))], "mean")
        out[mask] = normalise(vectors[mask], stats)
    return out


def tail_vectors(model, feats, flipped, blocks: int) -> np.ndarray:
    """Flip-TTA unit vectors from cached front features (front at the split of `blocks` tail blocks): what
    facemeta.models.backbone.embed(model, faces, flip=True) gives while only the tail differs from the base."""
    import torch
    import torch.nn.functional as F

    from facemeta.train.adapt import Tail

    tail = Tail(model, blocks).eval()
    with torch.inference_mode():
        e = F.normalize(F.normalize(tail(feats), dim=1) + F.normalize(tail(flipped), dim=1), dim=1)
    return e.numpy().astype(np.float32)


def run_cell(model, data: dict, k: int, seed: int, settings_list: dict, cached: tuple | None = None) -> dict:
    """One protocol, k and seed: base, stats-only and each named AdaptSettings -> {row: scores}. `cached`:
    (front features, mirrored ones, tail blocks) of every face, so only the tail runs per setting."""
    from facemeta.train.adapt import Tail, adapt_in_place, calibrate, front_features

    blocks = max([s.tail_blocks for s in settings_list.values()] + [0])
    if cached is None:
        cached = (*front_features(Tail(model, blocks), data["faces"]), blocks)
    feats, flipped, blocks = cached
    people = np.unique(data["people"])
    rng = np.random.default_rng([seed, k])
    chosen = set(rng.choice(people, size=k, replace=False)) if k else set()
    adapt_idx = np.flatnonzero(np.isin(data["people"], list(chosen)))
    other = np.flatnonzero(~np.isin(data["people"], list(chosen)))
    sub = {key: data[key][other] for key in ("people", "conditions")}
    base_vectors = tail_vectors(model, feats, flipped, blocks)
    rows = {"base": score(base_vectors[other], **sub)}
    if k:
        rows["stats-only"] = score(stats_only(base_vectors, data["conditions"], adapt_idx)[other], **sub)
    for name, settings in settings_list.items():
        if not k:
            continue
        m = copy.deepcopy(model)
        labels = np.unique(data["people"][adapt_idx], return_inverse=True)[1]
        t0 = time.perf_counter()
        losses = adapt_in_place(m, data["faces"][adapt_idx], labels, settings)
        v = tail_vectors(m, feats, flipped, blocks)
        thr = calibrate(v[adapt_idx], labels, FAR)[0]
        rows[name] = {**score(v[other], **sub, threshold=thr), "seconds": round(time.perf_counter() - t0, 1),
                      "loss_first": losses[0], "loss_last": losses[-1]}
    return rows


def run_adapt_bench(model_path, protocols, ks, seeds, settings_list: dict, out: Path, data=None,
                    progress: bool = False) -> dict:
    """The grid -> results dict, written as out/results.json and out/results.md (rewritten after each cell)."""
    from facemeta.embedder import FaceEmbedder
    from facemeta.train.adapt import Tail, front_features

    embedder = FaceEmbedder(model_path)
    results: dict = {"model": str(model_path), "fingerprint": embedder.fingerprint, "far": FAR,
                     "settings": {n: vars(s) for n, s in settings_list.items()}, "cells": []}
    for proto in protocols:
        data_p = aligned_protocol(proto, embedder, data, progress)
        blocks = max([s.tail_blocks for s in settings_list.values()] + [0])
        cached = (*front_features(Tail(embedder.model, blocks), data_p["faces"]), blocks)
        for k in ks:
            for seed in seeds:
                rows = run_cell(embedder.model, data_p, k, seed, settings_list, cached)
                results["cells"].append({"protocol": proto, "k": k, "seed": seed, "rows": rows})
                write_results(results, out)
    return results


def _paired(results: dict, proto: str, k: int, row: str, ref: str) -> list[float]:
    """Per draw (protocol, k, seed), TAR of `row` minus TAR of `ref` (draws holding both)."""
    return [c["rows"][row]["tar"] - c["rows"][ref]["tar"] for c in results["cells"]
            if c["protocol"] == proto and c["k"] == k and row in c["rows"] and ref in c["rows"]]


def summarise(results: dict) -> list[dict]:
    """Per (protocol, k, row): mean ± std over seeds of TAR, the paired differences against statistics only and
    against the base model, and the FAR that adapt's own threshold gave on the other people."""
    groups: dict = {}
    for cell in results["cells"]:
        for row, sc in cell["rows"].items():
            groups.setdefault((cell["protocol"], cell["k"], row), []).append(sc)
    out = []
    for (proto, k, row), scores in groups.items():
        tars = [sc["tar"] for sc in scores]
        entry = {"protocol": proto, "k": k, "row": row, "n": len(tars), "mean": float(np.mean(tars)),
                 "std": float(np.std(tars))}
        for ref in ("stats-only", "base"):
            diff = _paired(results, proto, k, row, ref) if row not in ("base", "stats-only") else []
            entry[f"vs {ref}"] = (float(np.mean(diff)), float(np.std(diff))) if diff else None
        fars = [sc["far_at_threshold"] for sc in scores if "far_at_threshold" in sc]
        entry["far_at_threshold"] = float(np.mean(fars)) if fars else None
        out.append(entry)
    return out


def write_results(results: dict, out: Path) -> None:
    """results.json and a Markdown table (TAR@FAR=1e-2 in %, mean ± std over seeds)."""
    from facemeta.atomic import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "results.json") as fh:
        fh.write(json.dumps(results, indent=1) + "\n")
    lines = ["# Adaptation from k labelled people, scored on the target's other people", "",
             f"Model `{results['model']}` ({results['fingerprint']}); TAR at FAR={results['far']:g} on every "
             "enrolment-vs-target pair among the people who did NOT adapt the model; mean ± std over seeds "
             "(n); Δ: paired differences in points against statistics only and against the base model (same draw of "
             "people), mean ± std over draws; FAR at adapt's threshold: the false-accept rate on the other people's "
             "pairs of the threshold adapt calibrated on the k people's impostor pairs (nominal 0.01).", "",
             "| protocol | k | row | n | TAR (%) | Δ vs stats-only | Δ vs base | FAR at adapt's threshold |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def diff(d: tuple | None) -> str:
        return "" if d is None else f"{100 * d[0]:+.1f} ± {100 * d[1]:.1f}"

    for r in summarise(results):
        far = "" if r["far_at_threshold"] is None else f"{r['far_at_threshold']:.3f}"
        lines.append(f"| {r['protocol']} | {r['k']} | {r['row']} | {r['n']} | {100 * r['mean']:.1f} ± "
                     f"{100 * r['std']:.1f} | {diff(r['vs stats-only'])} | {diff(r['vs base'])} | {far} |")
    lines += ["", "Settings: " + "; ".join(f"`{n}` {s}" for n, s in results["settings"].items())]
    with atomic_write(out / "results.md") as fh:
        fh.write("\n".join(lines) + "\n")
