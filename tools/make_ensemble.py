"""Make one ensemble checkpoint from facemeta checkpoints, with its threshold calibrated as training calibrates.

    python tools/make_ensemble.py runs/prior-zero-shot/model.safetensors runs/sface-zero-shot/model.safetensors \\
        --out runs/ensemble/model.safetensors
    python tools/make_ensemble.py weights/default.safetensors sface --choose-weight 0.5 0.3333 0.6667 \\
        --half --out runs/v3/model.safetensors     # `prior` / `sface`: the installed priors, stored as references

Members read their own chips (each checkpoint's ``align_chip`` / ``align_size``) from the same landmarks; the
ensemble's vector is their unit vectors concatenated (facemeta.models.ensemble; ``--weights`` to weigh them).
The threshold is chosen as the trainer chooses it (and tools/ship_model.py ships it): on every pair of the
HELD-OUT source identities of a training config (``--config``, default the ``prior`` preset: LFW people folds
1-5, Yale B, MFR2, a tenth of each set's identities held out by a fixed hash order), at ``--far`` (default 1e-3,
the shipped models' working point), with ``eval.flip`` of that config. A held-out photo counts only when every
member's chip of it was aligned.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def heldout_faces(cfg, chips: list[tuple[str, int]]) -> tuple[list[list[np.ndarray]], np.ndarray, dict]:
    """Held-out source photos of `cfg` aligned onto each chip -> (crops per chip, identities, counts)."""
    from facemeta.align.cache import aligned_dir
    from facemeta.align.pipeline import align_rows
    from facemeta.data.manifest import ManifestRow
    from facemeta.data.sets import PRE_CROPPED_SETS
    from facemeta.images import load_image
    from facemeta.train.data import prepare_data

    held = prepare_data(cfg).heldout
    by_source = {r.extra.get("source", r.path): r for r in held}
    paths: dict[tuple[str, int], dict[str, str]] = {}
    for chip, size in chips:
        found: dict[str, str] = {}
        for set_name in sorted({r.identity.split("/", 1)[0] for r in held}):
            rows = [ManifestRow(src, r.identity, r.domain) for src, r in by_source.items()
                    if r.identity.startswith(set_name + "/")]
            done, _ = align_rows(rows, aligned_dir(set_name, size, chip, cfg.data.cache), size=size,
                                 pre_cropped=set_name in PRE_CROPPED_SETS, progress=False, chip=chip,
                                 workers=cfg.data.align_workers)
            found.update({r.extra["source"]: r.path for r in done})
        paths[(chip, size)] = found
    usable = sorted(set.intersection(*(set(p) for p in paths.values())))
    crops = [[load_image(paths[c][src]) for src in usable] for c in chips]
    ids = np.array([by_source[src].identity for src in usable])
    return crops, ids, {"heldout_photos": len(by_source), "usable": len(usable)}


def calibrate(model, crops, ids: np.ndarray, far: float, flip: bool) -> dict:
    """All-pairs verification of the held-out faces: threshold and TAR at FAR 1e-2, 1e-3 and `far`."""
    from facemeta.eval.metrics import roc_auc, tar_at_far, threshold_at_far
    from facemeta.eval.pairs import all_pairs, pair_scores

    emb = model.embed(crops, flip=flip)
    ia, ib, same = all_pairs(ids)
    scores = pair_scores(emb, ia, ib)
    out = {"set": "held-out source identities (all pairs)", "n_images": len(ids),
           "n_identities": int(np.unique(ids).size), "n_pos": int(same.sum()), "n_neg": int((~same).sum()),
           "auc": roc_auc(scores, same), "flip": flip}
    for level, key in ((1e-2, "1e-2"), (1e-3, "1e-3"), (far, f"{far:g}")):
        out[f"threshold@far={key}"] = threshold_at_far(scores, same, level)
        out[f"tar@far={key}"] = tar_at_far(scores, same, level)
    out["threshold"], out["threshold_far"] = out[f"threshold@far={far:g}"], far
    return out


def member_model(spec: str):
    """A member given on the command line -> (model, (chip, size), fingerprint): a facemeta checkpoint, or ``prior``
    / ``sface`` for dlib's encoder / SFace zero-shot from the installed packages (stored as references)."""
    from facemeta.embedder import file_fingerprint
    from facemeta.models.backbone import PRIORS, build_prior, installed_weights
    from facemeta.models.checkpoint import load_checkpoint

    if spec in PRIORS:
        model, chip = build_prior(spec)
        return model, chip, installed_weights(PRIORS[spec][0]).stem
    model, meta = load_checkpoint(spec)
    return model, (str(meta.get("align_chip", "arcface")), int(meta.get("align_size", 112))), file_fingerprint(spec)


