"""MFR's and CDT's losses as the OUTER losses of adaptation episodes (issue 26, item 2): ``adapt-mfr``, ``adapt-cdt``.

The episodes are those of facemeta.train.adapt_episodes (``adapt-maml-fo``): per source domain, the domain's
people in the batch are split into INNER people (what `facemeta adapt` would be given) and OUTER people (the
domain's other people, on whom the adapted model is judged). The INNER loop stays adapt's procedure at run time:
the tail (the last ``TAIL_BLOCKS`` residual blocks and the embedding layer), adapt's prototype CosFace (s 30,
m 0.2) on the inner people's images, plain SGD at ``meta.inner_lr`` for ``meta.inner_steps`` steps, through
facemeta.meta.MAML (first order). What changes is the OUTER loss, taken on the outer people's embeddings AFTER
each domain's own adaptation; the outer gradient of first-order MAML (∇ at each domain's adapted tail, summed
into the start's tail) trains the tail. No outer term reads an inner person's image, of any domain.

Why these losses fit as OUTER losses (and not as inner ones): the inner loop must stay what `adapt` does at run
time (a classification loss over the k labelled people), or the start would be meta-trained for an adaptation it
never gets. MFR's and CDT's losses are metric losses over gallery/probe pairs and across domains: they say what
the adapted model should do for the people it did not adapt on, which is the outer loss's job. Their
classification terms (MFR's cosine softmax, CDT's CosFace over the global source identities) are left out: the
inner loop already is a classification loss, the tail has no classifier weights, and the outer loss of
``adapt-maml-fo`` (the same prototype CosFace on the outer people) is the one these methods are compared with
(its starts lost 6-9 points zero-shot on AR against ERM; benchmarks/results/adapt/README.md).

- ``adapt-mfr``: outer loss = ``meta.hp_weight`` · mean over domains of MFR's hard-pair attention L_hp on the
  domain's outer people (gallery image vs probe image of each person are the two views: F_g, F_p, M = F_g F_pᵀ,
  ``meta.tau_p`` / ``meta.tau_n``), each domain's embeddings at ITS adapted tail, + ``meta.da_weight`` · MFR's
  domain alignment L_da over the outer embeddings of every source domain (each at its own adapted tail): the
  domain centres after adaptation should coincide, as a gallery that holds several domains compares them.
  One domain only: L_da is 0 (facemeta.objectives.mfr).
- ``adapt-cdt``: outer loss = mean over domains j of ``meta.triplet_weight`` · triplet loss (batch-hard, margin
  ``meta.triplet_margin``) + ``meta.cdt_weight`` · mean over the OTHER source domains i of CDT's cross-domain
  triplet loss L_cdt(j | i) (``meta.cdt_margin``, ``meta.cdt_mining``) on domain j's outer people after
  adaptation, where Σᵢ⁺, Σᵢ⁻ come from domain i's OUTER people (gallery and probe images: one positive pair per
  person, the rest negatives) at the start's tail, detached (a constant of the step, as in the ``cdt`` method),
  each scaled to trace E (:func:`unit_trace`; a choice made here). Why: with Σ as the mean outer product of
  differences of unit vectors, (a − p)ᵀ Σ (a − p) is about 1e-3, L_cdt sits at its margin and its gradient is
  nothing (measured from dlib's prior on ORL + Yale B, 8 people each: L_cdt 0.499 at margin 0.5, gradient norm
  0.026 on the tail against 2.2 for the triplet term); at trace E the Σ-distances have the scale of ‖a − p‖², L_cdt
  is 0.25 and its gradient norm 11.5, so the cross-domain term is what trains.
  With one source domain, i = j (the domain's own outer people give the metric).

- ``adapt-mfr-erm``, ``adapt-cdt-erm``: the same outer loss anchored by ERM, as the ``mfr`` and ``cdt`` methods
  weigh their meta-train and meta-test losses: total = ``meta.gamma`` · ERM's loss on every photo of the batch at
  the start (the config's margin head over every source identity; the whole network and the head train) +
  (1 − gamma) · the outer loss after adaptation (its gradient reaches the tail). Why: adapt-mfr and adapt-cdt,
  and adapt-maml-fo before them, lost 2-14 points zero-shot against the ERM start with no classification loss on
  the network (benchmarks/results/adapt/mfr-cdt/), and the statistics variant kept ERM's scores by keeping ERM's
  loss beside its new term (benchmarks/results/adapt/README.md). gamma 1 is ERM's loss exactly.

adapt-mfr and adapt-cdt train the tail only (the front runs without gradient, as in adapt-maml-fo); k = half the domain's people in
the batch, drawn by facemeta.train.adapt_episodes.inner_outer. Registered in facemeta.train.methods; presets
facemeta/configs/adapt-mfr.yaml, adapt-cdt.yaml, adapt-mfr-erm.yaml and adapt-cdt-erm.yaml (adapt-maml-fo.yaml's
settings, the method changed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from facemeta.objectives.cdt import cross_domain_triplet_loss, pair_covariances
from facemeta.objectives.mfr import domain_alignment_loss, hard_pair_attention_loss
from facemeta.objectives.triplet import triplet_loss
from facemeta.train.adapt import AdaptSettings, Tail, prototype_cosface_loss, tail_embed
from facemeta.train.adapt_episodes import TAIL_BLOCKS, inner_outer

SPLIT_SEED = 0xADA  # the same inner/outer split per step as adapt-maml-fo


@dataclass
class DomainTask:
    """One source domain of an episode: the tail's input features and local labels of the inner people's images
    and of the outer people's (outer: the m gallery images, then the m probe images of the same people)."""

    domain: int
    inner: Tensor
    inner_labels: Tensor
    outer: Tensor
    outer_labels: Tensor


