"""N-way K-shot episodes over real ORL labels and files."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from facemeta.meta import EpisodeSampler, episode_tensors


@pytest.fixture(scope="module")
def orl_files(data_dir):
    files = sorted((data_dir / "orl").glob("s*/*.pgm"))
    assert len(files) == 400
    return files, [f.parent.name for f in files]


def test_episode_structure(orl_files):
    _, labels = orl_files
    sampler = EpisodeSampler(labels, n_way=5, k_shot=2, n_query=3, num_episodes=50, seed=7)
    assert len(sampler) == 50 and len(sampler.classes) == 40
    seen = Counter()
    for ep in sampler:
        assert len(set(ep.classes)) == 5
        assert len(ep.support) == 10 and len(ep.query) == 15
        assert not set(ep.support) & set(ep.query)
        assert list(ep.support_labels) == [j for j in range(5) for _ in range(2)]
        assert list(ep.query_labels) == [j for j in range(5) for _ in range(3)]
        for idx, lab in zip(ep.support + ep.query, ep.support_labels + ep.query_labels, strict=True):
            assert labels[idx] == ep.classes[lab]
        seen.update(ep.classes)
    assert len(seen) > 30  # classes are spread, not always the same few


def test_episodes_reproducible(orl_files):
    _, labels = orl_files
    a = EpisodeSampler(labels, 5, 1, 4, num_episodes=5, seed=1)
    b = EpisodeSampler(labels, 5, 1, 4, num_episodes=5, seed=1)
    c = EpisodeSampler(labels, 5, 1, 4, num_episodes=5, seed=2)
    assert list(a) == list(b)
    assert list(a) != list(c)
    assert a.episode(3) == list(a)[3]


def test_too_few_classes_or_examples(orl_files):
    _, labels = orl_files
    with pytest.raises(ValueError, match="classes with >= 11 examples"):
        EpisodeSampler(labels, 5, 1, 10)  # ORL has 10 images per subject
    with pytest.raises(ValueError, match="41-way"):
        EpisodeSampler(labels, 41, 1, 1)
    with pytest.raises(ValueError, match="k_shot"):
        EpisodeSampler(labels, 5, 0, 1)
    # Classes that are too small are skipped, not an error, when enough remain.
    s = EpisodeSampler(labels[:95] + ["lonely"], 5, 1, 1)
    assert "lonely" not in s.classes


def test_episode_tensors_from_real_images(orl_files):
    files, labels = orl_files

    class Orl:
        def __getitem__(self, i):
            img = np.asarray(Image.open(files[i]).resize((23, 28)), dtype=np.float32) / 255.0
            return torch.from_numpy(img)[None], labels[i]

    ep = EpisodeSampler(labels, 5, 1, 2, seed=0).episode(0)
    xs, ys, xq, yq = episode_tensors(Orl(), ep)
    assert xs.shape == (5, 1, 28, 23) and xq.shape == (10, 1, 28, 23)
    assert ys.tolist() == [0, 1, 2, 3, 4] and yq.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert 0.0 <= float(xs.min()) and float(xs.max()) <= 1.0 and float(xs.std()) > 0.05
