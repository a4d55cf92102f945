"""`facemeta benchmark adapt`: adaptation from k labelled people of a target domain, scored on its OTHER people.

The protocols, their aligned faces and the draws are facemeta.experiments.adapt_protocols'. For each seed, k people
are drawn among the people with photos of both conditions (k is skipped where fewer than k + 2 such people exist:
the scored side needs genuine pairs of at least two people); the model adapts on their photos of both conditions
(the enrolment photos in the role of DIR/<person>/enrolled/); every cross-condition pair among the OTHER people is
scored (genuine: same person; impostor: different people) and TAR@FAR=1e-2 reported. Rows: the base model;
statistics only (each condition's mean, estimated from the k people's photos without their labels, removed:
facemeta.gallery.domain_stats); adapt with a setting; with ``stats_rows``, also each setting with the domain
statistics ("<setting>+stats": adapted as `facemeta adapt --domain` adapts, the target condition's mean removed
inside the loss, then scored as statistics only is, each condition centred with the adapted model's vectors).
An ensemble base (the shipped v3) is adapted as `facemeta adapt` adapts it: member by member, each on its own chip,
its vectors combined with the ensemble's weights.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np

from facemeta.experiments.adapt_protocols import (  # noqa: F401  (re-exported: the protocols and draws)
    PROTOCOLS,
    aligned_parts,
    aligned_protocol,
    draw,
    eligible_people,
    feasible,
    protocol_rows,
)

FAR = 1e-2
ROW_ORDER = ("base", "stats-only")


def choices() -> dict:
    """The candidate settings of adapt compared on shared data to choose its defaults (`--choices`)."""
    from facemeta.train.adapt import AdaptSettings as S

    return {"head-lr1e-2": S(tail_blocks=0, lr=1e-2), "head-lr1e-4": S(tail_blocks=0, lr=1e-4),
            "t4-lr1e-4": S(tail_blocks=4, lr=1e-4), "t4-lr1e-4-i.5": S(tail_blocks=4, lr=1e-4, interpolate=0.5)}


def sface_choices() -> dict:
    """The candidate settings compared to find a recipe that moves SFace (benchmarks/adapt_sface_recipe.py;
    benchmarks/results/adapt/sface-recipe/): SFace separates a few people from the first step, so the defaults
    leave it where it was. Names say what differs from adapt's defaults."""
    from facemeta.train.adapt import AdaptSettings as S

    enr = {"other_blocks": 2, "centres": "enrolled", "interpolate": 1.0}
    return {
        "default": S(),  # today's: SFace's embedding head, lr 1e-4, batch centres, m 0.2, half the change kept
        "head-lr1e-2": S(lr=1e-2),  # the best SFace setting of benchmarks/results/adapt/start-sface/choice/
        "b2-lr1e-2": S(other_blocks=2, lr=1e-2),
        "b2-m0.5-lr1e-2-i1": S(other_blocks=2, margin=0.5, lr=1e-2, interpolate=1.0),
        "enr-head-m0.5-lr1e-2-i1": S(centres="enrolled", margin=0.5, lr=1e-2, interpolate=1.0),
        "enr-b2-m0.5-lr1e-2": S(**{**enr, "interpolate": 0.5}, margin=0.5, lr=1e-2),
        "enr-b2-m0.5-lr1e-2-i1": S(**enr, margin=0.5, lr=1e-2),
        "enr-b2-m0.7-lr1e-2-i1": S(**enr, margin=0.7, lr=1e-2),
        "enr-b2-m0.5-lr3e-2-i1": S(**enr, margin=0.5, lr=3e-2),
    }


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


def model_parts(model) -> tuple[list, list[float]]:
    """The networks adapt fine-tunes and their weights in the combination: an ensemble's members and weights
    (facemeta.models.ensemble.EnsembleModel), or the model itself and 1."""
    if hasattr(model, "members"):
        return list(model.members), [s.weight for s in model.specs]
    return [model], [1.0]


def part_cache(parts: list, faces: list[np.ndarray], settings_list: dict) -> list[tuple]:
    """Per part, (front features, mirrored ones, tail blocks) of every face on that part's chip, the front cut at
    the most tail blocks any setting trains on it (facemeta.train.adapt.member_settings)."""
    from facemeta.train.adapt import Tail, front_features, member_settings

    out = []
    for part, chip_faces in zip(parts, faces, strict=True):
        blocks = max([member_settings(part, s).tail_blocks for s in settings_list.values()] + [0])
        out.append((*front_features(Tail(part, blocks), chip_faces), blocks))
    return out


