"""The losses `facemeta adapt` fits the tail with (facemeta.train.adapt): prototype CosFace over the k labelled
people, with class centres that need no weights (so the same loss serves as the inner loop of meta-training,
facemeta.train.adapt_episodes).

Which centres (AdaptSettings.centres):
- ``batch``: each person's mean embedding in the current step, every photo classified against them (the default);
- ``start``: the same means taken once, before any step (fixed targets);
- ``enrolled``: each person's mean over their ENROLMENT photos only, in the current step and detached, and only
  the NEW-domain photos classified against them (a person without enrolment photos: the mean of all theirs).
  This is the loss of the cross-domain pairs the benchmark scores (an enrolment photo against a new-domain one):
  a model that already separates the k people within each domain (SFace: the ``batch`` loss is near zero from the
  first step) still has a new-domain photo far from its own person's enrolment photos, and that is what it pulls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CENTRES = ("batch", "start", "enrolled")


def class_centres(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each person's mean embedding, detached and renormalised -> [k, E] (labels 0..k-1)."""
    onehot = F.one_hot(labels, int(labels.max()) + 1).to(emb.dtype)
    return F.normalize((onehot.t() @ emb.detach()) / onehot.sum(0).clamp(min=1)[:, None], dim=1)


def prototype_cosface_loss(emb: torch.Tensor, labels: torch.Tensor, scale: float, margin: float,
                           centres: torch.Tensor | None = None) -> torch.Tensor:
    """CosFace over the people of a batch with class centres `centres` [k,E] (default: each person's mean
    embedding in this batch, :func:`class_centres`): cross-entropy of s·(cos(e, c_j) − m·[j = y]).
    Unit embeddings [N,E], labels [N] (0..k-1; k = len(centres) when given)."""
    k = int(labels.max()) + 1 if centres is None else len(centres)
    onehot = F.one_hot(labels, k).to(emb.dtype)
    centres = class_centres(emb, labels) if centres is None else centres
    logits = scale * (emb @ centres.t() - margin * onehot)
    return F.cross_entropy(logits, labels)


def enrolled_centres(emb: torch.Tensor, labels: torch.Tensor, enrolled: torch.Tensor) -> torch.Tensor:
    """Each person's mean over their enrolment photos (`enrolled` [N] bool), detached and renormalised -> [k, E];
    a person with none gets the mean of all their photos."""
    onehot = F.one_hot(labels, int(labels.max()) + 1).to(emb.dtype)
    weights = onehot * enrolled.to(emb.dtype)[:, None]
    weights = torch.where(weights.sum(0, keepdim=True) > 0, weights, onehot)
    return F.normalize((weights.t() @ emb.detach()) / weights.sum(0).clamp(min=1)[:, None], dim=1)


def cross_domain_loss(emb: torch.Tensor, labels: torch.Tensor, enrolled: torch.Tensor, scale: float,
                      margin: float) -> torch.Tensor:
    """The ``enrolled`` loss: CosFace of the new-domain photos (not `enrolled`) against each person's enrolment
    centre (:func:`enrolled_centres`); with no new-domain photo, every photo against those centres."""
    centres = enrolled_centres(emb, labels, enrolled)
    new = ~enrolled
    if not bool(new.any()):
        new = torch.ones_like(enrolled)
    return prototype_cosface_loss(emb[new], labels[new], scale, margin, centres)


def adapt_loss(emb: torch.Tensor, labels: torch.Tensor, centres_kind: str, scale: float, margin: float,
               fixed: torch.Tensor | None = None, enrolled: torch.Tensor | None = None) -> torch.Tensor:
    """One step's loss for AdaptSettings.centres = `centres_kind` (module docstring): `fixed` are the ``start``
    centres, `enrolled` [N] bool marks the enrolment photos (needed by ``enrolled``)."""
    if centres_kind == "enrolled":
        if enrolled is None:
            raise ValueError("centres 'enrolled' needs to know which photos are enrolment photos")
        return cross_domain_loss(emb, labels, enrolled, scale, margin)
    return prototype_cosface_loss(emb, labels, scale, margin, fixed)
