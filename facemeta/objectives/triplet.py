"""Triplet loss on unit vectors, with batch-hard or batch-all mining (Hermans et al., 2017).

Distances are squared Euclidean between L2-normalised embeddings (d = 2 − 2 cos, in [0, 4]), as
FaceNet uses them with margin 0.2. The inputs are normalised here, so raw embeddings work too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pairwise_sq_dist(emb: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [B, B] between unit vectors (2 − 2·cos, clamped at 0)."""
    return (2.0 - 2.0 * emb @ emb.t()).clamp_min(0.0)


def triplet_loss(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.2,
                 mining: str = "batch_hard") -> torch.Tensor:
    """Mean hinge [d(a, p) − d(a, n) + margin]₊ over mined triplets of a labelled batch.

    - ``batch_hard``: for each anchor that has a positive and a negative in the batch, its farthest
      positive and its nearest negative; the mean is over those anchors.
    - ``all``: every valid (a, p, n); the mean is over the triplets with a positive loss (averaging
      over all triplets would drown the signal in easy zeros), 0 when none is active.
    A batch without any valid triplet gives a zero that is still connected to the graph.
    """
    if emb.dim() != 2:
        raise ValueError(f"expected embeddings [B, E], got {tuple(emb.shape)}")
    labels = labels.view(-1)
    if labels.numel() != emb.shape[0]:
        raise ValueError("one label per embedding is needed")
    emb = F.normalize(emb, dim=1)
    dist = _pairwise_sq_dist(emb)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=emb.device)
    pos_mask, neg_mask = same & ~eye, ~same
    zero = emb.sum() * 0.0
    if mining == "batch_hard":
        valid = pos_mask.any(1) & neg_mask.any(1)
        if not bool(valid.any()):
            return zero
        hardest_pos = dist.masked_fill(~pos_mask, float("-inf")).amax(1)
        hardest_neg = dist.masked_fill(~neg_mask, float("inf")).amin(1)
        return F.relu(hardest_pos - hardest_neg + margin)[valid].mean()
    if mining == "all":
        # [a, p, n] = d(a, p) − d(a, n) + margin, valid where p is a positive and n a negative of a.
        cube = dist.unsqueeze(2) - dist.unsqueeze(1) + margin
        valid = pos_mask.unsqueeze(2) & neg_mask.unsqueeze(1)
        losses = F.relu(cube[valid])
        active = losses > 0
        if not bool(active.any()):
            return zero
        return losses[active].mean()
    raise ValueError(f"unknown mining '{mining}' (use 'batch_hard' or 'all')")
