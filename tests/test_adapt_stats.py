"""The statistics variant of meta-training for adaptation (``adapt-stats``, facemeta.train.adapt_episodes): the
domain mean comes from the inner people's photos only and without their labels, the outer people are scored, and
the whole network trains."""

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
    from facemeta.train.methods import Joint

    torch.manual_seed(0)
    return Joint(build_model(ModelConfig(backbone="resnet10t", embedding_size=32, image_size=32)), {}).eval()


def test_registered_and_trains_the_whole_network(joint):
    from facemeta.train.methods import METHODS, MethodSettings

    joint.zero_grad(set_to_none=True)
    out = METHODS.get("adapt-stats").grad(joint, _episode(), MethodSettings())
    assert np.isfinite(out["loss"]) and out["loss"] == pytest.approx(0.5 * out["loss_raw"] + 0.5 * out["loss_centred"])
    with_grad = {n for n, p in joint.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("model.backbone.conv1") for n in with_grad) and len(with_grad) > 10


def test_statistics_come_from_the_inner_people_without_their_labels(joint):
    """Relabelling the batch's people changes nothing (the mean uses no labels; the outer loss is over local
    labels); changing the INNER people's photos moves only the centred loss; gamma 1 ignores the centring."""
    from facemeta.train.adapt_episodes import inner_outer, stats_episode_loss
    from facemeta.train.methods import MethodSettings

    settings = MethodSettings()
    batch = _episode()
    with torch.no_grad():
        _, base = stats_episode_loss(joint, batch, settings, step_seed=3)
        for d in batch.domains:
            d.labels = d.labels + 100  # other global names, same people
        _, relabelled = stats_episode_loss(joint, batch, settings, step_seed=3)
        assert relabelled == pytest.approx(base)
        rng = np.random.default_rng([0x57A7, 3])  # the split stats_episode_loss draws for this step
        for d in batch.domains:
            (xi, _), _ = inner_outer(d.gallery, d.probe, d.labels, rng)
            inner = [i for i in range(4) if any(torch.equal(d.gallery[i], x) for x in xi)]
            d.gallery[inner] = d.gallery[inner] * 3 + 1  # other photos of the inner (statistics) people
            d.probe[inner] = d.probe[inner] * 3 + 1
        _, moved = stats_episode_loss(joint, batch, settings, step_seed=3)
    assert moved["loss_raw"] == pytest.approx(base["loss_raw"])  # the scored (outer) people did not change
    assert moved["loss_centred"] != pytest.approx(base["loss_centred"], abs=1e-6)
    with torch.no_grad():
        total, logs = stats_episode_loss(joint, batch, MethodSettings(gamma=1.0), step_seed=3)
    assert float(total) == pytest.approx(logs["loss_raw"])
