"""Training steps of each method (erm, mfr, cdt, maml-fo, reptile) on one multi-domain episode.

Every method sees the same images per step: an :class:`EpisodeBatch` of B identities x 2 images
(gallery, probe) from EVERY source domain, drawn by facemeta.data.episodes.EpisodicDomainSampler
(ERM pools them into one batch; the meta methods split the domains into meta-train and meta-test
as the sampler says). Budget rule: images seen = steps x domains x B x 2 for every method, so the
same ``steps`` and ``sampler.identities_per_domain`` give the same budget; the meta methods cost
more compute per step (measured in benchmarks/bench_methods.py), never more data.

All losses run through one :class:`Joint` module (backbone + the method's heads), so the meta
layer (facemeta.meta) adapts and meta-updates the heads together with the backbone.

BatchNorm (facemeta.meta's policy): every pass normalises with its own batch statistics (train
mode). The running statistics follow exactly one pass per step, the one at θ that an ordinary
forward would be: the meta-train pass (mfr, cdt), the first inner step of each task (maml-fo,
reptile), the pooled batch (erm). Passes at adapted parameters (θ', inner steps) use cloned
buffers and leave them untouched.

Each step function accumulates gradients into ``.grad`` and returns floats for logging;
:func:`train_step` wraps one in zero_grad / clip / optimiser step.

A method is defined in one place: its gradient function, decorated with ``@register_method(name, ...)``, which
puts it in :data:`METHODS` (a facemeta.registry.Registry); the config validation, the benchmark presets' default
grid and ``facemeta train --method`` read that registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facemeta.errors import ConfigError
from facemeta.meta import MAML, Reptile, functional_forward, meta_train_test_step
from facemeta.objectives.cdt import cross_domain_triplet_loss, pair_covariances
from facemeta.objectives.mfr import CosineSoftmaxHead, domain_alignment_loss, hard_pair_attention_loss
from facemeta.objectives.triplet import triplet_loss
from facemeta.registry import Registry
from facemeta.train.adapt_episodes import (
    adapt_maml_fo_grad,
    adapt_reptile_grad,
    adapt_stats_grad,
    adapt_stats_proto_grad,
)
from facemeta.train.adapt_episodes_losses import (
    adapt_cdt_erm_grad,
    adapt_cdt_grad,
    adapt_mfr_erm_grad,
    adapt_mfr_grad,
)


@dataclass
class MethodSettings:
    """The constants of the meta methods (config section ``meta``); value and reason for each.

    alpha = 0.01: virtual-step size θ' = θ − α∇L_S. The outer SGD lr is 0.1 with gradient clipping
      at 5; a tenth of it keeps θ' close enough to θ that L_T(θ') is informative, yet far enough
      to matter (MLDG used α equal to the outer lr; our clipped ResNets diverged less with 0.1x).
      The virtual step uses the UNCLIPPED gradient: where gradients are far above the clip (from the
      prior, backbone norms 40-70 against a clip of 5), θ' moves as far as one clipped outer SGD step
      before momentum, not a tenth of it (`prior` presets: α·|∇L_S| >= 0.0005 x 42 = 0.021 against
      lr x clip = 0.025), and the meta-test gradient at θ' differs from the one at θ by about half its
      norm (benchmarks/results/term_gradients.md). α = 0 takes L_T at θ (no virtual step).
    gamma = 0.5: total = γ L_S + (1 − γ) L_T; equal weight, as MLDG's β = 1 up to scale.
    first_order = True: on 2 CPU cores a second-order step costs about twice a first-order one
      (benchmarks/results/meta.md); set False for the full MLDG gradient.
    tau_p = 0.5, tau_n = 0.3, soft_scale = 30: MFR thresholds and cosine-softmax scale, see
      facemeta.objectives.mfr (not given by the paper).
    da_weight = 1.0, hp_weight = 1.0: L_S = hp_weight · L_hp + L_cls + da_weight · L_da (and
      L_T = hp_weight · L_hp + L_cls); weight 1 is DESIGN.md's sum. From the prior the terms' gradients are
      far smaller than the classifier's (benchmarks/results/term_gradients.md); raising them to a quarter
      of it or more lowered the held-out source score (benchmarks/results/term_weights.md).
    cdt_margin = 0.5, cdt_mining = "all": facemeta.objectives.cdt's defaults.
    cdt_weight = 1.0, triplet_weight = 1.0: L_T = L_cls + triplet_weight · L_trip + cdt_weight · L_cdt
      (meta-train: L_cls + triplet_weight · L_trip); weight 1 is the sum DESIGN.md describes.
    triplet_margin = 0.2: the usual FaceNet margin on unit vectors (squared distances).
    meta_test_domains = 1: of 3 source domains, 2 meta-train and 1 meta-test each step (the
      papers' split); the sampler rotates which domain is held out.
    inner_lr = 0.01, inner_steps = 1 (maml-fo) / reptile_inner_steps = 3: the generic layer's
      inner loop on one domain task. Reptile's update θ − mean θ̃ is divided by
      (reptile_inner_steps x inner_lr) so it has the scale of a gradient and the SAME outer
      optimiser and schedule as ERM act on it (ε = outer lr).
    """

    alpha: float = 0.01
    gamma: float = 0.5
    first_order: bool = True
    tau_p: float = 0.5
    tau_n: float = 0.3
    soft_scale: float = 30.0
    da_weight: float = 1.0
    hp_weight: float = 1.0
    cdt_margin: float = 0.5
    cdt_mining: str = "all"
    cdt_weight: float = 1.0
    triplet_weight: float = 1.0
    triplet_margin: float = 0.2
    inner_lr: float = 0.01
    inner_steps: int = 1
    reptile_inner_steps: int = 3
    meta_test_domains: int = 1

    def check(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        checks = [
            (self.alpha >= 0, "alpha must be >= 0"), (0 <= self.gamma <= 1, "gamma must be in [0, 1]"),
            (-1 <= self.tau_p <= 1, "tau_p must be in [-1, 1]"), (-1 <= self.tau_n <= 1, "tau_n must be in [-1, 1]"),
            (self.soft_scale > 0, "soft_scale must be > 0"), (self.da_weight >= 0, "da_weight must be >= 0"),
            (self.cdt_margin >= 0, "cdt_margin must be >= 0"), (self.cdt_mining in ("all", "hard"),
                                                                  "cdt_mining must be all or hard"),
            (self.cdt_weight >= 0, "cdt_weight must be >= 0"), (self.hp_weight >= 0, "hp_weight must be >= 0"),
            (self.triplet_weight >= 0, "triplet_weight must be >= 0"),
            (self.triplet_margin >= 0, "triplet_margin must be >= 0"),
            (self.inner_lr > 0, "inner_lr must be > 0"), (self.inner_steps >= 1, "inner_steps must be >= 1"),
            (self.reptile_inner_steps >= 1, "reptile_inner_steps must be >= 1"),
            (self.meta_test_domains >= 1, "meta_test_domains must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# ---------------------------------------------------------------- data of one step
@dataclass
class DomainTensors:
    """One domain's B identities: gallery and probe images [B, 3, H, W] and global labels [B]."""

    domain: int
    gallery: Tensor
    probe: Tensor
    labels: Tensor

    @property
    def images(self) -> Tensor:
        """Gallery then probe, [2B, 3, H, W]."""
        return torch.cat([self.gallery, self.probe])

    @property
    def all_labels(self) -> Tensor:
        """Labels of :attr:`images`, [2B]."""
        return torch.cat([self.labels, self.labels])


@dataclass
class EpisodeBatch:
    """The tensors of one episode: meta-train domains and meta-test domains."""

    meta_train: list[DomainTensors]
    meta_test: list[DomainTensors]

    @property
    def domains(self) -> list[DomainTensors]:
        """Every domain of the episode (meta-train first)."""
        return [*self.meta_train, *self.meta_test]

    @property
    def num_images(self) -> int:
        """Images in this step (the budget unit)."""
        return sum(2 * len(d.labels) for d in self.domains)


def load_episode(dataset, episode, seed: int, device: torch.device | str = "cpu") -> EpisodeBatch:
    """Read and augment an Episode's images through a FaceDataset, seeded per (seed, step, slot).

    The augmentation of every image is a pure function of (seed, episode.step, its slot), so a
    resumed run replays exactly the same tensors.
    """
    slots = np.random.SeedSequence([int(seed), 0xE915, int(episode.step)]).generate_state(
        len(episode.indices), np.uint64)
    slots = (slots >> np.uint64(1)).astype(np.int64)
    k = 0

    def part(batch) -> DomainTensors:
        nonlocal k
        out = []
        for idx in (batch.gallery, batch.probe):
            xs = []
            for i in idx:
                xs.append(dataset[(int(i), int(slots[k]))][0])
                k += 1
            out.append(torch.stack(xs).to(device))
        return DomainTensors(int(batch.domain), out[0], out[1],
                             torch.as_tensor(np.asarray(batch.labels), dtype=torch.long, device=device))

    return EpisodeBatch([part(b) for b in episode.meta_train], [part(b) for b in episode.meta_test])


# ---------------------------------------------------------------- model + heads
class Joint(nn.Module):
    """Backbone and the method's heads as one module: ``Joint(model, heads)(x) -> embeddings``.

    Heads are reached as ``joint.heads[name]``; a functional pass at a params dict covers both,
    so meta updates adapt the heads with the backbone.
    """

    def __init__(self, model: nn.Module, heads: Mapping[str, nn.Module]):
        super().__init__()
        self.model = model
        self.heads = nn.ModuleDict(dict(heads))

    def forward(self, x: Tensor) -> Tensor:
        """Unit embeddings [N, E] (the heads are used by the losses through :func:`head_call`)."""
        return self.model(x)


GradFn = Callable[[Joint, EpisodeBatch, MethodSettings], dict[str, float]]
HeadsFn = Callable[[int, int, Callable[[], nn.Module], MethodSettings], dict[str, nn.Module]]


def margin_heads(embedding_size: int, num_classes: int, margin_head: Callable[[], nn.Module],
                 settings: MethodSettings) -> dict[str, nn.Module]:
    """The usual heads: one margin head ``cls`` (the config's ``loss.head``, or the method's ``margin_head``)."""
    return {"cls": margin_head()}


def cosine_softmax_heads(embedding_size: int, num_classes: int, margin_head: Callable[[], nn.Module],
                         settings: MethodSettings) -> dict[str, nn.Module]:
    """MFR's soft classification: a cosine-softmax classifier ``cls`` (scale ``meta.soft_scale``), no margin."""
    return {"cls": CosineSoftmaxHead(embedding_size, num_classes, scale=settings.soft_scale)}


@dataclass(frozen=True)
class Method:
    """A registered training method: its gradient on one episode (accumulated into ``.grad``), the heads it
    trains, the margin head it requires whatever the config's ``loss.head`` (None: the config's), and whether
    it reads episodes of gallery/probe pairs (every method but ERM, which also runs on plain batches)."""

    name: str
    grad: GradFn
    heads: HeadsFn = margin_heads
    margin_head: str | None = None
    episodic: bool = True


METHODS: Registry[Method] = Registry("training method", error=ConfigError)


def register_method(name: str, heads: HeadsFn = margin_heads, margin_head: str | None = None,
                    episodic: bool = True) -> Callable[[GradFn], GradFn]:
    """Decorator of a method's gradient function: registers it in :data:`METHODS` under `name` (the one
    place a new method is written)."""
    def add(grad: GradFn) -> GradFn:
        METHODS.register(name, Method(name, grad, heads, margin_head, episodic))
        return grad

    return add


def build_heads(method: str, embedding_size: int, num_classes: int, margin_head: Callable[[], nn.Module],
                settings: MethodSettings) -> dict[str, nn.Module]:
    """The heads `method` trains (its registry entry says which): ERM, MAML-FO, Reptile and CDT a margin
    head (``cls``; CDT's is CosFace as in the paper, the others the config's head); MFR a cosine-softmax
    classifier. ConfigError for a method that is not registered."""
    return METHODS.get(method).heads(embedding_size, num_classes, margin_head, settings)


def _embed(joint: Joint, params: Mapping[str, Tensor] | None, x: Tensor, live: bool) -> Tensor:
    """Embeddings of x at params (None: the module itself), BatchNorm buffers live or cloned."""
    if params is None:
        return joint(x)
    return functional_forward(joint, params, x, buffers="live" if live else "copy")


def _cls_loss(joint: Joint, params: Mapping[str, Tensor] | None, emb: Tensor, labels: Tensor) -> Tensor:
    """The classification head's loss at params (its weight from params when given)."""
    head = joint.heads["cls"]
    if params is None:
        return head.loss(emb, labels)
    sub = {k[len("heads.cls."):]: v for k, v in params.items() if k.startswith("heads.cls.")}
    logits = torch.func.functional_call(head, sub, (emb.float(), labels))  # every head: logits (one contract)
    return F.cross_entropy(logits, labels)


def split_by_domain(emb: Tensor, parts: list[DomainTensors]) -> list[tuple[Tensor, Tensor]]:
    """Cut a concatenated embedding batch back into (gallery, probe) per domain."""
    out, start = [], 0
    for d in parts:
        b = len(d.labels)
        out.append((emb[start:start + b], emb[start + b:start + 2 * b]))
        start += 2 * b
    return out


def _cat(parts: list[DomainTensors]) -> tuple[Tensor, Tensor, Tensor]:
    """Images, labels and domain ids of several domains in one batch."""
    x = torch.cat([d.images for d in parts])
    y = torch.cat([d.all_labels for d in parts])
    dom = torch.cat([torch.full((2 * len(d.labels),), d.domain, dtype=torch.long, device=x.device) for d in parts])
    return x, y, dom


# ---------------------------------------------------------------- losses per method
def erm_loss(joint: Joint, batch: EpisodeBatch, params: Mapping[str, Tensor] | None = None,
             live: bool = True) -> Tensor:
    """ERM: the classification loss on every domain's images pooled into one batch."""
    x, y, _ = _cat(batch.domains)
    return _cls_loss(joint, params, _embed(joint, params, x, live), y)


def mfr_loss(joint: Joint, parts: list[DomainTensors], settings: MethodSettings,
             params: Mapping[str, Tensor] | None = None, live: bool = False, align: bool = True) -> Tensor:
    """MFR on some domains: hp_weight · mean per-domain L_hp + L_cls on their union (+ da_weight·L_da when
    align)."""
    x, y, dom = _cat(parts)
    emb = _embed(joint, params, x, live)
    hp = torch.stack([hard_pair_attention_loss(g, p, settings.tau_p, settings.tau_n)
                      for g, p in split_by_domain(emb, parts)]).mean()
    loss = settings.hp_weight * hp + _cls_loss(joint, params, emb, y)
    if align and settings.da_weight > 0:
        loss = loss + settings.da_weight * domain_alignment_loss(emb, dom)
    return loss


def _cdt_base(joint: Joint, parts: list[DomainTensors], settings: MethodSettings,
              params: Mapping[str, Tensor] | None, live: bool) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """CosFace on the union + triplet_weight · mean per-domain triplet loss, and each domain's (embeddings,
    labels)."""
    x, y, _ = _cat(parts)
    emb = _embed(joint, params, x, live)
    per, trip = [], []
    for d, (g, p) in zip(parts, split_by_domain(emb, parts), strict=True):
        e, lab = torch.cat([g, p]), d.all_labels
        trip.append(triplet_loss(e, lab, margin=settings.triplet_margin))
        per.append((e, lab))
    return _cls_loss(joint, params, emb, y) + settings.triplet_weight * torch.stack(trip).mean(), per


def cdt_train_loss(joint: Joint, parts: list[DomainTensors], settings: MethodSettings,
                   params: Mapping[str, Tensor] | None = None, live: bool = False,
                   keep: list | None = None) -> Tensor:
    """CDT meta-train on domains i: CosFace + triplet; appends each domain's detached
    (embeddings, labels) to ``keep`` for the covariances of the meta-test term."""
    loss, per = _cdt_base(joint, parts, settings, params, live)
    if keep is not None:
        keep.extend((e.detach(), lab) for e, lab in per)
    return loss


def cdt_test_loss(joint: Joint, parts: list[DomainTensors], sources: list[tuple[Tensor, Tensor]],
                  settings: MethodSettings, params: Mapping[str, Tensor] | None = None) -> Tensor:
    """CDT meta-test on domains j: CosFace + triplet + cdt_weight · mean over (i, j) of L_cdt(j | i).

    Σᵢ⁺, Σᵢ⁻ come from meta-train domain i's embeddings at θ, detached: the metric is a constant
    of the step (it must be, for the first-order step frees the meta-train graph).
    """
    if not sources:
        raise ValueError("CDT meta-test needs the meta-train embeddings (run the meta-train loss first)")
    loss, per = _cdt_base(joint, parts, settings, params, live=False)
    covs = [pair_covariances(e, lab) for e, lab in sources]
    terms = [cross_domain_triplet_loss(e, lab, cp, cn, settings.cdt_margin, settings.cdt_mining)
             for e, lab in per for cp, cn in covs]
    return loss + settings.cdt_weight * torch.stack(terms).mean()


# ---------------------------------------------------------------- steps (accumulate .grad)
@register_method("erm", episodic=False)
def erm_grad(joint: Joint, batch: EpisodeBatch, settings: MethodSettings) -> dict[str, float]:
    """ERM gradient on the pooled episode."""
    loss = erm_loss(joint, batch)
    loss.backward()
    return {"loss": float(loss.detach())}


@register_method("mfr", heads=cosine_softmax_heads)
def mfr_grad(joint: Joint, batch: EpisodeBatch, settings: MethodSettings) -> dict[str, float]:
    """MFR: γ L_S(θ) + (1 − γ) L_T(θ − α∇L_S) through facemeta.meta's MLDG step.

    L_S = L_hp + L_cls + L_da on the meta-train domains (BatchNorm statistics live);
    L_T = L_hp + L_cls on the meta-test domains at θ'.
    """
    res = meta_train_test_step(
        joint,
        lambda p: mfr_loss(joint, batch.meta_train, settings, p, live=True, align=True),
        lambda p: mfr_loss(joint, batch.meta_test, settings, p, live=False, align=False),
        alpha=settings.alpha, gamma=settings.gamma, first_order=settings.first_order)
    return {"loss": res.total, "loss_train": res.loss_train, "loss_test": res.loss_test}


@register_method("cdt", margin_head="cosface")
def cdt_grad(joint: Joint, batch: EpisodeBatch, settings: MethodSettings) -> dict[str, float]:
    """CDT: meta-train CosFace + triplet on domains i; meta-test at θ' adds L_cdt(j | i)."""
    sources: list[tuple[Tensor, Tensor]] = []

    def train(p):
        sources.clear()
        return cdt_train_loss(joint, batch.meta_train, settings, p, live=True, keep=sources)

    res = meta_train_test_step(
        joint, train, lambda p: cdt_test_loss(joint, batch.meta_test, sources, settings, p),
        alpha=settings.alpha, gamma=settings.gamma, first_order=settings.first_order)
    return {"loss": res.total, "loss_train": res.loss_train, "loss_test": res.loss_test}


def _domain_task_loss(joint: Joint, x: Tensor, y: Tensor, first: list[bool]) -> Callable:
    """Classification loss of one domain task at params; the first call of the step updates BN stats."""

    def loss(p):
        live = first[0]
        first[0] = False
        return _cls_loss(joint, p, _embed(joint, p, x, live), y)

    return loss


@register_method("maml-fo")
def maml_fo_grad(joint: Joint, batch: EpisodeBatch, settings: MethodSettings) -> dict[str, float]:
    """First-order MAML, one task per source domain: adapt on the gallery images (one per identity,
    ``inner_steps`` steps at ``inner_lr``), classification loss of the probe images at θ̃."""
    maml = MAML(joint, inner_steps=settings.inner_steps, inner_lr=settings.inner_lr, first_order=True)
    first = [True]
    tasks = []
    for d in batch.domains:
        tasks.append((_domain_task_loss(joint, d.gallery, d.labels, first),
                      _domain_task_loss(joint, d.probe, d.labels, [False])))
    out = maml.meta_backward(tasks)
    return {"loss": out["query_loss"], "loss_train": out["support_loss"], "loss_test": out["query_loss"]}


@register_method("reptile")
def reptile_grad(joint: Joint, batch: EpisodeBatch, settings: MethodSettings) -> dict[str, float]:
    """Reptile, one task per source domain (k inner SGD steps on its 2B images); writes
    (θ − mean θ̃) / (k · inner_lr) into ``.grad`` so the outer optimiser applies ε = its lr."""
    k = settings.reptile_inner_steps
    rep = Reptile(joint, inner_steps=k, inner_lr=settings.inner_lr)
    tasks = []
    for i, d in enumerate(batch.domains):
        tasks.append(_domain_task_loss(joint, d.images, d.all_labels, [i == 0]))
    out = rep.meta_backward(tasks)
    scale = 1.0 / (k * settings.inner_lr)
    for p in joint.parameters():
        if p.grad is not None:
            p.grad.mul_(scale)
    return {"loss": out["inner_loss"]}


# Meta-training for `facemeta adapt` (issue 26): episodes that simulate it, facemeta.train.adapt_episodes.
register_method("adapt-maml-fo")(adapt_maml_fo_grad)
register_method("adapt-reptile")(adapt_reptile_grad)
register_method("adapt-stats")(adapt_stats_grad)  # the statistics variant (domain means from few photos)
register_method("adapt-stats-proto")(adapt_stats_proto_grad)  # its first form (adapt's prototype loss)
register_method("adapt-mfr")(adapt_mfr_grad)  # MFR's hard-pair + domain alignment as the outer loss
register_method("adapt-cdt")(adapt_cdt_grad)  # CDT's cross-domain triplet loss as the outer loss
register_method("adapt-mfr-erm")(adapt_mfr_erm_grad)  # the same, anchored by ERM's loss (meta.gamma)
register_method("adapt-cdt-erm")(adapt_cdt_erm_grad)


@dataclass
class StepResult:
    """Losses (floats) and the gradient norm of one training step."""

    losses: dict[str, float] = field(default_factory=dict)
    grad_norm: float = 0.0
    images: int = 0


def train_step(method: str, joint: Joint, batch: EpisodeBatch, optimizer: torch.optim.Optimizer,
               settings: MethodSettings, grad_clip: float | None = None,
               extra_loss: Callable[[Joint, EpisodeBatch], tuple[Tensor, dict[str, float]]] | None = None
               ) -> StepResult:
    """One step of ``method``: zero grads, accumulate its gradient, clip, optimiser step.

    `extra_loss` (e.g. distillation from a teacher) is computed at the current parameters on the episode's
    images after the method's own gradient, and its gradient added to it (a term of the outer objective)."""
    grad = METHODS.get(method).grad  # ConfigError naming the methods when there is no such method
    optimizer.zero_grad(set_to_none=True)
    losses = grad(joint, batch, settings)
    if extra_loss is not None:
        loss, logged = extra_loss(joint, batch)
        loss.backward()
        losses = {**losses, **logged}
    norm = clip_gradients(optimizer, grad_clip)
    optimizer.step()
    return StepResult(losses, norm, batch.num_images)


def clip_gradients(optimizer: torch.optim.Optimizer, grad_clip: float | None) -> float:
    """Clip the gradients of the optimiser's parameters to norm `grad_clip` (None: no clipping) and return
    their total norm before clipping (0.0 when no parameter has a gradient)."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if grad_clip:
        return float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0
