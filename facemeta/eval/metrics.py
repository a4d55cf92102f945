"""Verification and identification metrics on similarity scores (higher = more alike).

Convention everywhere: a pair is accepted when ``score >= threshold``.
- ROC: one point per distinct score, from (0, 0) at threshold +inf; tied scores move together.
- TAR@FAR: no interpolation between ROC points. The threshold is the lowest one whose false-accept
  rate (share of negative pairs with score >= threshold) is <= the target FAR, and TAR is the share of
  positive pairs accepted there: the best TAR that does not exceed the target FAR on these pairs. With
  fewer than 1/FAR negatives this is the TAR at FAR 0 (every negative rejected); report the number of
  negatives with the figure.
- 10-fold accuracy (LFW / insightface protocol): for each fold the threshold that maximises accuracy on
  the other nine folds is applied to it; mean and (population) std over folds.
- AUC: Mann-Whitney statistic, P(score_pos > score_neg) + ½ P(tie), equal to the trapezoid area of the ROC.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _inputs(scores, same) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(same).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) differ in length")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinity")
    if not y.any() or y.all():
        raise ValueError("need at least one positive and one negative pair")
    return s, y


def _sorted_counts(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct thresholds (descending) with cumulative true / false accepts at each."""
    order = np.argsort(-s, kind="stable")
    ss, yy = s[order], y[order]
    tp = np.cumsum(yy)
    fp = np.cumsum(~yy)
    last = np.r_[np.nonzero(np.diff(ss))[0], ss.size - 1]  # last index of each run of equal scores
    return ss[last], tp[last], fp[last]