def domain_tasks(joint: nn.Module, batch, step_seed: int) -> tuple[Tail, list[DomainTask]]:
    """The tail of joint's model and each domain's inner / outer split (the front run once, without gradient)."""
    tail = Tail(joint.model, TAIL_BLOCKS)
    rng = np.random.default_rng([SPLIT_SEED, step_seed])
    tasks = []
    for d in batch.domains:
        (xi, yi), (xo, yo) = inner_outer(d.gallery, d.probe, d.labels, rng)
        tasks.append(DomainTask(int(d.domain), tail.front(xi), yi, tail.front(xo), yo))
    return tail, tasks


def adapt_inner_loss(tail: Tail, feats: Tensor, labels: Tensor) -> Callable:
    """adapt's loss on the inner people as a function of the tail's params (the inner loop)."""
    s = AdaptSettings()
    return lambda p: prototype_cosface_loss(tail_embed(tail, feats, params=p), labels, s.scale, s.margin)


def adapted_outer(joint: nn.Module, batch, settings) -> tuple[Tail, list[DomainTask], list[Tensor], float]:
    """Each domain's tail adapted on its inner people (first-order MAML's inner loop, facemeta.meta.MAML) and
    its outer people's unit embeddings at that adapted tail -> (tail, tasks, embeddings, mean first inner loss).
    The embeddings keep the graph to the start's tail (θ' = θ − const in first order)."""
    from facemeta.meta import MAML

    tail, tasks = domain_tasks(joint, batch, int(batch.domains[0].labels.sum()))
    maml = MAML(tail, inner_steps=settings.inner_steps, inner_lr=settings.inner_lr, first_order=True)
    embs, inner = [], 0.0
    for t in tasks:
        adapted, losses = maml.adapt(adapt_inner_loss(tail, t.inner, t.inner_labels), return_losses=True)
        embs.append(tail_embed(tail, t.outer, params=adapted))
        inner += losses[0] / len(tasks)
    return tail, tasks, embs, inner


def mfr_outer_loss(tasks: list[DomainTask], embs: list[Tensor], settings) -> tuple[Tensor, dict[str, float]]:
    """``adapt-mfr``'s outer loss on the outer people's adapted embeddings: hp_weight · mean per-domain L_hp
    (gallery vs probe) + da_weight · L_da across the domains -> (loss, logs)."""
    hp = []
    for e in embs:
        m = len(e) // 2
        hp.append(hard_pair_attention_loss(e[:m], e[m:], settings.tau_p, settings.tau_n))
    hp_mean = torch.stack(hp).mean()
    dom = torch.cat([torch.full((len(e),), t.domain, dtype=torch.long, device=e.device)
                     for t, e in zip(tasks, embs, strict=True)])
    da = domain_alignment_loss(torch.cat(embs), dom)
    loss = settings.hp_weight * hp_mean + settings.da_weight * da
    return loss, {"loss_hp": float(hp_mean.detach()), "loss_da": float(da.detach())}


def unit_trace(cov: Tensor) -> Tensor:
    """Σ scaled to trace E (its dimension): the metric keeps domain i's shape, and (a − p)ᵀ Σ (a − p) the scale of
    the squared Euclidean distance ‖a − p‖², so ``cdt_margin`` means on it what a margin means on unit vectors."""
    return cov * (len(cov) / cov.trace().clamp_min(1e-12))


