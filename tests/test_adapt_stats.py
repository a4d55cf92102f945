"""The statistics variant of meta-training for adaptation (``adapt-stats``, facemeta.train.adapt_episodes): the
domain mean comes from the inner people's photos only and without their labels, the outer people are scored after
centring, gamma 1 is ERM's loss, and the whole network trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def _episode(seed: int = 0):
    from facemeta.train.methods import DomainTensors, EpisodeBatch

    g = torch.Generator().manual_seed(seed)
    doms = [DomainTensors(d, torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g),
                          torch.arange(4) + 4 * d) for d in range(2)]
    return EpisodeBatch(doms[:1], doms[1:])


@pytest.fixture(scope="module")
def joint():
    from facemeta.models.backbone import ModelConfig, build_model
    from facemeta.objectives.margins import CosFaceHead
    from facemeta.train.methods import Joint

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet10t", embedding_size=32, image_size=32))
    return Joint(model, {"cls": CosFaceHead(32, 8, s=64.0, m=0.05)}).eval()


@pytest.mark.parametrize("method", ["adapt-stats", "adapt-stats-proto"])
def test_registered_and_trains_the_whole_network(joint, method):
    from facemeta.train.methods import METHODS, MethodSettings

    joint.zero_grad(set_to_none=True)
    out = METHODS.get(method).grad(joint, _episode(), MethodSettings())
    assert np.isfinite(out["loss"]) and out["loss"] == pytest.approx(0.5 * out["loss_raw"] + 0.5 * out["loss_centred"])
    with_grad = {n for n, p in joint.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("model.backbone.conv1") for n in with_grad) and len(with_grad) > 10
    assert ("heads.cls.weight" in with_grad) == (method == "adapt-stats")


def test_gamma_one_is_erm_and_statistics_come_from_the_inner_photos_only(joint):
    """gamma 1: ERM's loss on the same batch. The centred term: unchanged when the inner people are relabelled
    (the statistics use no labels), changed when their photos change (the statistics come from them)."""
    from facemeta.train.adapt_episodes import split_people, stats_episode_loss
    from facemeta.train.methods import MethodSettings, erm_loss

    batch = _episode()
    with torch.no_grad():
        total, _ = stats_episode_loss(joint, batch, MethodSettings(gamma=1.0), step_seed=3)
        assert float(total) == pytest.approx(float(erm_loss(joint, batch)), rel=1e-5)
        _, base = stats_episode_loss(joint, batch, MethodSettings(), step_seed=3)
        rng = np.random.default_rng([0x57A7, 3])  # the split stats_episode_loss draws for this step
        inner = [list(split_people(4, None, rng).inner) for _ in batch.domains]
        for d, ix in zip(batch.domains, inner, strict=True):
            d.labels[ix] = d.labels[ix].flip(0)  # the inner people swap names
        _, relabelled = stats_episode_loss(joint, batch, MethodSettings(), step_seed=3)
        assert relabelled["loss_centred"] == pytest.approx(base["loss_centred"], rel=1e-6)
        for d, ix in zip(batch.domains, inner, strict=True):
            d.gallery[ix] = d.gallery[ix] * 3 + 1  # other photos of the inner (statistics) people
            d.probe[ix] = d.probe[ix] * 3 + 1
        _, moved = stats_episode_loss(joint, batch, MethodSettings(), step_seed=3)
    assert moved["loss_centred"] != pytest.approx(base["loss_centred"], abs=1e-6)
