"""Meta-training for adaptation (issue 26, item 2): episodes that simulate `facemeta adapt` on a source domain.

In each episode, per source domain, the people of the domain's batch are split in two disjoint groups: the
INNER people (k of them) are what `adapt` would be given (its labelled people); the OUTER people are the
domain's other people, on whom the adapted model is judged. The inner loop is the adapt procedure itself
(facemeta.train.adapt: the same trainable tail, the same prototype CosFace loss, plain SGD at ``inner_lr``);
the outer loss is the same loss on the outer people AFTER adaptation, so what is learnt is a start that a few
adapt steps on some people turn into a better model for the others. The outer loss never sees an inner person:
:class:`AdaptSplit` refuses an overlap, and every episode is built through it.

- ``adapt-maml-fo``: first-order MAML through facemeta.meta.MAML (``inner_steps`` steps), outer gradient of
  the outer people's loss at the adapted tail;
- ``adapt-reptile``: Reptile through facemeta.meta.Reptile; the trajectory is ``reptile_inner_steps`` adapt
  steps on the inner people followed by one step on the outer people after adaptation (Reptile has no
  separate outer loss: the last step of the trajectory plays its part); like the ``reptile`` method, θ − θ̃
  is divided by (steps x inner_lr) so the outer optimiser acts on it as on a gradient;
- ``adapt-stats`` (the statistics variant; the idea of Decomposed Meta Batch Normalization for fast domain
  adaptation in face recognition, at the level facemeta's domains work: the embedding's domain mean, since the
  dlib-prior ResNet has no normalisation statistics to re-estimate): per source domain, the INNER people's photos
  are unlabelled photos of the domain, their mean embedding is the domain's statistics estimated from a few
  photos (facemeta.gallery.domain_stats, kind mean: normalise(v) = (v - mean) / |v - mean|), and the OUTER
  people's embeddings, each normalised by its own domain's estimate, are classified by the method's head (ERM's
  margin head over every source identity), so people of different domains must stay apart after each domain is
  centred by a few-photo estimate, as a gallery with domains compares them. The gradient flows through the
  estimate. ``meta.gamma`` weighs ERM's loss on every raw embedding against the centred term (gamma 1: ERM).
  Trains the whole network and the head. ``adapt-stats-proto``, the first form measured, used adapt's prototype
  CosFace (s 30, m 0.2) instead of the head, on the outer people only (:func:`stats_prototype_loss`).

adapt-maml-fo and adapt-reptile meta-learn the part `adapt` changes (the tail: the last ``TAIL_BLOCKS`` blocks
and the embedding layer); the front of the network is run without gradient once per domain and step and is not
trained by them.
k = half of the domain's identities in the batch (``sampler.identities_per_domain``), at least one each side.
Registered in facemeta.train.methods; presets facemeta/configs/adapt-maml-fo.yaml, adapt-reptile.yaml and
adapt-stats.yaml.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from facemeta.train.adapt import AdaptSettings, Tail, prototype_cosface_loss, tail_embed

TAIL_BLOCKS = AdaptSettings().tail_blocks
INNER_SHARE = 0.5


@dataclass(frozen=True)
class AdaptSplit:
    """One domain's people in an episode: positions of the inner (adapting) and outer (judging) people."""

    inner: tuple[int, ...]
    outer: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.inner or not self.outer:
            raise ValueError("an adaptation episode needs at least one inner and one outer person")
        if set(self.inner) & set(self.outer):
            raise ValueError("the outer loss would see inner people: " f"{sorted(set(self.inner) & set(self.outer))}")


def split_people(n: int, k: int | None = None, rng: np.random.Generator | None = None) -> AdaptSplit:
    """A random split of n people (positions 0..n-1) into k inner (default: half) and n − k outer ones."""
    if n < 2:
        raise ValueError(f"an adaptation episode needs at least 2 people in a domain, got {n}")
    k = max(1, min(n - 1, int(n * INNER_SHARE) if k is None else k))
    order = (rng or np.random.default_rng(0)).permutation(n)
    return AdaptSplit(tuple(int(i) for i in order[:k]), tuple(int(i) for i in order[k:]))


@dataclass(frozen=True)
class AdaptEpisode:
    """An episode over a labelled, multi-domain dataset: the domain, dataset indices and local labels
    (0..k-1, 0..m-1) of the inner people's images and of the outer people's images."""

    domain: Hashable
    inner: tuple[int, ...]
    inner_labels: tuple[int, ...]
    outer: tuple[int, ...]
    outer_labels: tuple[int, ...]