def adapted_vectors(parts: list, cache: list[tuple], faces: list[np.ndarray], base_parts: list[np.ndarray],
                    data: dict, adapt_idx: np.ndarray, settings, with_shift: bool
                    ) -> tuple[list[np.ndarray], list[list[float]], float]:
    """Each part adapted (a copy) on the adapting people's faces as `facemeta adapt` adapts it (their enrolment
    photos told apart from the new-domain ones) -> (per part every face's vectors, per part the step losses,
    seconds). `with_shift`: the target condition's mean of the part's base vectors (`base_parts`) over the
    adapting people's photos removed inside the loss, as adapt's --domain does."""
    from facemeta.train.adapt import ENROL, NEW, adapt_in_place, domain_shift, member_settings

    labels = np.unique(data["people"][adapt_idx], return_inverse=True)[1]
    domains = np.where(data["conditions"][adapt_idx] == 1, ENROL, NEW)
    t0 = time.perf_counter()
    vectors, losses = [], []
    for part, (feats, flipped, blocks), chip_faces, base in zip(parts, cache, faces, base_parts, strict=True):
        shift = domain_shift(base[adapt_idx][domains == NEW], len(adapt_idx), domains) if with_shift else None
        m = copy.deepcopy(part)
        losses.append(adapt_in_place(m, chip_faces[adapt_idx], labels, member_settings(part, settings), shift,
                                     domains=domains))
        vectors.append(tail_vectors(m, feats, flipped, blocks))
    return vectors, losses, time.perf_counter() - t0


def run_cell(model, data: dict, k: int, seed: int, settings_list: dict, cached: list | None = None,
             stats_rows: bool = False) -> dict:
    """One protocol, k and seed: base, stats-only and each named AdaptSettings (and, with `stats_rows`, each with
    the domain statistics) -> {row: scores}. `data["faces"]`: one array per chip the model reads
    (:func:`aligned_parts`); `cached`: :func:`part_cache` of every face, so only the tails run per setting."""
    from facemeta.experiments.cross_domain_embed import combine
    from facemeta.train.adapt import calibrate

    parts, weights = model_parts(model)
    cached = cached if cached is not None else part_cache(parts, data["faces"], settings_list)
    adapt_idx, other = draw(data, k, seed)
    sub = {key: data[key][other] for key in ("people", "conditions")}
    base_parts = [tail_vectors(p, *c) for p, c in zip(parts, cached, strict=True)]
    base_vectors = combine(base_parts, weights)
    rows = {"base": score(base_vectors[other], **sub)}
    if not k:
        return rows
    rows["stats-only"] = score(stats_only(base_vectors, data["conditions"], adapt_idx)[other], **sub)
    labels = np.unique(data["people"][adapt_idx], return_inverse=True)[1]
    for name, settings in settings_list.items():
        for with_stats in (False, True) if stats_rows else (False,):
            vs, losses, seconds = adapted_vectors(parts, cached, data["faces"], base_parts, data, adapt_idx, settings,
                                                  with_stats)
            v = combine(vs, weights)
            if with_stats:
                v = stats_only(v, data["conditions"], adapt_idx)
            thr = calibrate(v[adapt_idx], labels, FAR)[0]
            first, last = [ls[0] for ls in losses], [ls[-1] for ls in losses]
            rows[f"{name}+stats" if with_stats else name] = {
                **score(v[other], **sub, threshold=thr), "seconds": round(seconds, 1),
                "loss_first": first[0] if len(first) == 1 else first, "loss_last": last[0] if len(last) == 1 else last}
    return rows


def for_backbone(model, settings_list: dict) -> dict:
    """The settings as adapt would run them on this model (or ensemble member): facemeta.train.adapt.member_settings
    (tail_blocks counts dlib's residual blocks; another backbone fine-tunes its last ``other_blocks``, default 0:
    its embedding head only); an ensemble's settings are recorded as given and applied member by member."""
    from facemeta.train.adapt import member_settings

    if hasattr(model, "members"):
        return settings_list
    return {n: member_settings(model, s) for n, s in settings_list.items()}


