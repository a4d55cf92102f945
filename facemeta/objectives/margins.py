"""Additive-margin softmax heads, as in insightface: ArcFace (cos(θ + m)) and CosFace (cos θ − m).

Both normalise the embeddings and the class weights, so the logits are s·cos θ_j; only the target
class logit gets the margin. Labels of -1 are "no label" (insightface's convention for partial FC):
no margin, ignored by the loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from facemeta.errors import ConfigError
from facemeta.registry import Registry

# The margin heads a config may name (``loss.head``), registered where each is defined; the config validation and
# the Trainer read this one registry.
MARGIN_HEADS: Registry[type[nn.Module]] = Registry("margin head", error=ConfigError)


class _MarginHead(nn.Module):
    """Shared part: a class-weight matrix [C, E] (normal init, std 0.01 as insightface) and the loss."""

    def __init__(self, embedding_size: int, num_classes: int, s: float):
        super().__init__()
        if num_classes < 1 or embedding_size < 1:
            raise ValueError("embedding_size and num_classes must be positive")
        self.embedding_size, self.num_classes, self.s = int(embedding_size), int(num_classes), float(s)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.embedding_size))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        """cos θ [B, C] between normalised embeddings and normalised class weights."""
        return F.linear(F.normalize(emb, dim=1), F.normalize(self.weight, dim=1)).clamp(-1.0, 1.0)

    def margin_target(self, cos_t: torch.Tensor) -> torch.Tensor:
        """The target-class cosine with the margin applied (subclasses)."""
        raise NotImplementedError

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Embeddings [B, E] and labels [B] -> scaled logits [B, C] with the margin on each target class."""
        if emb.dim() != 2 or emb.shape[1] != self.embedding_size:
            raise ValueError(f"expected embeddings [B, {self.embedding_size}], got {tuple(emb.shape)}")
        labels = labels.long().view(-1)
        if labels.numel() != emb.shape[0]:
            raise ValueError("one label per embedding is needed")
        if bool(((labels < -1) | (labels >= self.num_classes)).any()):
            raise ValueError(f"labels must be in [0, {self.num_classes}) (or -1 for none)")
        cos = self.cosine(emb)
        rows = torch.nonzero(labels != -1, as_tuple=True)[0]
        if rows.numel():
            cols = labels[rows]
            target = self.margin_target(cos[rows, cols])
            cos = cos.index_put((rows, cols), target)  # out of place: keeps autograd simple
        return cos * self.s

    def loss(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the margin logits (labels of -1 ignored)."""
        return F.cross_entropy(self(emb, labels), labels.long().view(-1), ignore_index=-1)

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, s={self.s}"


@MARGIN_HEADS.register("arcface")
class ArcFaceHead(_MarginHead):
    """ArcFace (Deng et al., CVPR 2019): target logit s·cos(θ + m), insightface defaults s=64, m=0.5.

    As in insightface's original ArcFace, cos(θ + m) is only used while θ + m < π (cos θ > cos(π − m));
    beyond that, where cos(θ + m) would stop decreasing, the target logit is cos θ − m·sin(m)
    (CosFace-like, keeps the function monotonic). With ``easy_margin`` the margin is only applied
    where cos θ > 0.
    """

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5,
                 easy_margin: bool = False):
        super().__init__(embedding_size, num_classes, s)
        self.m, self.easy_margin = float(m), bool(easy_margin)
        self.cos_m, self.sin_m = math.cos(self.m), math.sin(self.m)
        self.th = math.cos(math.pi - self.m)
        self.mm = math.sin(math.pi - self.m) * self.m

    def margin_target(self, cos_t: torch.Tensor) -> torch.Tensor:
        """cos(θ + m) = cos θ cos m − sin θ sin m, with insightface's threshold / easy-margin rule."""
        sin_t = torch.sqrt((1.0 - cos_t * cos_t).clamp_min(1e-9))
        phi = cos_t * self.cos_m - sin_t * self.sin_m
        if self.easy_margin:
            return torch.where(cos_t > 0, phi, cos_t)
        return torch.where(cos_t > self.th, phi, cos_t - self.mm)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", m={self.m}, easy_margin={self.easy_margin}"


@MARGIN_HEADS.register("cosface")
class CosFaceHead(_MarginHead):
    """CosFace / large-margin cosine loss (Wang et al., CVPR 2018): target logit s·(cos θ − m); s=64, m=0.4."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.4):
        super().__init__(embedding_size, num_classes, s)
        self.m = float(m)

    def margin_target(self, cos_t: torch.Tensor) -> torch.Tensor:
        """cos θ − m."""
        return cos_t - self.m

    def extra_repr(self) -> str:
        return super().extra_repr() + f", m={self.m}"

