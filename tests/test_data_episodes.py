"""Episodic multi-domain sampler, on the identities of the real shared sets."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from facemeta.data.episodes import EpisodicDomainSampler


@pytest.fixture(scope="module")
def real_labels(data_dir):
    """Labels and domains of ORL, MFR2 and Yale B images, listed from the real folders."""
    paths = sorted((data_dir / "orl").glob("s*/*.pgm")) + sorted((data_dir / "mfr2").glob("*/*.png")) \
        + sorted((data_dir / "yaleb").glob("yaleB*/*.png"))
    names = [f"{p.parts[-3]}/{p.parent.name}" for p in paths]
    ident = {n: i for i, n in enumerate(sorted(set(names)))}
    dom_names = sorted({p.parts[-3] for p in paths})
    labels = np.array([ident[n] for n in names])
    domains = np.array([dom_names.index(p.parts[-3]) for p in paths])
    assert len(dom_names) == 3 and len(paths) > 3000
    return labels, domains


def test_every_domain_takes_its_turn_and_batches_are_pairs(real_labels):
    labels, domains = real_labels
    sampler = EpisodicDomainSampler(labels, domains, identities_per_domain=8, meta_test_domains=1, seed=3)
    tests = Counter()
    for ep in sampler.iterate(0, 30):
        assert len(ep.meta_train) == 2 and len(ep.meta_test) == 1
        seen = {b.domain for b in ep.meta_train} | {b.domain for b in ep.meta_test}
        assert seen == {0, 1, 2}
        tests[ep.meta_test[0].domain] += 1
        for b in [*ep.meta_train, *ep.meta_test]:
            assert len(b.gallery) == 8 and len(set(b.labels)) == 8
            assert np.all(labels[b.gallery] == labels[b.probe])
            assert np.all(b.gallery != b.probe)
            assert np.all(domains[b.indices] == b.domain)
            assert b.local_labels.tolist() == list(range(8))
    # 30 steps = 10 full cycles of the 3 splits: each domain is meta-test exactly 10 times.
    assert tests == Counter({0: 10, 1: 10, 2: 10})


def test_episodes_are_a_function_of_seed_and_step(real_labels):
    labels, domains = real_labels
    a = EpisodicDomainSampler(labels, domains, identities_per_domain=4, seed=0)
    b = EpisodicDomainSampler(labels, domains, identities_per_domain=4, seed=0)
    c = EpisodicDomainSampler(labels, domains, identities_per_domain=4, seed=1)
    resumed = list(b.iterate(5, 8))
    for ep_a, ep_b in zip(list(a.iterate(0, 8))[5:], resumed, strict=True):
        np.testing.assert_array_equal(ep_a.indices, ep_b.indices)
    assert any(not np.array_equal(a.episode(s).indices, c.episode(s).indices) for s in range(4))


def test_bad_settings_are_refused(real_labels):
    labels, domains = real_labels
    with pytest.raises(ValueError):
        EpisodicDomainSampler(labels, domains, meta_test_domains=3)
    one = domains == 0
    with pytest.raises(ValueError, match="two domains"):
        EpisodicDomainSampler(labels[one], domains[one])