class AdaptEpisodeSampler:
    """Reproducible adaptation episodes over images labelled with a person and a domain: each picks a domain
    (in rotation), ``people`` of its people with at least ``min_images`` images, and splits them into ``k``
    inner and the rest outer (:func:`split_people`). Episode i depends only on (seed, i)."""

    def __init__(self, people: Sequence[Hashable], domains: Sequence[Hashable], k: int, people_per_episode: int,
                 seed: int = 0, min_images: int = 2):
        if not 1 <= k < people_per_episode:
            raise ValueError(f"k must be in 1..people_per_episode-1, got k={k}, people={people_per_episode}")
        self.k, self.n, self.seed = int(k), int(people_per_episode), int(seed)
        pools: dict[Hashable, dict[Hashable, list[int]]] = {}
        for i, (p, d) in enumerate(zip(people, domains, strict=True)):
            pools.setdefault(d, {}).setdefault(p, []).append(i)
        self.pools = {d: {p: ix for p, ix in ps.items() if len(ix) >= min_images} for d, ps in pools.items()}
        self.pools = {d: ps for d, ps in self.pools.items() if len(ps) >= self.n}
        if not self.pools:
            raise ValueError(f"no domain has {self.n} people with >= {min_images} images each")
        self.domains = sorted(self.pools, key=str)

    def episode(self, step: int) -> AdaptEpisode:
        """Episode number `step`."""
        rng = np.random.default_rng([self.seed, int(step)])
        domain = self.domains[step % len(self.domains)]
        names = sorted(self.pools[domain], key=str)
        picked = [names[int(i)] for i in rng.choice(len(names), size=self.n, replace=False)]
        split = split_people(self.n, self.k, rng)
        parts = []
        for side in (split.inner, split.outer):
            idx, lab = [], []
            for label, pos in enumerate(side):
                members = self.pools[domain][picked[pos]]
                idx += members
                lab += [label] * len(members)
            parts += [tuple(idx), tuple(lab)]
        return AdaptEpisode(domain, *parts)


