"""Training steps of erm, mfr, cdt, maml-fo and reptile on real aligned faces (ORL, MFR2, Yale B)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from facemeta.data.episodes import EpisodicDomainSampler
from facemeta.data.samplers import FaceDataset
from facemeta.data.transforms import AugmentConfig, build_train_transform
from facemeta.models.backbone import ModelConfig, build_model
from facemeta.objectives.margins import CosFaceHead
from facemeta.train.methods import (
    METHODS,
    Joint,
    MethodSettings,
    build_heads,
    cdt_test_loss,
    cdt_train_loss,
    load_episode,
    mfr_loss,
    train_step,
)

SIZE = 32


@pytest.fixture(scope="module")
def episodes(data_dir):
    """10 identities x 4 images of each real domain (cached alignment), a FaceDataset and a sampler."""
    from facemeta.align.cache import aligned_set

    rows = []
    for name in ("orl", "mfr2", "yaleb"):
        got = aligned_set(name, 112, data=data_dir, limit_per_identity=4)
        ids = sorted({r.identity for r in got})[:10]
        rows += [r for r in got if r.identity in ids]
    ident = {n: i for i, n in enumerate(sorted({f"{r.domain}/{r.identity}" for r in rows}))}
    for r in rows:
        r.identity = f"{r.domain}/{r.identity}"
    transform = build_train_transform(AugmentConfig(), SIZE)
    ds = FaceDataset(rows, transform, ident, {"orl": 0, "mfr2": 1, "yaleb": 2})
    sampler = EpisodicDomainSampler(ds.labels, ds.domains, identities_per_domain=4, meta_test_domains=1, seed=0)
    return ds, sampler, len(ident)


def _joint(method: str, classes: int, settings: MethodSettings, seed: int = 0) -> Joint:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(backbone="resnet10t", embedding_size=32, image_size=SIZE))
    heads = build_heads(method, 32, classes, lambda: CosFaceHead(32, classes, s=30.0, m=0.2), settings)
    return Joint(model, heads)


def _first_conv(joint: Joint) -> torch.nn.Parameter:
    return next(p for n, p in joint.model.named_parameters() if p.ndim == 4)


# The methods defined in facemeta.train.methods (others register there too, e.g. `facemeta adapt`'s meta-training in
# train/adapt_episodes.py, which adapts only the embedding head of this backbone and is tested with it).
OWN_METHODS = [m for m in METHODS if METHODS[m].grad.__module__ == "facemeta.train.methods"]


@pytest.mark.parametrize("method", OWN_METHODS)
def test_each_method_trains_and_reaches_the_backbone(method, episodes):
    ds, sampler, classes = episodes
    torch.set_num_threads(1)
    settings = MethodSettings()
    joint = _joint(method, classes, settings)
    joint.train()
    opt = torch.optim.SGD(joint.parameters(), lr=0.05, momentum=0.9)
    before = _first_conv(joint).detach().clone()
    bn = [b for n, b in joint.model.named_buffers() if n.endswith("running_mean")][0].clone()
    for step in range(2):
        batch = load_episode(ds, sampler.episode(step), seed=0)
        assert batch.num_images == 3 * 4 * 2  # the same budget for every method
        res = train_step(method, joint, batch, opt, settings, grad_clip=5.0)
        assert all(np.isfinite(v) for v in res.losses.values())
        grad = _first_conv(joint).grad
        assert grad is not None and float(grad.abs().sum()) > 0, "no gradient reached the backbone"
        assert res.grad_norm > 0
    assert not torch.equal(before, _first_conv(joint).detach())
    # BatchNorm running statistics follow training (one live pass per step)
    after = [b for n, b in joint.model.named_buffers() if n.endswith("running_mean")][0]
    assert not torch.equal(bn, after)


def _grads(joint: Joint) -> list[torch.Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in joint.parameters()]


@pytest.mark.parametrize("method", ["mfr", "cdt"])
def test_meta_step_with_alpha_zero_is_the_weighted_plain_loss(method, episodes):
    """α = 0: θ' = θ, so the meta-gradient must equal ∇[γ L_S + (1 − γ) L_T] computed directly;
    with α > 0 it must differ (so the comparison can fail)."""
    ds, sampler, classes = episodes
    torch.set_num_threads(1)
    gamma = 0.3
    batch = load_episode(ds, sampler.episode(1), seed=0)
    results = {}
    for alpha in (0.0, 0.5):
        settings = MethodSettings(alpha=alpha, gamma=gamma, first_order=False)
        joint = _joint(method, classes, settings, seed=1)
        joint.train()
        opt = torch.optim.SGD(joint.parameters(), lr=0.0)  # lr 0: parameters stay, grads remain readable
        train_step(method, joint, batch, opt, settings)
        results[alpha] = _grads(joint)
    settings = MethodSettings(alpha=0.0, gamma=gamma)
    plain = _joint(method, classes, settings, seed=1)
    plain.train()
    if method == "mfr":
        ls = mfr_loss(plain, batch.meta_train, settings, align=True)
        lt = mfr_loss(plain, batch.meta_test, settings, align=False)
    else:
        keep: list = []
        ls = cdt_train_loss(plain, batch.meta_train, settings, keep=keep)
        lt = cdt_test_loss(plain, batch.meta_test, keep, settings)
    (gamma * ls + (1 - gamma) * lt).backward()
    expected = _grads(plain)

    def rel(grads):  # relative difference of the whole gradient vector (float32 round-off ~1e-6)
        num = sum(float((a - b).pow(2).sum()) for a, b in zip(grads, expected, strict=True))
        return (num / sum(float(b.pow(2).sum()) for b in expected)) ** 0.5

    assert rel(results[0.0]) < 1e-4
    assert rel(results[0.5]) > 1e-2, "a real virtual step (alpha > 0) should change the meta-gradient"


def test_mfr_steps_resume_exactly(episodes):
    """4 MFR steps in one go == 2 steps, a save/load of model, heads and optimiser, then 2 more."""
    ds, sampler, classes = episodes
    torch.set_num_threads(1)
    settings = MethodSettings()

    def run(joint, opt, steps):
        for s in steps:
            train_step("mfr", joint, load_episode(ds, sampler.episode(s), seed=5), opt, settings, grad_clip=5.0)

    a = _joint("mfr", classes, settings)
    a.train()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    run(a, opt_a, range(4))

    b = _joint("mfr", classes, settings)
    b.train()
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    run(b, opt_b, range(2))
    saved_model, saved_opt = copy.deepcopy(b.state_dict()), copy.deepcopy(opt_b.state_dict())
    c = _joint("mfr", classes, settings, seed=99)  # different init: everything must come from the state
    c.load_state_dict(saved_model)
    c.train()
    opt_c = torch.optim.SGD(c.parameters(), lr=0.05, momentum=0.9)
    opt_c.load_state_dict(saved_opt)
    run(c, opt_c, range(2, 4))
    for (n, pa), pc in zip(a.state_dict().items(), c.state_dict().values(), strict=True):
        assert torch.equal(pa, pc), n


def test_mfr_trainer_run_resumes_exactly(data_dir, tmp_path, monkeypatch):
    """A Trainer run with method mfr, interrupted right after its step-3 checkpoint and resumed,
    ends with the same weights as an unbroken run (episodes and augmentations are functions of the step)."""
    from safetensors.torch import load_file

    from facemeta.train.config import load_config
    from facemeta.train.data import prepare_data
    from facemeta.train.trainer import Trainer

    over = {"model.image_size": 32, "model.embedding_size": 32, "sampler.identities_per_domain": 4, "steps": 6,
            "checkpoint_every": 3, "log_every": 3, "threads": 1, "eval.every": 0, "optim.warmup_steps": 2,
            "method": "mfr", "data.root": str(data_dir)}
    ref_cfg = load_config("smoke", overrides={**over, "output": str(tmp_path / "ref")})
    ref = Trainer(ref_cfg, prepare_data(ref_cfg), progress=False).fit()

    save = Trainer._save

    def crash_after_first(self, *args, **kwargs):
        path = save(self, *args, **kwargs)
        if self.step == 3:
            raise KeyboardInterrupt("simulated kill after the step-3 checkpoint")
        return path

    cfg = load_config("smoke", overrides={**over, "output": str(tmp_path / "cut")})
    monkeypatch.setattr(Trainer, "_save", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, prepare_data(cfg), progress=False).fit()
    monkeypatch.setattr(Trainer, "_save", save)
    trainer = Trainer(cfg, prepare_data(cfg), resume=True, progress=False)
    got = trainer.fit()
    assert trainer.resumed_from == 3
    a, b = load_file(str(ref)), load_file(str(got))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("method, weight", [("mfr", "hp_weight"), ("cdt", "triplet_weight")])
def test_term_weight_scales_its_term_only(method, weight, episodes):
    """L(w) − L(0) = w · (L(1) − L(0)) for the hard-pair (MFR) and triplet (CDT) weights, and the term is not
    zero on real faces (so the check can fail)."""
    ds, sampler, classes = episodes
    torch.set_num_threads(1)
    batch = load_episode(ds, sampler.episode(0), seed=0)
    joint = _joint(method, classes, MethodSettings(), seed=2)
    joint.eval()
    losses = {}
    with torch.no_grad():
        for w in (0.0, 1.0, 3.0):
            settings = MethodSettings(**{weight: w})
            if method == "mfr":
                losses[w] = float(mfr_loss(joint, batch.meta_train, settings, align=True))
            else:
                losses[w] = float(cdt_train_loss(joint, batch.meta_train, settings))
    term = losses[1.0] - losses[0.0]
    assert abs(term) > 1e-4
    assert losses[3.0] - losses[0.0] == pytest.approx(3 * term, rel=1e-4, abs=1e-5)


def test_term_weights_must_not_be_negative():
    for weight in ("hp_weight", "triplet_weight"):
        with pytest.raises(ValueError, match=weight):
            MethodSettings(**{weight: -1.0}).check()


def test_trainer_start_state_builds_without_training_or_files(data_dir, tmp_path):
    """Trainer.start_state: the model and the method's heads a run starts from (seeded: the same twice), over the
    run's training faces; no step, no file."""
    from facemeta.train.config import load_config
    from facemeta.train.data import prepare_data
    from facemeta.train.trainer import Trainer

    cfg = load_config("smoke", overrides={"model.image_size": 32, "model.embedding_size": 32, "threads": 1,
                                          "method": "mfr", "data.root": str(data_dir), "output": str(tmp_path / "run")})
    data = prepare_data(cfg)
    model, head, dataset = Trainer(cfg, data, progress=False).start_state()
    again, _, _ = Trainer(cfg, data, progress=False).start_state()
    assert len(dataset) == len(data.train)
    assert set(head.keys()) == {"cls"} and head["cls"].weight.shape[0] == len({r.identity for r in data.train})
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not (tmp_path / "run").exists()
