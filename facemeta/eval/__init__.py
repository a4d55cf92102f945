"""Evaluation: pair protocols, ROC / TAR@FAR / AUC / 10-fold accuracy / rank-1, and reports."""

from facemeta.eval.metrics import (
    kfold_accuracy,
    rank1,
    roc_auc,
    roc_curve,
    tar_at_far,
    threshold_at_far,
)
from facemeta.eval.pairs import all_pairs, match_pairs, pair_indices, pair_scores

__all__ = ["kfold_accuracy", "rank1", "roc_auc", "roc_curve", "tar_at_far", "threshold_at_far",
           "all_pairs", "match_pairs", "pair_indices", "pair_scores"]