# ---------------------------------------------------------------- the training methods (on an EpisodeBatch)
def inner_outer(gallery: Tensor, probe: Tensor, labels: Tensor, rng: np.random.Generator
                ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """One domain's B identities (gallery and probe image each) -> ((inner images, local labels), (outer images,
    local labels)); the two groups hold different people (checked on the global labels too)."""
    split = split_people(len(labels), None, rng)
    out = []
    for side in (split.inner, split.outer):
        ix = torch.as_tensor(side, dtype=torch.long, device=gallery.device)
        local = torch.arange(len(side), device=gallery.device)
        out.append((torch.cat([gallery[ix], probe[ix]]), torch.cat([local, local])))
    inner_people = set(labels[list(split.inner)].tolist())
    if inner_people & set(labels[list(split.outer)].tolist()):
        raise ValueError("a person is both inner and outer in this domain's batch")
    return out[0], out[1]


def _tasks(joint: nn.Module, batch, step_seed: int) -> tuple[Tail, list[tuple[tuple, tuple]]]:
    """The tail of joint's model and, per domain, (inner features, labels), (outer features, labels)."""
    tail = Tail(joint.model, TAIL_BLOCKS)
    rng = np.random.default_rng([0xADA, step_seed])
    tasks = []
    for d in batch.domains:
        (xi, yi), (xo, yo) = inner_outer(d.gallery, d.probe, d.labels, rng)
        tasks.append(((tail.front(xi), yi), (tail.front(xo), yo)))
    return tail, tasks


def _loss(tail: Tail, feats: Tensor, labels: Tensor) -> Callable:
    s = AdaptSettings()
    return lambda p: prototype_cosface_loss(tail_embed(tail, feats, params=p), labels, s.scale, s.margin)


def adapt_maml_fo_grad(joint: nn.Module, batch, settings) -> dict[str, float]:
    """First-order MAML on adaptation episodes: per domain, ``inner_steps`` adapt steps on the inner people,
    the outer people's loss at the adapted tail back-propagated (first order) into the tail."""
    from facemeta.meta import MAML

    tail, tasks = _tasks(joint, batch, int(batch.domains[0].labels.sum()))
    maml = MAML(tail, inner_steps=settings.inner_steps, inner_lr=settings.inner_lr, first_order=True)
    out = maml.meta_backward([(_loss(tail, *inner), _loss(tail, *outer)) for inner, outer in tasks])
    return {"loss": out["query_loss"], "loss_train": out["support_loss"], "loss_test": out["query_loss"]}


def adapt_reptile_grad(joint: nn.Module, batch, settings) -> dict[str, float]:
    """Reptile on adaptation episodes: per domain, ``reptile_inner_steps`` adapt steps on the inner people then
    one on the outer people; (θ − mean θ̃) / (steps x inner_lr) written into the tail's ``.grad``."""
    from facemeta.meta import Reptile

    tail, tasks = _tasks(joint, batch, int(batch.domains[0].labels.sum()))
    k = settings.reptile_inner_steps

    def trajectory(inner: tuple, outer: tuple) -> Callable:
        calls = [0]
        first, last = _loss(tail, *inner), _loss(tail, *outer)

        def loss(p):
            calls[0] += 1
            return last(p) if calls[0] > k else first(p)

        return loss

    rep = Reptile(tail, inner_steps=k + 1, inner_lr=settings.inner_lr)
    out = rep.meta_backward([trajectory(inner, outer) for inner, outer in tasks])
    scale = 1.0 / ((k + 1) * settings.inner_lr)
    for p in tail.parameters():
        if p.grad is not None:
            p.grad.mul_(scale)
    return {"loss": out["inner_loss"]}


def stats_prototype_loss(joint: nn.Module, batch, settings, step_seed: int) -> tuple[Tensor, dict[str, float]]:
    """The first form of the statistics variant (``adapt-stats-proto``): per domain, the inner
    people's photos give the domain mean (no labels used), the outer people's embeddings are centred by it;
    every domain's outer people in one prototype CosFace -> (γ · raw loss + (1 − γ) · centred loss, logs)."""
    import torch.nn.functional as F

    s = AdaptSettings()
    rng = np.random.default_rng([0x57A7, step_seed])
    raw, centred, labels = [], [], []
    offset = 0
    for d in batch.domains:
        (xi, _), (xo, yo) = inner_outer(d.gallery, d.probe, d.labels, rng)
        emb = F.normalize(joint(torch.cat([xi, xo])), dim=1)
        mean = emb[:len(xi)].mean(dim=0, keepdim=True)
        out = emb[len(xi):]
        raw.append(out)
        centred.append(F.normalize(out - mean, dim=1))
        labels.append(yo + offset)
        offset += int(yo.max()) + 1
    y = torch.cat(labels)
    loss_raw = prototype_cosface_loss(torch.cat(raw), y, s.scale, s.margin)
    loss_centred = prototype_cosface_loss(torch.cat(centred), y, s.scale, s.margin)
    loss = settings.gamma * loss_raw + (1 - settings.gamma) * loss_centred
    return loss, {"loss_raw": float(loss_raw.detach()), "loss_centred": float(loss_centred.detach())}


def adapt_stats_proto_grad(joint: nn.Module, batch, settings) -> dict[str, float]:
    """``adapt-stats-proto``: the gradient of :func:`stats_prototype_loss` into every parameter of the network
    (the heads are not used)."""
    loss, logs = stats_prototype_loss(joint, batch, settings, int(batch.domains[0].labels.sum()))
    loss.backward()
    return {"loss": float(loss.detach()), **logs}


def stats_episode_loss(joint: nn.Module, batch, settings, step_seed: int) -> tuple[Tensor, dict[str, float]]:
    """The statistics variant's loss (``adapt-stats``) on one EpisodeBatch: per domain, a split of its people
    (:func:`split_people`) into inner people, whose photos' mean embedding (labels unused) is the domain's
    few-photo statistics, and outer people, whose embeddings are centred by it and renormalised. The loss is the
    method's classification head (ERM's: the config's margin head over every source identity) on the raw
    embeddings of every photo, weight ``meta.gamma``, plus on the outer people's centred embeddings, weight
    1 − gamma: gamma 1 is ERM's loss on the same batch, exactly. -> (loss, logs)."""
    import torch.nn.functional as F

    rng = np.random.default_rng([0x57A7, step_seed])
    raw, raw_y, centred, centred_y = [], [], [], []
    for d in batch.domains:
        split = split_people(len(d.labels), None, rng)
        inner = torch.as_tensor(split.inner, dtype=torch.long, device=d.gallery.device)
        outer = torch.as_tensor(split.outer, dtype=torch.long, device=d.gallery.device)
        xi, xo = (torch.cat([d.gallery[ix], d.probe[ix]]) for ix in (inner, outer))
        yi, yo = (torch.cat([d.labels[ix], d.labels[ix]]) for ix in (inner, outer))
        emb = joint(torch.cat([xi, xo]))
        mean = F.normalize(emb[:len(xi)], dim=1).mean(dim=0, keepdim=True)
        raw.append(emb)
        raw_y.append(torch.cat([yi, yo]))
        centred.append(F.normalize(F.normalize(emb[len(xi):], dim=1) - mean, dim=1))
        centred_y.append(yo)
    head = joint.heads["cls"]
    loss_raw = head.loss(torch.cat(raw).float(), torch.cat(raw_y))
    loss_centred = head.loss(torch.cat(centred).float(), torch.cat(centred_y))
    loss = settings.gamma * loss_raw + (1 - settings.gamma) * loss_centred
    return loss, {"loss_raw": float(loss_raw.detach()), "loss_centred": float(loss_centred.detach())}


def adapt_stats_grad(joint: nn.Module, batch, settings) -> dict[str, float]:
    """The statistics variant (``adapt-stats``): the gradient of :func:`stats_episode_loss` into every
    parameter of the network and the classification head."""
    loss, logs = stats_episode_loss(joint, batch, settings, int(batch.domains[0].labels.sum()))
    loss.backward()
    return {"loss": float(loss.detach()), **logs}
