"""Distillation from a fixed teacher's embeddings (the prior's), added to any method's loss.

Two terms, each with its own weight (0 leaves it out):
- embedding match: 1 - cos(P s, t), with P a learned linear projection from the student's embedding size to
  the teacher's (identity-initialised when the sizes agree, so a student that starts as the teacher starts
  at zero loss), averaged over the batch;
- similarity structure: the mean squared difference between the batch's pairwise cosine similarities under the
  student and under the teacher (off-diagonal pairs), which asks the student to rank pairs as the teacher does
  without matching its coordinates (relational distillation).
Rows whose teacher embedding is unknown (NaN: the teacher's chip could not be made) take no part in either term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DistillationLoss(nn.Module):
    """``loss(student [B, E], teacher [B, T]) -> (weighted total, embedding term, similarity term)``."""

    def __init__(self, student_size: int, teacher_size: int, weight: float = 1.0, pair_weight: float = 0.0):
        super().__init__()
        if weight < 0 or pair_weight < 0:
            raise ValueError("distillation weights must be >= 0")
        self.weight, self.pair_weight = float(weight), float(pair_weight)
        self.projection = nn.Linear(student_size, teacher_size, bias=False)
        with torch.no_grad():
            if student_size == teacher_size:
                self.projection.weight.copy_(torch.eye(teacher_size))
            else:
                nn.init.orthogonal_(self.projection.weight)

    def forward(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        valid = torch.isfinite(teacher).all(dim=1)
        zero = student.sum() * 0.0
        if int(valid.sum()) < 2:
            return zero, zero, zero
        s = student[valid].float()
        t = F.normalize(teacher[valid].float(), dim=1)
        match = (1.0 - F.cosine_similarity(self.projection(s), t, dim=1)).mean()
        su = F.normalize(s, dim=1)
        off = ~torch.eye(len(su), dtype=torch.bool, device=su.device)
        structure = ((su @ su.T - t @ t.T)[off] ** 2).mean()
        return self.weight * match + self.pair_weight * structure, match.detach(), structure.detach()
