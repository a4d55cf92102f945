"""MFR's and CDT's losses as the outer losses of adaptation episodes (``adapt-mfr``, ``adapt-cdt``,
facemeta.train.adapt_episodes_losses), on real faces (ORL and Yale B, two source domains) through dlib's prior: the
outer loss never sees an inner person, it is taken after the inner people's adaptation, its gradient reaches the
tail that `facemeta adapt` trains and nothing in front of it, and two real training steps move the tail only; the
ERM-anchored forms (``adapt-mfr-erm``, ``adapt-cdt-erm``) train the whole network and are ERM's loss at gamma 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

METHODS = ("adapt-mfr", "adapt-cdt")
PEOPLE = 8  # per domain: 4 inner + 4 outer
pytestmark = pytest.mark.usefixtures("module_on_one_torch_thread")


@pytest.fixture(scope="module")
def prior():
    """dlib's encoder zero-shot (the installed prior), in train mode as the Trainer runs it."""
    from facemeta.models.backbone import build_prior

    torch.manual_seed(0)
    return build_prior("prior")[0].train()


@pytest.fixture(scope="module")
def photos(prior, data_dir):
    """{domain: (first photos, other photos, spare photos)} of PEOPLE ORL and Yale B people, as model inputs; the
    spare photos are a third photo of each person (to swap in for a person's images)."""
    from facemeta.data.sets import read_set
    from facemeta.images import load_image
    from facemeta.models.backbone import preprocess

    out = {}
    for name, picks in (("orl", (0, 4, 7)), ("yaleb", (0, 20, 40))):
        by: dict[str, list[str]] = {}
        for row in sorted(read_set(name, data_dir), key=lambda r: r.path):
            by.setdefault(row.identity, []).append(row.path)
        people = sorted(by)[:PEOPLE]
        out[name] = tuple(preprocess([load_image(by[p][i]) for p in people], prior.config) for i in picks)
    return out


def _batch(photos, swap: dict | None = None):
    """The episode: ORL meta-train, Yale B meta-test, PEOPLE identities each (gallery, probe); `swap` {domain
    index: positions} replaces those people's gallery and probe images by their spare photo."""
    from facemeta.train.methods import DomainTensors, EpisodeBatch

    doms = []
    for d, name in enumerate(("orl", "yaleb")):
        g, p, spare = (x.clone() for x in photos[name])
        for i in (swap or {}).get(d, ()):
            g[i], p[i] = spare[i], spare[i].flip(-1)
        doms.append(DomainTensors(d, g, p, torch.arange(PEOPLE) + 100 * d))
    return EpisodeBatch(doms[:1], doms[1:])


def _splits(batch) -> list:
    """The inner/outer split each domain gets in this batch's step (the draw domain_tasks makes)."""
    from facemeta.train.adapt_episodes import split_people
    from facemeta.train.adapt_episodes_losses import SPLIT_SEED

    rng = np.random.default_rng([SPLIT_SEED, int(batch.domains[0].labels.sum())])
    return [split_people(len(d.labels), None, rng) for d in batch.domains]


def _outer_loss(method: str, prior, batch, settings) -> float:
    from facemeta.train.adapt_episodes_losses import adapted_outer, cdt_outer_loss, mfr_outer_loss
    from facemeta.train.methods import Joint

    tail, tasks, embs, _ = adapted_outer(Joint(prior, {}), batch, settings)
    if method == "adapt-mfr":
        return float(mfr_outer_loss(tasks, embs, settings)[0].detach())
    return float(cdt_outer_loss(tail, tasks, embs, settings)[0].detach())


