"""`facemeta benchmark adapt`: adaptation from k labelled people of a target domain, scored on its OTHER people.

Protocols (cross-domain: an enrolment photo against a probe of the target condition), per shared set:
- ``ar-scarf``: AR neutral (01, 14) vs scarf (11, 12, 13, 24, 25, 26), 100 people;
- ``ar-sunglasses``: AR neutral vs sunglasses (08, 09, 10, 21, 22, 23);
- ``mfr2-mask``: MFR2 unmasked vs masked (mfr2_labels.txt), 53 people;
- ``yaleb-side``: Yale B frontal light vs side light (the cross-domain benchmark's "light >77" group: light more
  than 77 degrees off the axis), 38 people, one enrolment photo each;
- ``thermal``: thermal gallery vs probes (GalleryPristine vs ProbePristine), 41 enrolled people, with the 41
  never-enrolled people's probes (ProbeNPristine) among the target photos: they only ever make impostor pairs.
The Yale B and thermal splits are those of facemeta.experiments.cross_domain_protocols, and their faces are aligned as
that benchmark aligns them (its cached landmarks; the set's template crop where none were found), since MTCNN finds
few thermal faces; AR and MFR2 go through the product's route (FaceEmbedder.files_faces).
For each seed, k people are drawn among the people with photos of both conditions (k is skipped where fewer than
k + 2 such people exist: the scored side needs genuine pairs of at least two people); the model adapts on their photos of both conditions (the enrolment photos in
the role of DIR/<person>/enrolled/); every cross-condition pair among the OTHER people is scored (genuine: same
person; impostor: different people) and TAR@FAR=1e-2 reported. Rows: the base model; statistics only (each
condition's mean, estimated from the k people's photos without their labels, removed: facemeta.gallery.domain_stats);
adapt with a setting. Faces are aligned once through the product's route (facemeta.train.adapt_faces.align_photos) and
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
PROTOCOLS = ("ar-scarf", "ar-sunglasses", "mfr2-mask", "yaleb-side", "thermal")
YALEB_SIDE = ("light >77",)  # facemeta.experiments.cross_domain_protocols.YALEB_GROUPS: the side light
CROSS_DOMAIN_ALIGNED = ("yaleb-side", "thermal")  # aligned as facemeta.experiments.cross_domain_embed does
FAR = 1e-2
ROW_ORDER = ("base", "stats-only")


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
    elif name in ("yaleb-side", "thermal"):
        from facemeta.experiments.cross_domain_protocols import benchmark_rows, protocols

        which = name.split("-")[0]
        found = benchmark_rows(which, root)
        proto = protocols(which, found, root)[0]
        if which == "yaleb":
            target = np.any([proto.probes[g] for g in YALEB_SIDE], axis=0)
        else:
            target = proto.probes["probes"] | proto.open_set
        for r, enrol, probe in zip(found, proto.gallery, target, strict=True):
            if enrol or probe:
                rows.append((r.path, r.identity, 1 if enrol else 0))
    else:
        raise ValueError(f"unknown protocol {name!r}; one of {', '.join(PROTOCOLS)}")
    return rows


def aligned_protocol(name: str, embedder, data=None, progress: bool = False) -> dict:
    """Aligned faces of a protocol, cached: {faces, people (per face), conditions, paths}. AR and MFR2 go through
    the product's route (photos without a face dropped); Yale B and thermal are aligned as the cross-domain
    benchmark aligns them (:func:`cross_domain_faces`), every photo kept."""
    from facemeta.paths import cache_root

    route = "xd" if name in CROSS_DOMAIN_ALIGNED else "route2"  # route2: FaceEmbedder.files_faces
    path = cache_root() / "adapt_bench" / f"{name}-{embedder.align_chip}{embedder.align_size}-{route}.npz"
    if path.is_file():
        z = np.load(path)
        return {k: z[k] for k in z.files}
    rows = protocol_rows(name, data)
    if name in CROSS_DOMAIN_ALIGNED:
        faces = cross_domain_faces(name, [r[0] for r in rows], embedder.align_chip, embedder.align_size, data,
                                   progress)
    else:
        from facemeta.train.adapt_faces import align_photos

        faces = align_photos(embedder, [Path(r[0]) for r in rows], progress, desc=name)[0]
    keep = [i for i, f in enumerate(faces) if f is not None]
    out = {"faces": np.stack([faces[i] for i in keep]), "people": np.array([rows[i][1] for i in keep]),
           "conditions": np.array([rows[i][2] for i in keep]), "paths": np.array([rows[i][0] for i in keep])}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def cross_domain_faces(name: str, paths: list[str], chip: str, size: int, data=None, progress: bool = False
                       ) -> list[np.ndarray]:
    """Faces of a Yale B or thermal protocol warped as the cross-domain benchmark warps them
    (facemeta.experiments.cross_domain_embed: the product's detection route, landmarks cached there; a photo
    without landmarks gets the template crop with the set's median layout): a visible-light detector finds few
    thermal faces (52 of 410 through FaceEmbedder), so the product's route alone would leave 7 people."""
    from facemeta.align.warp import warp_face
    from facemeta.experiments.cross_domain_embed import detect_landmarks, image_points, set_layout
    from facemeta.experiments.cross_domain_protocols import benchmark_rows
    from facemeta.images import load_image
    from facemeta.paths import data_root

    which = name.split("-")[0]
    rows = benchmark_rows(which, data_root(data))
    marks = detect_landmarks(which, rows, progress=progress)
    index = {r.path: i for i, r in enumerate(rows)}
    frame = set_layout(marks)
    out = []
    for p in paths:
        img = load_image(p)
        pts = image_points([img], marks["landmarks"][index[p]][None], frame)[0]
        out.append(warp_face(img, pts, size, chip))
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


def eligible_people(data: dict) -> np.ndarray:
    """The people a draw picks from: those with photos of both conditions (sorted)."""
    both = set(data["people"][data["conditions"] == 1]) & set(data["people"][data["conditions"] == 0])
    return np.array(sorted(both))


def feasible(data: dict, k: int) -> bool:
    """Whether k labelled people can be drawn and still leave two people with genuine pairs to score (k = 0, the
    base model alone, always; k = 1 never: adapt needs two people)."""
    return k == 0 or 2 <= k <= len(eligible_people(data)) - 2


def draw(data: dict, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw `seed` of k people among the eligible ones -> (indices of their photos, indices of everyone else's)."""
    rng = np.random.default_rng([seed, k])
    chosen = list(rng.choice(eligible_people(data), size=k, replace=False)) if k else []
    inside = np.isin(data["people"], chosen)
    return np.flatnonzero(inside), np.flatnonzero(~inside)


def run_cell(model, data: dict, k: int, seed: int, settings_list: dict, cached: tuple | None = None) -> dict:
    """One protocol, k and seed: base, stats-only and each named AdaptSettings -> {row: scores}. `cached`:
    (front features, mirrored ones, tail blocks) of every face, so only the tail runs per setting."""
    from facemeta.train.adapt import Tail, adapt_in_place, calibrate, front_features

    blocks = max([s.tail_blocks for s in settings_list.values()] + [0])
    if cached is None:
        cached = (*front_features(Tail(model, blocks), data["faces"]), blocks)
    feats, flipped, blocks = cached
    adapt_idx, other = draw(data, k, seed)
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


def check_base(model) -> None:
    """ConfigError for a base the benchmark cannot adapt: an ensemble (adapt fine-tunes one network's tail)."""
    from facemeta.errors import ConfigError

    if hasattr(model, "members"):
        raise ConfigError("benchmark adapt adapts a single model and the base is an ensemble (the shipped v3 is "
                          "one): pass --base a single model, e.g. a member written by `facemeta train prior --steps "
                          "0 --out runs/prior` or `facemeta train sface --steps 0 --out runs/sface`")


def for_backbone(model, settings_list: dict) -> dict:
    """The settings as adapt would run them on this model: tail_blocks 0 (the embedding layer only) for a backbone
    other than the dlib-prior ResNet (as facemeta.train.adapt.adapt_model does)."""
    from dataclasses import replace

    if hasattr(model.backbone, "stem_conv"):
        return settings_list
    return {n: replace(s, tail_blocks=0) for n, s in settings_list.items()}


def load_previous(out: Path, fingerprint: str, settings: dict) -> dict:
    """The results document already in out/results.json when it holds the same model and settings (resume); {}
    when there is none; ConfigError when it holds another model's or other settings' results (never
    overwritten)."""
    from facemeta.errors import ConfigError

    path = out / "results.json"
    if not path.is_file():
        return {}
    old = json.loads(path.read_text(encoding="utf-8"))
    if old.get("fingerprint") != fingerprint or old.get("settings") != settings:
        raise ConfigError(f"{path} holds results of model {old.get('fingerprint')} with settings "
                          f"{sorted(old.get('settings', {}))}; pass another --out for model {fingerprint} and these "
                          "settings (the results there are kept)")
    return old


def run_adapt_bench(model_path, protocols, ks, seeds, settings_list: dict, out: Path, data=None,
                    progress: bool = False, on_cell=None) -> dict:
    """The grid -> results dict, written as out/results.json and out/results.md after each cell. Resumable: the
    cells already in out/results.json (same model fingerprint and settings) are kept and not run again; cells
    whose k is not feasible on a protocol (:func:`feasible`) are listed under "skipped". `on_cell(results)` is
    called after each cell is written (e.g. to commit it)."""
    from facemeta.embedder import FaceEmbedder
    from facemeta.train.adapt import Tail, front_features

    embedder = FaceEmbedder(model_path)
    check_base(embedder.model)
    settings_list = for_backbone(embedder.model, settings_list)
    settings = {n: vars(s) for n, s in settings_list.items()}
    old = load_previous(out, embedder.fingerprint, settings)
    cells = list(old.get("cells", []))
    results: dict = {"model": old.get("model", str(model_path)), "fingerprint": embedder.fingerprint, "far": FAR,
                     "settings": settings, "cells": cells, "skipped": []}
    done = {(c["protocol"], c["k"], c["seed"]) for c in cells}
    for proto in protocols:
        todo = [(k, s) for k in ks for s in seeds if (proto, k, s) not in done]
        if not todo:
            continue
        data_p = aligned_protocol(proto, embedder, data, progress)
        blocks = max([s.tail_blocks for s in settings_list.values()] + [0])
        cached = None
        for k, seed in todo:
            if not feasible(data_p, k):
                results["skipped"].append({"protocol": proto, "k": k, "seed": seed,
                                           "why": f"{len(eligible_people(data_p))} people with both conditions"})
                continue
            if cached is None:
                cached = (*front_features(Tail(embedder.model, blocks), data_p["faces"]), blocks)
            rows = run_cell(embedder.model, data_p, k, seed, settings_list, cached)
            results["cells"].append({"protocol": proto, "k": k, "seed": seed, "rows": rows})
            write_results(results, out)
            if on_cell is not None:
                on_cell(results)
    write_results(results, out)
    return results


def _paired(results: dict, proto: str, k: int, row: str, ref: str) -> list[float]:
    """Per draw (protocol, k, seed), TAR of `row` minus TAR of `ref` (draws holding both)."""
    return [c["rows"][row]["tar"] - c["rows"][ref]["tar"] for c in results["cells"]
            if c["protocol"] == proto and c["k"] == k and row in c["rows"] and ref in c["rows"]]


def interval(diffs: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Two-sided t confidence interval of the mean of paired differences (None with fewer than two): half its
    width is the smallest true difference the draws could tell from zero."""
    if len(diffs) < 2:
        return None
    from scipy import stats

    m, se = float(np.mean(diffs)), float(np.std(diffs, ddof=1) / np.sqrt(len(diffs)))
    half = float(stats.t.ppf(0.5 + level / 2, len(diffs) - 1)) * se
    return m - half, m + half


def _order(results: dict) -> dict:
    order = {p: i for i, p in enumerate(PROTOCOLS)}
    for c in results["cells"]:
        order.setdefault(c["protocol"], len(order))
    return order


def summarise(results: dict) -> list[dict]:
    """Per (protocol, k, row): mean ± std over seeds of TAR, the paired differences against statistics only and
    against the base model (mean, std and 95% interval over draws), and the FAR that adapt's own threshold gave
    on the other people. Sorted by protocol (PROTOCOLS order), k, then base, stats-only and the settings."""
    groups: dict = {}
    for cell in results["cells"]:
        for row, sc in cell["rows"].items():
            groups.setdefault((cell["protocol"], cell["k"], row), []).append(sc)
    order = _order(results)
    rank = {r: i for i, r in enumerate(ROW_ORDER)}
    out = []
    for (proto, k, row), scores in sorted(groups.items(), key=lambda g: (order[g[0][0]], g[0][1],
                                                                           rank.get(g[0][2], len(rank)))):
        tars = [sc["tar"] for sc in scores]
        entry = {"protocol": proto, "k": k, "row": row, "n": len(tars), "mean": float(np.mean(tars)),
                 "std": float(np.std(tars))}
        for ref in ("stats-only", "base"):
            diff = _paired(results, proto, k, row, ref) if row not in ROW_ORDER else []
            entry[f"vs {ref}"] = (float(np.mean(diff)), float(np.std(diff))) if diff else None
            entry[f"vs {ref} ci"] = interval(diff)
        fars = [sc["far_at_threshold"] for sc in scores if "far_at_threshold" in sc]
        entry["far_at_threshold"] = float(np.mean(fars)) if fars else None
        out.append(entry)
    return out


def compare_starts(a: dict, b: dict, row: str = "adapt") -> list[dict]:
    """Two results documents over the same protocols (e.g. two base models): per (protocol, k), `row` of `b`
    minus `row` of `a` paired over the draws both ran (a draw depends only on the seed, k and the people with
    faces, so both starts adapt on the same people) -> [{protocol, k, n, mean, std, ci}]. k = 0 compares "base"."""
    index = {(c["protocol"], c["k"], c["seed"]): c["rows"] for c in a["cells"]}
    diffs: dict = {}
    for c in b["cells"]:
        other = index.get((c["protocol"], c["k"], c["seed"]))
        name = row if c["k"] else "base"
        if other is not None and name in other and name in c["rows"]:
            diffs.setdefault((c["protocol"], c["k"]), []).append(c["rows"][name]["tar"] - other[name]["tar"])
    order = _order(b)
    return [{"protocol": p, "k": k, "n": len(d), "mean": float(np.mean(d)), "std": float(np.std(d)),
             "ci": interval(d)} for (p, k), d in sorted(diffs.items(), key=lambda x: (order[x[0][0]], x[0][1]))]


def fmt_diff(d: tuple | None, ci: tuple | None = None) -> str:
    """A paired difference in points: "+1.2 ± 0.8 [-0.8, +3.2]" (mean ± std [95% CI]); "" when there is none."""
    if d is None:
        return ""
    text = f"{100 * d[0]:+.1f} ± {100 * d[1]:.1f}"
    return text if ci is None else f"{text} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"


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
             "pairs of the threshold adapt calibrated on the k people's impostor pairs (nominal 0.01). In brackets: "
             "the 95% t interval of the paired mean (n draws); a true difference smaller than half its width cannot "
             "be told from zero with these draws.", "",
             "| protocol | k | row | n | TAR (%) | Δ vs stats-only [95% CI] | Δ vs base [95% CI] | FAR at adapt's "
             "threshold |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    for r in summarise(results):
        far = "" if r["far_at_threshold"] is None else f"{r['far_at_threshold']:.3f}"
        lines.append(f"| {r['protocol']} | {r['k']} | {r['row']} | {r['n']} | {100 * r['mean']:.1f} ± "
                     f"{100 * r['std']:.1f} | {fmt_diff(r['vs stats-only'], r['vs stats-only ci'])} | "
                     f"{fmt_diff(r['vs base'], r['vs base ci'])} | {far} |")
    lines += ["", "Settings: " + ("; ".join(f"`{n}` {s}" for n, s in results["settings"].items())
                                   or "none (--no-adapt: the base model and statistics only)")]
    skipped = sorted({(c["protocol"], c["k"], c["why"]) for c in results.get("skipped", [])})
    if skipped:
        lines += ["", "Not run (too few people): " + "; ".join(f"{p} k = {k} ({why})" for p, k, why in skipped)]
    with atomic_write(out / "results.md") as fh:
        fh.write("\n".join(lines) + "\n")
