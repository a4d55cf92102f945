"""`facemeta eval CHECKPOINT --set lfw|yaleb|mfr2|orl|PATH`: verification and rank-1 of a trained model.

LFW is measured on its pairs.txt (10 folds of 300 + 300 pairs; --folds picks some, e.g. 6-10, the
folds whose people the presets never train on) and MFR2 on its pairs.txt (or every pair with
--protocol all); YaleB, ORL and image folders on every pair of their images. Faces are aligned
(MTCNN, cached under the cache folder) at the size the model was trained with; for an ensemble
(facemeta.models.ensemble) onto each member's chip, and the faces aligned on every chip are scored.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `eval` and its options."""
    p = subparsers.add_parser(
        "eval", help="measure a model on a face set (TAR@FAR, AUC, 10-fold accuracy, rank-1)",
        description="Evaluate a checkpoint on a shared set (lfw, yaleb, mfr2, orl) or on a folder of images "
                    "(one sub-folder per identity) or an aligned manifest CSV: TAR at FAR 1e-2 and 1e-3, "
                    "ROC AUC, 10-fold accuracy on pair lists, rank-1 identification. An ensemble is evaluated on "
                    "each member's own chip of the same faces (a set or a folder: an aligned manifest holds one chip).")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="model checkpoint (.safetensors): a model or an ensemble (each member's chip is aligned)")
    p.add_argument("--set", dest="set_name", required=True, metavar="lfw|yaleb|mfr2|orl|PATH",
                   help="a shared set, an image folder (identity sub-folders) or an aligned manifest .csv")
    p.add_argument("--protocol", choices=["auto", "pairs", "all"], default="auto",
                   help="pairs: the set's pairs.txt (lfw, mfr2); all: every pair of images; auto: pairs where "
                        "the set has a list")
    p.add_argument("--folds", help="pair-list folds to use, e.g. 6-10 or 1,3 (default: all)")
    p.add_argument("--limit-per-identity", type=int, help="keep the first N images of each identity (all pairs)")
    p.add_argument("--no-flip", action="store_true", help="no flip test-time augmentation")
    p.add_argument("--data", help="data folder holding lfw/, yaleb/, mfr2/, orl/ (default: $FACEMETA_DATA or ../shared/data)")
    p.add_argument("--cache", help="cache folder for aligned faces (default: $FACEMETA_CACHE or ~/.cache/facemeta)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument("--plot", metavar="PNG", help="write the ROC curve to this PNG file")
    p.set_defaults(func=run)


def parse_folds(text: str | None) -> set[int] | None:
    """'6-10' or '1,3,5' -> {6, 7, 8, 9, 10} / {1, 3, 5}; None -> None (all folds)."""
    from facemeta.errors import ConfigError

    if not text:
        return None
    folds: set[int] = set()
    try:
        for part in text.split(","):
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                folds.update(range(lo, hi + 1))
            else:
                folds.add(int(part))
    except ValueError:
        raise ConfigError(f"--folds: expected numbers like 6-10 or 1,3, got {text!r}") from None
    if not folds or min(folds) < 1 or max(folds) > 10:
        raise ConfigError(f"--folds: fold numbers are 1..10, got {text!r}")
    return folds


def _format(res: dict) -> str:
    """Human-readable summary lines."""
    lines = [f"set: {res['set']}  ({res['n_images']} images, {res['n_identities']} identities, "
             f"{res['n_pairs']} pairs: {res['n_pos']} same / {res['n_neg']} different)"]
    for key in ("tar@far=1e-2", "tar@far=1e-3"):
        if key in res:
            note = "" if res.get(key + "_resolved", True) else "  (too few negatives to resolve)"
            lines.append(f"{key}: {100 * res[key]:.2f}%{note}")
    lines.append(f"auc: {res['auc']:.4f}")
    if "acc" in res:
        lines.append(f"10-fold accuracy: {100 * res['acc']:.2f} ± {100 * res['acc_std']:.2f}%")
    if res.get("rank1") is not None:
        lines.append(f"rank-1: {100 * res['rank1']:.2f}% ({res['n_probes']} probes)")
    if res.get("alignment_missing"):
        lines.append(f"images that could not be aligned: {res['alignment_missing']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Align the set (cached), embed, score; print metrics (text or JSON), optionally plot the ROC."""
    from facemeta.checks import check_device
    from facemeta.embedder import check_model_meta
    from facemeta.errors import ConfigError
    from facemeta.eval.benchmark import embed_chip_rows, evaluate_rows
    from facemeta.eval.sets import load_eval_chip_rows, load_eval_rows
    from facemeta.models.ensemble import load_model

    args.device = check_device(args.device)
    model, meta = load_model(args.checkpoint, map_location=args.device)  # a single model or an ensemble
    model.to(args.device)
    settings = check_model_meta(meta, args.checkpoint)
    chips = getattr(model, "chips", None)
    query = (args.protocol, parse_folds(args.folds), args.limit_per_identity, args.data, args.cache)
    if chips:  # an ensemble: the set aligned onto each member's chip, the faces every chip has
        per_chip, pairs, label = load_eval_chip_rows(args.set_name, chips, *query)
        rows = per_chip[0]
    else:
        rows, pairs, label = load_eval_rows(args.set_name, settings["align_size"], *query,
                                            chip=settings["align_chip"])
    if len({r.identity for r in rows}) < 2 and pairs is None:
        raise ConfigError(f"--set {args.set_name}: need images of at least two identities")
    try:
        if chips:
            t0 = time.perf_counter()
            emb = embed_chip_rows(model, per_chip, flip=not args.no_flip)
            seconds = time.perf_counter() - t0
            res = evaluate_rows(model, rows, pairs=pairs, flip=not args.no_flip, embeddings=emb)
            res["embed_seconds"], res["images_per_s"] = seconds, len(rows) / seconds if seconds > 0 else None
        else:
            res = evaluate_rows(model, rows, pairs=pairs, flip=not args.no_flip)
    except ValueError as exc:
        raise ConfigError(f"cannot evaluate {args.set_name}: {exc}") from exc
    res["set"] = label
    res["checkpoint"] = str(args.checkpoint)
    res["method"] = meta.get("method")
    roc = res.pop("roc", None)
    if args.plot and roc:
        from facemeta.eval.report import plot_roc

        plot_roc({f"{Path(args.checkpoint).stem} ({res.get('auc', 0):.3f} AUC)": (roc["far"], roc["tar"])},
                 args.plot, title=f"ROC: {label}")
        res["plot"] = str(args.plot)
    print(json.dumps(res) if args.json else _format(res))
    return 0