def roc_curve(scores, same) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(far, tar, thresholds), starting at (0, 0, +inf); point i accepts scores >= thresholds[i]."""
    s, y = _inputs(scores, same)
    thr, tp, fp = _sorted_counts(s, y)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    far = np.r_[0.0, fp / n_neg]
    tar = np.r_[0.0, tp / n_pos]
    return far, tar, np.r_[np.inf, thr]


def _index_at_far(fp: np.ndarray, n_neg: int, far: float) -> int:
    """Index into the ROC (with the +inf point at 0) of the lowest threshold with FAR <= far."""
    if not 0.0 <= far <= 1.0:
        raise ValueError(f"FAR must be in [0, 1], got {far}")
    allowed = math.floor(far * n_neg * (1 + 1e-12))  # how many negatives may be accepted
    fps = np.r_[0, fp]
    return int(np.searchsorted(fps, allowed, side="right") - 1)


def tar_at_far(scores, same, far: float) -> float:
    """TAR at the lowest threshold whose FAR is <= `far` (no interpolation; see the module docstring)."""
    s, y = _inputs(scores, same)
    thr, tp, fp = _sorted_counts(s, y)
    i = _index_at_far(fp, int((~y).sum()), far)
    return float(np.r_[0, tp][i] / y.sum())


def threshold_at_far(scores, same, far: float) -> float:
    """Threshold (accept when score >= it) giving the largest TAR with FAR <= `far` on these pairs.

    It lies halfway between the lowest accepted score and the next lower score, so the same pairs
    are accepted but the decision boundary does not sit on a calibration sample. When no pair can
    be accepted, it is just above the highest score.
    """
    s, y = _inputs(scores, same)
    thr, tp, fp = _sorted_counts(s, y)
    i = _index_at_far(fp, int((~y).sum()), far)
    if i == 0:
        return float(np.nextafter(thr[0], np.inf))
    lo = thr[i] if i < thr.size else -np.inf  # next lower distinct score after thr[i - 1]
    return _between(thr[i - 1], lo)


def rates_at_threshold(scores, same, threshold: float) -> tuple[float, float]:
    """(TAR, FAR) when pairs with score >= `threshold` are accepted: how a fixed threshold fares on a new set."""
    s, y = _inputs(scores, same)
    accept = s >= threshold
    return float(accept[y].mean()), float(accept[~y].mean())


def _between(accepted: float, rejected: float) -> float:
    """A threshold that accepts `accepted` and rejects the lower `rejected` (midpoint)."""
    if not np.isfinite(rejected):
        return float(accepted)
    mid = (accepted + rejected) / 2.0
    return float(mid if rejected < mid <= accepted else accepted)


def roc_auc(scores, same) -> float:
    """Area under the ROC: P(positive scores above negative) with ties counted one half."""
    s, y = _inputs(scores, same)
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    rank_sum = float(avg_rank[inverse][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def best_accuracy_threshold(scores, same) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy of ``score >= threshold`` on these pairs."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(same).astype(bool).ravel()
    if s.size == 0:
        raise ValueError("no pairs to choose a threshold on")
    order = np.argsort(-s, kind="stable")
    ss, yy = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(ss))[0], ss.size - 1]
    tp = np.r_[0, np.cumsum(yy)[last]]
    fp = np.r_[0, np.cumsum(~yy)[last]]
    n_neg = int((~y).sum())
    correct = tp + (n_neg - fp)  # option k accepts the k highest distinct scores
    k = int(np.argmax(correct))
    distinct = ss[last]
    if k == 0:
        thr = float(np.nextafter(distinct[0], np.inf))
    else:
        thr = _between(distinct[k - 1], distinct[k] if k < distinct.size else -np.inf)
    return thr, float(correct[k] / s.size)


def kfold_accuracy(scores, same, folds: int | Sequence[int] | np.ndarray = 10
                   ) -> tuple[float, float, np.ndarray]:
    """10-fold verification accuracy: each fold is scored at the best threshold of the other folds.

    `folds` is a number of contiguous folds (as insightface's KFold without shuffling, the LFW
    pairs.txt layout) or one fold id per pair (e.g. Pair.fold). Returns (mean, std, thresholds per fold).
    """
    s, y = _inputs(scores, same)
    if isinstance(folds, (int, np.integer)):
        if folds < 2 or folds > s.size:
            raise ValueError(f"need 2 <= folds <= number of pairs, got {folds}")
        fold_ids = np.arange(s.size) * int(folds) // s.size
    else:
        fold_ids = np.asarray(folds).ravel()
        if fold_ids.size != s.size:
            raise ValueError("one fold id per pair is needed")
    accs, thrs = [], []
    for f in np.unique(fold_ids):
        test = fold_ids == f
        if test.all():
            raise ValueError("need at least two folds")
        thr, _ = best_accuracy_threshold(s[~test], y[~test])
        accs.append(float(np.mean((s[test] >= thr) == y[test])))
        thrs.append(thr)
    return float(np.mean(accs)), float(np.std(accs)), np.asarray(thrs)


def rank1(gallery_emb, gallery_ids, probe_emb, probe_ids, chunk: int = 2048) -> float:
    """Share of probes whose most cosine-similar gallery entry has their identity (closed-set rank-1).

    Probes of identities absent from the gallery count as misses.
    """
    g = np.asarray(gallery_emb, dtype=np.float32)
    p = np.asarray(probe_emb, dtype=np.float32)
    gid, pid = np.asarray(gallery_ids), np.asarray(probe_ids)
    if g.ndim != 2 or p.ndim != 2 or g.shape[1] != p.shape[1]:
        raise ValueError("gallery and probe embeddings must be [N, E] with the same E")
    if len(g) != len(gid) or len(p) != len(pid):
        raise ValueError("one identity per embedding is needed")
    if len(g) == 0 or len(p) == 0:
        raise ValueError("rank-1 needs a non-empty gallery and probe set")
    g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    hits = 0
    for i in range(0, len(p), chunk):
        best = np.argmax(p[i:i + chunk] @ g.T, axis=1)
        hits += int(np.sum(gid[best] == pid[i:i + chunk]))
    return hits / len(p)


def thin_curve(far: np.ndarray, tar: np.ndarray, points: int = 400, far_min: float = 1e-6
               ) -> tuple[np.ndarray, np.ndarray]:
    """A ROC reduced to about `points` points, log-spaced in FAR (for plots and JSON), keeping its shape."""
    far, tar = np.asarray(far), np.asarray(tar)
    grid = np.logspace(np.log10(max(far_min, far[far > 0].min() if (far > 0).any() else far_min)), 0, points)
    idx = np.unique(np.clip(np.searchsorted(far, grid, side="right") - 1, 0, far.size - 1))
    return far[idx], tar[idx]
