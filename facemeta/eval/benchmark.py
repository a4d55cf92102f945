"""Evaluate a model on a set of aligned rows: verification (pair list or all pairs) and rank-1 identification."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import cv2
import numpy as np

from facemeta.data.manifest import ManifestRow
from facemeta.errors import ImageReadError
from facemeta.eval.metrics import (
    kfold_accuracy,
    rank1,
    rates_at_threshold,
    roc_auc,
    roc_curve,
    tar_at_far,
    thin_curve,
    threshold_at_far,
)
from facemeta.eval.pairs import all_pairs, match_pairs, pair_scores
from facemeta.models.backbone import FaceEmbeddingModel, embed

FAR_LEVELS = (1e-2, 1e-3)


def far_key(far: float) -> str:
    """'tar@far=1e-3' style key for a FAR level."""
    exp = math.log10(far)
    return f"tar@far=1e{round(exp)}" if abs(exp - round(exp)) < 1e-9 else f"tar@far={far:g}"


def read_aligned(path: str) -> np.ndarray:
    """Read an aligned face as RGB uint8 (grey files become three equal channels)."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ImageReadError(f"cannot read aligned image: {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _batches(rows: Sequence[ManifestRow], size: int) -> Iterator[list[np.ndarray]]:
    for i in range(0, len(rows), size):
        yield [read_aligned(r.path) for r in rows[i:i + size]]


def embed_rows(model: FaceEmbeddingModel, rows: Sequence[ManifestRow], flip: bool = True,
               batch_size: int = 64, channels_last: bool = True) -> np.ndarray:
    """Embed the aligned images of `rows` (read batch by batch, resized to the model's size) -> [N, E]."""
    parts = [embed(model, faces, batch_size=batch_size, flip=flip, channels_last=channels_last)
             for faces in _batches(rows, batch_size)]
    if not parts:
        return np.zeros((0, model.config.embedding_size), np.float32)
    return np.concatenate(parts)


def embed_chip_rows(model, rows_per_chip: Sequence[Sequence[ManifestRow]], flip: bool = True,
                    batch_size: int = 64) -> np.ndarray:
    """An ensemble's (facemeta.models.ensemble) unit vectors of faces aligned onto each member's chip:
    ``rows_per_chip[k][i]`` is face i on member k's chip (same faces, same order); read batch by batch -> [N, E]."""
    counts = {len(rows) for rows in rows_per_chip}
    if len(counts) != 1:
        raise ValueError(f"every chip needs the same faces; got {sorted(counts)} rows")
    n = counts.pop()
    parts = [model.embed([[read_aligned(r.path) for r in rows[i:i + batch_size]] for rows in rows_per_chip],
                         flip=flip, batch_size=batch_size) for i in range(0, n, batch_size)]
    if not parts:
        return np.zeros((0, model.embedding_size), np.float32)
    return np.concatenate(parts)


def describe_model(model) -> dict[str, Any]:
    """The model's backbone and input size for reports; an ensemble's members joined by '+'."""
    if hasattr(model, "chips"):
        return {"image_size": [m.config.image_size for m in model.members],
                "backbone": "+".join(m.config.backbone for m in model.members)}
    return {"image_size": model.config.image_size, "backbone": model.config.backbone}


def identification_split(identities: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(gallery, probe) row indices: the first row of each identity is enrolled, the others probe."""
    seen: set[str] = set()
    gallery, probe = [], []
    for i, ident in enumerate(identities):
        (probe if ident in seen else gallery).append(i)
        seen.add(ident)
    return np.asarray(gallery, dtype=np.int64), np.asarray(probe, dtype=np.int64)


def verification_metrics(scores: np.ndarray, same: np.ndarray, folds: np.ndarray | int | None = None,
                         far_levels: Sequence[float] = FAR_LEVELS,
                         thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """TAR@FAR, thresholds, AUC (and k-fold accuracy when `folds` is given) of scored pairs.

    `thresholds` (name -> fixed threshold, e.g. one calibrated on other data) adds the TAR and FAR
    each one gives on these pairs under ``at_threshold``.
    """
    same = np.asarray(same, dtype=bool)
    out: dict[str, Any] = {"n_pairs": int(same.size), "n_pos": int(same.sum()), "n_neg": int((~same).sum())}
    for far in far_levels:
        out[far_key(far)] = tar_at_far(scores, same, far)
        out[far_key(far).replace("tar@", "threshold@")] = threshold_at_far(scores, same, far)
        out[far_key(far) + "_resolved"] = bool(far * out["n_neg"] >= 1)  # enough negatives for this FAR
    out["auc"] = roc_auc(scores, same)
    if thresholds:
        out["at_threshold"] = {}
        for name, thr in thresholds.items():
            tar, far = rates_at_threshold(scores, same, thr)
            out["at_threshold"][name] = {"threshold": float(thr), "tar": tar, "far": far}
    if folds is not None:
        mean, std, _ = kfold_accuracy(scores, same, folds)
        out["acc"], out["acc_std"] = mean, std
    far, tar, _ = roc_curve(scores, same)
    f, t = thin_curve(far, tar)
    out["roc"] = {"far": [float(v) for v in f], "tar": [float(v) for v in t]}
    return out


def evaluate_rows(model: FaceEmbeddingModel, rows: Sequence[ManifestRow], pairs: Sequence | None = None,
                  flip: bool = True, batch_size: int = 64, channels_last: bool = True,
                  far_levels: Sequence[float] = FAR_LEVELS, thresholds: dict[str, float] | None = None,
                  embeddings: np.ndarray | None = None) -> dict[str, Any]:
    """Embed aligned `rows` and measure verification and rank-1 identification; returns a JSON-ready dict.
    An ensemble (its members read other chips than `rows` hold) needs `embeddings` (:func:`embed_chip_rows`).

    Verification uses `pairs` (objects with a, b, same, fold, e.g. LFW pairs.txt) when given, with
    10-fold accuracy over the pairs' folds, else every pair of the rows (same identity = positive).
    Rank-1: the first image of each identity is enrolled, the others are probes (cosine similarity).
    Images are read with OpenCV and resized to the model's input size; flip averages each face with
    its mirror (insightface's test-time augmentation). `thresholds`: see :func:`verification_metrics`.
    `embeddings` [N, E] of the rows, when the caller already has them, are used instead of embedding again.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("no rows to evaluate")
    t0 = time.perf_counter()
    if embeddings is None:
        if hasattr(model, "chips"):
            raise ValueError("an ensemble reads one chip per member: embed its rows with embed_chip_rows first")
        emb = embed_rows(model, rows, flip=flip, batch_size=batch_size, channels_last=channels_last)
    elif len(embeddings) != len(rows):
        raise ValueError(f"{len(embeddings)} embeddings for {len(rows)} rows")
    else:
        emb = np.asarray(embeddings, dtype=np.float32)
    t_embed = time.perf_counter() - t0
    ids = np.asarray([r.identity for r in rows])
    result: dict[str, Any] = {"n_images": len(rows), "n_identities": int(np.unique(ids).size),
                              "flip": bool(flip), **describe_model(model)}
    if pairs is not None:
        m = match_pairs(rows, pairs)
        if m.ia.size == 0 or m.same.all() or not m.same.any():
            raise ValueError(f"{m.ia.size} of {len(pairs)} pairs have both images among the {len(rows)} rows "
                             f"({int(m.same.sum())} same, {int((~m.same).sum())} different); "
                             "verification needs both kinds")
        scores = pair_scores(emb, m.ia, m.ib)
        folds = m.fold if np.unique(m.fold).size >= 2 else 10
        result["protocol"] = "pairs"
        result["pairs_missing"] = len(m.missing)
        result.update(verification_metrics(scores, m.same, folds, far_levels, thresholds))
    else:
        ia, ib, same = all_pairs(ids)
        if same.all() or not same.any():
            raise ValueError(f"all pairs of {len(rows)} rows of {result['n_identities']} identities are "
                             f"{'same' if same.all() else 'different'}-identity pairs; verification needs both")
        scores = pair_scores(emb, ia, ib)
        del ia, ib
        result["protocol"] = "all_pairs"
        result.update(verification_metrics(scores, same, None, far_levels, thresholds))
    gallery, probe = identification_split(ids)
    if probe.size:
        result["rank1"] = rank1(emb[gallery], ids[gallery], emb[probe], ids[probe])
        result["n_probes"] = int(probe.size)
    else:
        result["rank1"], result["n_probes"] = None, 0
    embedded_here = embeddings is None
    result["embed_seconds"] = t_embed if embedded_here else None
    result["images_per_s"] = len(rows) / t_embed if embedded_here and t_embed > 0 else None
    return result