@pytest.mark.parametrize("method", METHODS)
def test_outer_loss_never_sees_inner_people_and_follows_the_adaptation(method, prior, photos):
    """Without an inner step (inner_lr 0) the outer loss is a function of the outer people's photos only: other
    photos of every domain's inner people leave it unchanged to the last bit, other photos of one outer person
    change it. With inner steps, the inner people's photos reach it through the adapted tail only."""
    from facemeta.train.methods import MethodSettings

    batch = _batch(photos)
    splits = _splits(batch)
    assert all(not set(s.inner) & set(s.outer) and len(s.inner) == PEOPLE // 2 for s in splits)
    frozen = MethodSettings(inner_lr=0.0, inner_steps=3)
    base = _outer_loss(method, prior, batch, frozen)
    inner_swapped = _batch(photos, {d: s.inner for d, s in enumerate(splits)})
    assert _outer_loss(method, prior, inner_swapped, frozen) == base
    outer_swapped = _batch(photos, {1: splits[1].outer[:1]})  # one Yale B outer person
    assert _outer_loss(method, prior, outer_swapped, frozen) != pytest.approx(base, abs=1e-6)
    moving = MethodSettings(inner_lr=0.05, inner_steps=3)
    adapted = _outer_loss(method, prior, batch, moving)
    assert adapted != pytest.approx(base, abs=1e-6)  # the loss is taken after the inner people's adaptation
    assert _outer_loss(method, prior, inner_swapped, moving) != pytest.approx(adapted, abs=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_gradient_reaches_the_tail_only(method, prior, photos):
    """One step's gradient (the registered method, the preset's inner settings): finite logs, a gradient on the
    embedding layer and the last residual blocks that adapt trains, none on the front or the stem."""
    from facemeta.train.methods import METHODS as REGISTRY
    from facemeta.train.methods import Joint, MethodSettings

    joint = Joint(prior, {})
    joint.zero_grad(set_to_none=True)
    out = REGISTRY.get(method).grad(joint, _batch(photos), MethodSettings(inner_lr=1e-4, inner_steps=3))
    terms = ("loss_hp", "loss_da") if method == "adapt-mfr" else ("loss_triplet", "loss_cdt")
    assert all(np.isfinite(out[k]) for k in ("loss", "loss_train", *terms))
    grads = {n: float(p.grad.norm()) for n, p in joint.named_parameters() if p.grad is not None}
    assert grads.get("model.fc.weight", 0) > 0 and any(n.startswith("model.backbone.blocks.13.") and g > 0
                                                       for n, g in grads.items())
    assert not any(n.startswith(("model.backbone.stem", "model.backbone.blocks.0.")) for n in grads)
    joint.zero_grad(set_to_none=True)


@pytest.mark.parametrize("method", ("adapt-mfr-erm", "adapt-cdt-erm"))
def test_erm_anchored_forms_train_everything_and_are_erm_at_gamma_one(method, prior, photos):
    """gamma 0.5: the gradient reaches the stem and the head too (ERM's term) and the loss is the weighted sum of
    ERM's and the outer loss; gamma 1: ERM's loss on the same batch, exactly."""
    from facemeta.objectives.margins import CosFaceHead
    from facemeta.train.methods import METHODS as REGISTRY
    from facemeta.train.methods import Joint, MethodSettings, erm_loss

    torch.manual_seed(0)
    joint = Joint(prior, {"cls": CosFaceHead(128, 100 + PEOPLE, s=64.0, m=0.05)})
    batch = _batch(photos)
    joint.zero_grad(set_to_none=True)
    out = REGISTRY.get(method).grad(joint, batch, MethodSettings(inner_lr=1e-4, inner_steps=3, gamma=0.5))
    assert out["loss"] == pytest.approx(0.5 * out["loss_train"] + 0.5 * out["loss_test"], rel=1e-5)
    grads = {n for n, p in joint.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"model.backbone.stem_conv.weight", "heads.cls.weight", "model.fc.weight"} <= grads
    joint.zero_grad(set_to_none=True)
    out = REGISTRY.get(method).grad(joint, batch, MethodSettings(inner_lr=1e-4, inner_steps=3, gamma=1.0))
    with torch.no_grad():
        assert out["loss"] == pytest.approx(float(erm_loss(joint, batch)), rel=1e-5)
    joint.zero_grad(set_to_none=True)


def test_two_training_steps_move_the_tail(data_dir, tmp_path):
    """`facemeta train adapt-cdt` (the preset, its method) for two real steps on ORL and Yale B: the run ends, the
    embedding layer moved away from the prior and the stem did not (adapt-* methods train the tail only)."""
    from facemeta.models.checkpoint import load_checkpoint
    from facemeta.models.dlib_resnet import load_prior_state
    from facemeta.train.config import load_config
    from facemeta.train.data import prepare_data
    from facemeta.train.trainer import Trainer

    sources = [{"set": "orl", "max_identities": 12, "limit_per_identity": 3},
               {"set": "yaleb", "max_identities": 12, "limit_per_identity": 3}]
    cfg = load_config("adapt-cdt", overrides={
        "data.root": str(data_dir), "output": str(tmp_path / "run"), "threads": 1, "steps": 2,
        "optim.warmup_steps": 0, "checkpoint_every": 0, "log_every": 1, "data.sources": sources,
        "data.targets": ["mfr2"], "eval.min_heldout": 2})
    assert cfg.method == "adapt-cdt"
    model, meta = load_checkpoint(Trainer(cfg, prepare_data(cfg), progress=False).fit())
    prior = load_prior_state()
    assert meta["method"] == "adapt-cdt"
    assert (model.fc.weight - prior["fc.weight"]).abs().max().item() > 0
    assert torch.equal(model.backbone.stem_conv.weight, prior["stem_conv.weight"])