def per_set_tar(vectors: np.ndarray, ids: np.ndarray) -> dict[str, float]:
    """TAR@FAR=1e-2 on all pairs within each source set of the held-out identities ("<set>/<person>")."""
    from facemeta.eval.metrics import tar_at_far
    from facemeta.eval.pairs import all_pairs, pair_scores

    out = {}
    for name in sorted({i.split("/", 1)[0] for i in ids}):
        pick = np.array([i.startswith(name + "/") for i in ids])
        ia, ib, same = all_pairs(ids[pick])
        out[name] = float(tar_at_far(pair_scores(vectors[pick], ia, ib), same, 1e-2))
    return out


def choose_weight(model, crops, ids: np.ndarray, candidates: list[float], flip: bool) -> tuple[float, dict]:
    """The first member's weight (the others share the rest equally) with the highest mean over the source sets of
    the held-out TAR@FAR=1e-2; ties keep 1/2 first, then the order given. -> (weight, score per candidate)."""
    from facemeta.experiments.cross_domain_embed import combine
    from facemeta.models.backbone import embed

    parts = [embed(m, c, flip=flip) for m, c in zip(model.members, crops, strict=True)]  # once per member
    scores = {}
    for w in candidates:
        rest = (1.0 - w) / (len(parts) - 1)
        per = per_set_tar(combine(parts, [w] + [rest] * (len(parts) - 1)), ids)
        scores[f"{w:.4f}"] = {"mean": float(np.mean(list(per.values()))), **per}
    order = sorted(candidates, key=lambda w: (abs(w - 0.5) > 1e-9, candidates.index(w)))
    best = max(order, key=lambda w: round(scores[f"{w:.4f}"]["mean"], 6))
    return best, scores


def main(argv: list[str] | None = None) -> int:
    """Build the ensemble, calibrate its threshold on held-out source identities, write the checkpoint."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("members", nargs="+", help="member checkpoints (.safetensors), or `prior` / `sface` for dlib's "
                                               "encoder / SFace zero-shot (stored as references), two or more")
    ap.add_argument("--out", type=Path, required=True, help="the ensemble checkpoint to write (.safetensors)")
    ap.add_argument("--weights", type=float, nargs="+", help="one weight per member (default: equal)")
    ap.add_argument("--choose-weight", type=float, nargs="+", metavar="W",
                    help="choose the first member's weight among these on held-out source identities (mean over "
                         "the source sets of TAR@FAR=1e-2); the other members share the rest")
    ap.add_argument("--config", default="prior", help="training config whose held-out identities calibrate")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting of that config (e.g. data.root=...)")
    ap.add_argument("--far", type=float, default=1e-3, help="false-accept rate of the threshold (default 1e-3)")
    ap.add_argument("--half", action="store_true", help="store the members facemeta trained as float16")
    ap.add_argument("--meta", type=Path, help="a JSON file of extra meta to record (e.g. the card's provenance)")
    args = ap.parse_args(argv)

    import json

    from facemeta.models.ensemble import ensemble_of, save_ensemble
    from facemeta.train.config import load_config

    if len(args.members) < 2:
        ap.error("an ensemble needs two or more members")
    built = [member_model(m) for m in args.members]
    model = ensemble_of([b[0] for b in built], [b[1] for b in built], args.weights)
    cfg = load_config(args.config, overrides=args.overrides)
    crops, ids, counts = heldout_faces(cfg, model.chips)
    choice = None
    if args.choose_weight:
        w, scores = choose_weight(model, crops, ids, list(args.choose_weight), cfg.eval.flip)
        rest = (1.0 - w) / (len(built) - 1)
        model = ensemble_of([b[0] for b in built], [b[1] for b in built], [w] + [rest] * (len(built) - 1))
        choice = {"weight": w, "candidates": scores,
                  "rule": "mean over the source sets of TAR@FAR=1e-2 on all pairs of their held-out identities"}
        print(f"weight of the first member: {w} ({json.dumps(scores)})")
    val = {**calibrate(model, crops, ids, args.far, cfg.eval.flip), **counts}
    members = [{"member": spec, "fingerprint": fp, "chip": c, "align_size": s, "weight": m.weight}
               for spec, (_, (c, s), fp), m in zip(args.members, built, model.specs, strict=True)]
    meta = {"method": "ensemble", "members": members, "threshold": val["threshold"], "threshold_far": args.far,
            "validation": val, "calibration_config": args.config,
            # the first member's chip is the checkpoint's own (check_model_meta; the embedder warps every member's)
            "align_chip": model.chips[0][0], "align_size": model.chips[0][1]}
    if choice:
        meta["weight_choice"] = choice
    if args.meta:
        meta.update(json.loads(args.meta.read_text()))
    dst = save_ensemble(model, args.out, meta, half=args.half)
    print(f"wrote {dst}: {model.embedding_size}-d, threshold {val['threshold']:.4f} at FAR {args.far:g} "
          f"(held-out TAR {val[f'tar@far={args.far:g}']:.4f} on {val['n_images']} faces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
