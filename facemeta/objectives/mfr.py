"""Meta Face Recognition losses (Guo et al., CVPR 2020, "Learning Meta Face Recognition in Unseen Domains").

The paper's code is not public; the formulas follow ../shared/DESIGN.md and every constant
is an argument. Inputs are L2-normalised embeddings, so squared distances lie in [0, 4] and
similarities in [-1, 1].

Choices made here (not given by the paper, so stated):
- ``tau_p = 0.5``, ``tau_n = 0.3``: a positive pair below cosine 0.5 and a negative pair above
  cosine 0.3 count as hard; with random initial embeddings almost every positive is hard and
  few negatives are, so early training mostly pulls pairs together.
- Empty hard sets contribute zero (the term's mean over an empty set is defined as 0).
- Soft classification is a cosine classifier (normalised weights, scale ``s = 30``) over the
  global identity labels of the source domains, without an additive margin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TAU_P = 0.5
DEFAULT_TAU_N = 0.3
DEFAULT_SOFT_SCALE = 30.0


def hard_pair_attention_loss(gallery: torch.Tensor, probe: torch.Tensor,
                             tau_p: float = DEFAULT_TAU_P, tau_n: float = DEFAULT_TAU_N) -> torch.Tensor:
    """L_hp over B identity pairs: row i of `gallery` and of `probe` show the same identity.

    M = F_g F_pᵀ; hard positives are i with M_ii < tau_p, hard negatives (i, j), i ≠ j, with
    M_ij > tau_n. L_hp = mean over hard positives of ‖g_i − p_i‖² / 2 − mean over hard
    negatives of ‖g_i − p_j‖² / 2.
    """
    if gallery.shape != probe.shape or gallery.dim() != 2:
        raise ValueError(f"gallery and probe must both be [B, E], got {tuple(gallery.shape)} and {tuple(probe.shape)}")
    sim = gallery @ probe.t()
    dist2 = (gallery.unsqueeze(1) - probe.unsqueeze(0)).pow(2).sum(-1)
    eye = torch.eye(len(gallery), dtype=torch.bool, device=gallery.device)
    hard_pos = eye & (sim < tau_p)
    hard_neg = ~eye & (sim > tau_n)
    loss = gallery.new_zeros(())
    if hard_pos.any():
        loss = loss + dist2[hard_pos].mean() / 2
    if hard_neg.any():
        loss = loss - dist2[hard_neg].mean() / 2
    return loss


def hard_pairs(gallery: torch.Tensor, probe: torch.Tensor, tau_p: float = DEFAULT_TAU_P,
               tau_n: float = DEFAULT_TAU_N) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the hard-positive indices [P] and hard-negative index pairs [N, 2] (for logging and tests)."""
    sim = gallery @ probe.t()
    eye = torch.eye(len(gallery), dtype=torch.bool, device=gallery.device)
    pos = torch.nonzero(eye & (sim < tau_p))[:, 0]
    neg = torch.nonzero(~eye & (sim > tau_n))
    return pos, neg


def domain_alignment_loss(embeddings: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
    """L_da = 1/n Σ_k ‖c_k − mean_k c_k‖², c_k the mean embedding of domain k in the batch."""
    present = torch.unique(domains)
    if len(present) < 2:
        return embeddings.new_zeros(())
    centres = torch.stack([embeddings[domains == d].mean(0) for d in present])
    return (centres - centres.mean(0, keepdim=True)).pow(2).sum(-1).mean()


class CosineSoftmaxHead(nn.Module):
    """Scaled cosine-softmax classifier over identity labels; its loss is CE(s · cos(f, w_y)).

    The same contract as the margin heads (facemeta.objectives.margins): ``forward(emb, labels)`` returns
    logits [B, C] (the labels are not needed: no margin) and ``loss(emb, labels)`` their cross-entropy."""

    def __init__(self, embedding_size: int, num_classes: int, scale: float = DEFAULT_SOFT_SCALE):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scaled cosine logits [B, C]."""
        return self.scale * F.normalize(embeddings, dim=1) @ F.normalize(self.weight, dim=1).t()

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled cosine logits [B, C] (`labels` accepted for the heads' shared contract, unused)."""
        return self.logits(embeddings)

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the scaled cosine logits."""
        return F.cross_entropy(self(embeddings, labels), labels)


def mfr_domain_loss(gallery: torch.Tensor, probe: torch.Tensor, labels: torch.Tensor,
                    classifier: CosineSoftmaxHead, tau_p: float = DEFAULT_TAU_P,
                    tau_n: float = DEFAULT_TAU_N) -> dict[str, torch.Tensor]:
    """L_hp + L_cls for one domain's B gallery/probe pairs (`labels` [B] are their global identities)."""
    hp = hard_pair_attention_loss(gallery, probe, tau_p, tau_n)
    cls = classifier.loss(torch.cat([gallery, probe]), torch.cat([labels, labels]))
    return {"hp": hp, "cls": cls, "total": hp + cls}