def cdt_outer_loss(tail: Tail, tasks: list[DomainTask], embs: list[Tensor], settings
                   ) -> tuple[Tensor, dict[str, float]]:
    """``adapt-cdt``'s outer loss: per domain j, triplet_weight · triplet + cdt_weight · mean over the other
    domains i of L_cdt(j | i), Σᵢ from domain i's outer people at the start's tail (detached) -> (loss, logs)."""
    with torch.no_grad():
        covs = [tuple(unit_trace(c) for c in pair_covariances(tail_embed(tail, t.outer), t.outer_labels))
                for t in tasks]
    trips, cdts = [], []
    for j, (t, e) in enumerate(zip(tasks, embs, strict=True)):
        others = [c for i, c in enumerate(covs) if i != j] or [covs[j]]
        trips.append(triplet_loss(e, t.outer_labels, margin=settings.triplet_margin))
        cdts.append(torch.stack([cross_domain_triplet_loss(e, t.outer_labels, cp, cn, settings.cdt_margin,
                                                           settings.cdt_mining) for cp, cn in others]).mean())
    trip, cdt = torch.stack(trips).mean(), torch.stack(cdts).mean()
    loss = settings.triplet_weight * trip + settings.cdt_weight * cdt
    return loss, {"loss_triplet": float(trip.detach()), "loss_cdt": float(cdt.detach())}


def adapt_mfr_grad(joint: nn.Module, batch, settings) -> dict[str, float]:
    """``adapt-mfr``: adapt's inner loop per domain, MFR's hard-pair + domain alignment loss on the outer people
    after adaptation, its first-order gradient accumulated into the tail's ``.grad``."""
    _, tasks, embs, inner = adapted_outer(joint, batch, settings)
    loss, logs = mfr_outer_loss(tasks, embs, settings)
    loss.backward()
    return {"loss": float(loss.detach()), "loss_train": inner, "loss_test": float(loss.detach()), **logs}


def adapt_cdt_grad(joint: nn.Module, batch, settings) -> dict[str, float]:
    """``adapt-cdt``: adapt's inner loop per domain, CDT's triplet + cross-domain triplet loss on the outer
    people after adaptation, its first-order gradient accumulated into the tail's ``.grad``."""
    tail, tasks, embs, inner = adapted_outer(joint, batch, settings)
    loss, logs = cdt_outer_loss(tail, tasks, embs, settings)
    loss.backward()
    return {"loss": float(loss.detach()), "loss_train": inner, "loss_test": float(loss.detach()), **logs}


def erm_term(joint: nn.Module, batch) -> Tensor:
    """ERM's loss on the episode: the ``cls`` head's loss on every domain's photos pooled, at the start."""
    x = torch.cat([d.images for d in batch.domains])
    y = torch.cat([d.all_labels for d in batch.domains])
    return joint.heads["cls"].loss(joint(x).float(), y)


def anchored_grad(joint: nn.Module, batch, settings, outer: Callable) -> dict[str, float]:
    """gamma · ERM's loss at the start + (1 − gamma) · `outer`(tail, tasks, embeddings) after adaptation; the
    gradient accumulated into the whole network and the head."""
    tail, tasks, embs, inner = adapted_outer(joint, batch, settings)
    meta, logs = outer(tail, tasks, embs)
    erm = erm_term(joint, batch)
    loss = settings.gamma * erm + (1 - settings.gamma) * meta
    loss.backward()
    return {"loss": float(loss.detach()), "loss_train": float(erm.detach()), "loss_test": float(meta.detach()),
            "loss_inner": inner, **logs}


def adapt_mfr_erm_grad(joint: nn.Module, batch, settings) -> dict[str, float]:
    """``adapt-mfr-erm``: ``adapt-mfr``'s outer loss, anchored by ERM's loss (weight ``meta.gamma``)."""
    return anchored_grad(joint, batch, settings, lambda tail, tasks, embs: mfr_outer_loss(tasks, embs, settings))


def adapt_cdt_erm_grad(joint: nn.Module, batch, settings) -> dict[str, float]:
    """``adapt-cdt-erm``: ``adapt-cdt``'s outer loss, anchored by ERM's loss (weight ``meta.gamma``)."""
    return anchored_grad(joint, batch, settings, lambda tail, tasks, embs: cdt_outer_loss(tail, tasks, embs, settings))
