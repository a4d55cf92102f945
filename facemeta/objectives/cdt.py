"""Cross-Domain Triplet loss (Faraki et al., CVPR 2021, "Cross-Domain Similarity Learning for Face
Recognition in Unseen Domains").

The paper's code is not public; the formula follows ../shared/DESIGN.md. From domain i we take
the covariances of the differences of positive pairs (Σ⁺) and of negative pairs (Σ⁻); triplets
(a, p, n) of domain j are then measured in those metrics:

    L_cdt(j | i) = mean over triplets [ (a − p)ᵀ Σ⁺ (a − p) − (a − n)ᵀ Σ⁻ (a − n) + m ]₊

Choices made here (stated because the paper does not fix them for us): every same-identity pair
in domain i's batch is a positive and every cross-identity pair a negative; the triplets of
domain j are all valid (a, p, n) in its batch by default ("all"), or for each (a, p) the negative
with the smallest Σ⁻ distance ("hard"); margin m = 0.5 on unit vectors.
"""

from __future__ import annotations

import torch

DEFAULT_CDT_MARGIN = 0.5


def pair_covariances(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ⁺ and Σ⁻ [E, E]: the mean outer product of the differences of positive / negative pairs.

    Raises ValueError when the batch has no positive pair or no negative pair.
    """
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    upper = torch.triu(torch.ones_like(same), diagonal=1)
    ia, ib = torch.nonzero(same & upper, as_tuple=True)
    ja, jb = torch.nonzero(~same & upper, as_tuple=True)
    if len(ia) == 0 or len(ja) == 0:
        raise ValueError("CDT needs at least one positive and one negative pair in the source domain's batch")
    dpos = embeddings[ia] - embeddings[ib]
    dneg = embeddings[ja] - embeddings[jb]
    return dpos.t() @ dpos / len(dpos), dneg.t() @ dneg / len(dneg)


def _triplets(labels: torch.Tensor) -> torch.Tensor:
    """All valid (a, p, n) index triplets [T, 3] of a labelled batch (a ≠ p same identity, n another)."""
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    valid = (same & ~eye).unsqueeze(2) & (~same).unsqueeze(1)
    return torch.nonzero(valid)


def cross_domain_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, cov_pos: torch.Tensor,
                              cov_neg: torch.Tensor, margin: float = DEFAULT_CDT_MARGIN,
                              mining: str = "all") -> torch.Tensor:
    """L_cdt(j | i) for domain j's batch (`embeddings`, `labels`) in domain i's metrics (Σ⁺, Σ⁻)."""
    if mining not in ("all", "hard"):
        raise ValueError(f"mining must be 'all' or 'hard', not {mining!r}")
    trip = _triplets(labels)
    if len(trip) == 0:
        return embeddings.new_zeros(())
    a, p, n = embeddings[trip[:, 0]], embeddings[trip[:, 1]], embeddings[trip[:, 2]]
    dp = a - p
    dn = a - n
    pos_term = ((dp @ cov_pos) * dp).sum(-1)
    neg_term = ((dn @ cov_neg) * dn).sum(-1)
    if mining == "hard":
        # For each (a, p) keep the negative closest to a in the Σ⁻ metric.
        keys = trip[:, 0] * len(labels) + trip[:, 1]
        uniq, inverse = torch.unique(keys, return_inverse=True)
        hardest = torch.full((len(uniq),), float("inf"), dtype=neg_term.dtype, device=neg_term.device)
        hardest = hardest.scatter_reduce(0, inverse, neg_term, reduce="amin")
        first = torch.zeros(len(uniq), dtype=torch.long, device=keys.device).scatter_reduce(
            0, inverse, torch.arange(len(keys), device=keys.device), reduce="amin", include_self=False)
        return torch.relu(pos_term[first] - hardest + margin).mean()
    return torch.relu(pos_term - neg_term + margin).mean()


def cdt_loss(source_emb: torch.Tensor, source_labels: torch.Tensor, target_emb: torch.Tensor,
             target_labels: torch.Tensor, margin: float = DEFAULT_CDT_MARGIN, mining: str = "all") -> torch.Tensor:
    """Covariances from the source batch (domain i), triplet loss on the target batch (domain j)."""
    cov_pos, cov_neg = pair_covariances(source_emb, source_labels)
    return cross_domain_triplet_loss(target_emb, target_labels, cov_pos, cov_neg, margin, mining)