def _as_recorded(settings: dict, recorded: dict | None) -> dict:
    """`settings` without the AdaptSettings fields a results file written before they existed lacks, where they
    hold their defaults (the behaviour before the field existed), so such a file still resumes."""
    from dataclasses import asdict

    from facemeta.train.adapt import AdaptSettings

    if not recorded:
        return settings
    defaults = asdict(AdaptSettings())
    out = {}
    for name, values in settings.items():
        had = recorded.get(name, {})
        out[name] = {f: v for f, v in values.items() if f in had or f not in defaults or v != defaults[f]}
    return out


def load_previous(out: Path, fingerprint: str, settings: dict, stats_rows: bool = False) -> dict:
    """The results document already in out/results.json when it holds the same model, settings and rows (resume);
    {} when there is none; ConfigError when it holds another model's or other settings' results (never
    overwritten)."""
    from facemeta.errors import ConfigError

    path = out / "results.json"
    if not path.is_file():
        return {}
    old = json.loads(path.read_text(encoding="utf-8"))
    if old.get("fingerprint") != fingerprint or old.get("settings") != _as_recorded(settings, old.get("settings")):
        raise ConfigError(f"{path} holds results of model {old.get('fingerprint')} with settings "
                          f"{sorted(old.get('settings', {}))}; pass another --out for model {fingerprint} and these "
                          "settings (the results there are kept)")
    if bool(old.get("stats_rows")) != stats_rows:
        said = "with" if old.get("stats_rows") else "without"
        raise ConfigError(f"{path} holds results {said} the +stats rows; pass another --out, or run it "
                          f"{said} --with-stats (the results there are kept)")
    return old


def run_adapt_bench(model_path, protocols, ks, seeds, settings_list: dict, out: Path, data=None,
                    progress: bool = False, on_cell=None, stats_rows: bool = False) -> dict:
    """The grid -> results dict, written as out/results.json and out/results.md after each cell. Resumable: the
    cells already in out/results.json (same model fingerprint, settings and rows) are kept and not run again;
    cells whose k is not feasible on a protocol (:func:`feasible`) are listed under "skipped". `stats_rows`: also
    each setting with the domain statistics (:func:`run_cell`). `on_cell(results)` is called after each cell is
    written (e.g. to commit it)."""
    from facemeta.embedder import FaceEmbedder

    embedder = FaceEmbedder(model_path)
    settings_list = for_backbone(embedder.model, settings_list)
    settings = {n: vars(s) for n, s in settings_list.items()}
    old = load_previous(out, embedder.fingerprint, settings, stats_rows)
    cells = list(old.get("cells", []))
    results: dict = {"model": old.get("model", str(model_path)), "fingerprint": embedder.fingerprint, "far": FAR,
                     "settings": old.get("settings", settings), "cells": cells, "skipped": []}
    if stats_rows:
        results["stats_rows"] = True
    if hasattr(embedder.model, "members"):
        results["members"] = [f"{m.config.backbone} ({chip} {size})" for m, (chip, size)
                              in zip(embedder.model.members, embedder.model.chips, strict=True)]
    done = {(c["protocol"], c["k"], c["seed"]) for c in cells}
    parts = model_parts(embedder.model)[0]
    for proto in protocols:
        todo = [(k, s) for k in ks for s in seeds if (proto, k, s) not in done]
        if not todo:
            continue
        data_p = aligned_parts(proto, embedder, data, progress)
        cached = None
        for k, seed in todo:
            if not feasible(data_p, k):
                results["skipped"].append({"protocol": proto, "k": k, "seed": seed,
                                           "why": f"{len(eligible_people(data_p))} people with both conditions"})
                continue
            if cached is None:
                cached = part_cache(parts, data_p["faces"], settings_list)
            rows = run_cell(embedder.model, data_p, k, seed, settings_list, cached, stats_rows)
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
    if results.get("stats_rows"):
        lines += ["", "`<setting>+stats`: adapted as `facemeta adapt --domain` adapts (the target condition's mean over "
                      "the k people's photos removed inside the loss), then each condition centred on its mean over the "
                      "k people's photos with the adapted model's vectors, as statistics only is scored."]
    if results.get("members"):
        lines += ["", "An ensemble, adapted member by member (each on its own chip): " + ", ".join(results["members"])]
    skipped = sorted({(c["protocol"], c["k"], c["why"]) for c in results.get("skipped", [])})
    if skipped:
        lines += ["", "Not run (too few people): " + "; ".join(f"{p} k = {k} ({why})" for p, k, why in skipped)]
    with atomic_write(out / "results.md") as fh:
        fh.write("\n".join(lines) + "\n")
