"""MFR and CDT losses against the same formulas written out by hand, loop by loop, in NumPy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facemeta.objectives.cdt import cdt_loss, cross_domain_triplet_loss, pair_covariances
from facemeta.objectives.mfr import (
    CosineSoftmaxHead,
    domain_alignment_loss,
    hard_pair_attention_loss,
    hard_pairs,
    mfr_domain_loss,
)


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_hard_pairs_picked_and_loss_by_hand():
    g = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    p = np.array([[0.8, 0.6], [1.0, 0.0], [0.6, 0.8]])
    # M = g pᵀ: diag = 0.8, 0.0, 1.0 -> hard positives (< 0.5): only identity 1.
    # Off-diagonal > 0.3: (0,1)=1.0, (0,2)=0.6, (1,0)=0.6, (1,2)=0.8, (2,0)=0.96, (2,1)=0.6.
    gt, pt = torch.tensor(g), torch.tensor(p)
    pos, neg = hard_pairs(gt, pt, tau_p=0.5, tau_n=0.3)
    assert pos.tolist() == [1]
    assert sorted(map(tuple, neg.tolist())) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    pos_d = [np.sum((g[i] - p[i]) ** 2) for i in [1]]
    neg_d = [np.sum((g[i] - p[j]) ** 2) for i, j in [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]]
    expected = np.mean(pos_d) / 2 - np.mean(neg_d) / 2
    assert hard_pair_attention_loss(gt, pt, 0.5, 0.3).item() == pytest.approx(expected, abs=1e-12)
    # Raising tau_n above every similarity leaves no hard negatives: only the positive term.
    assert hard_pair_attention_loss(gt, pt, 0.5, 0.99).item() == pytest.approx(np.mean(pos_d) / 2, abs=1e-12)
    # No hard pair at all gives exactly zero.
    assert hard_pair_attention_loss(gt, pt, -1.0, 1.0).item() == 0.0


def test_hard_pair_loss_random_matches_loops():
    rng = np.random.default_rng(0)
    g, p = unit(rng, 8, 5), unit(rng, 8, 5)
    tau_p, tau_n = 0.2, -0.1
    pos = [i for i in range(8) if g[i] @ p[i] < tau_p]
    neg = [(i, j) for i in range(8) for j in range(8) if i != j and g[i] @ p[j] > tau_n]
    assert pos and neg
    expected = (np.mean([np.sum((g[i] - p[i]) ** 2) for i in pos]) / 2
                - np.mean([np.sum((g[i] - p[j]) ** 2) for i, j in neg]) / 2)
    got = hard_pair_attention_loss(torch.tensor(g), torch.tensor(p), tau_p, tau_n).item()
    assert got == pytest.approx(expected, abs=1e-12)


def test_domain_alignment_by_hand():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    dom = torch.tensor([0, 0, 1, 1, 2])
    c = np.array([[0.5, 0.5], [2.0, 1.0], [0.0, 0.0]])
    expected = np.mean(np.sum((c - c.mean(0)) ** 2, axis=1))
    assert domain_alignment_loss(emb, dom).item() == pytest.approx(expected, abs=1e-12)
    assert domain_alignment_loss(emb[:2], dom[:2]).item() == 0.0


def test_soft_classification_is_scaled_cosine_cross_entropy():
    torch.manual_seed(0)
    head = CosineSoftmaxHead(4, 3, scale=10.0).double()
    emb = torch.randn(5, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1, 0])
    w = head.weight.detach().numpy()
    e = emb.numpy()
    cos = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    z = 10.0 * cos
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    expected = -np.mean(logp[np.arange(5), labels.numpy()])
    assert head.loss(emb, labels).item() == pytest.approx(expected, abs=1e-10)
    assert head(emb, labels).shape == (5, 3)  # forward: logits, as every head


def test_covariances_by_hand():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 3))
    labels = np.array([0, 0, 1, 1, 1, 2])
    pos = [(i, j) for i, j in itertools.combinations(range(6), 2) if labels[i] == labels[j]]
    neg = [(i, j) for i, j in itertools.combinations(range(6), 2) if labels[i] != labels[j]]
    sp = sum(np.outer(x[i] - x[j], x[i] - x[j]) for i, j in pos) / len(pos)
    sn = sum(np.outer(x[i] - x[j], x[i] - x[j]) for i, j in neg) / len(neg)
    cp, cn = pair_covariances(torch.tensor(x), torch.tensor(labels))
    np.testing.assert_allclose(cp.numpy(), sp, atol=1e-12)
    np.testing.assert_allclose(cn.numpy(), sn, atol=1e-12)
    with pytest.raises(ValueError):
        pair_covariances(torch.tensor(x[:3]), torch.tensor([0, 1, 2]))


def test_cdt_hinge_by_hand():
    rng = np.random.default_rng(2)
    src, src_l = unit(rng, 6, 4), np.array([0, 0, 1, 1, 2, 2])
    tgt, tgt_l = unit(rng, 5, 4), np.array([0, 0, 1, 1, 1])
    cp, cn = (t.numpy() for t in pair_covariances(torch.tensor(src), torch.tensor(src_l)))
    m = 0.1
    terms, hard = [], {}
    for a, p, n in itertools.product(range(5), repeat=3):
        if a != p and tgt_l[a] == tgt_l[p] and tgt_l[n] != tgt_l[a]:
            dp, dn = tgt[a] - tgt[p], tgt[a] - tgt[n]
            pt, nt = dp @ cp @ dp, dn @ cn @ dn
            terms.append(max(pt - nt + m, 0.0))
            hard[(a, p)] = min(hard.get((a, p), (np.inf, pt))[0], nt), pt
    expected_all = np.mean(terms)
    expected_hard = np.mean([max(pt - nt + m, 0.0) for nt, pt in hard.values()])
    got = cdt_loss(torch.tensor(src), torch.tensor(src_l), torch.tensor(tgt), torch.tensor(tgt_l), margin=m)
    assert got.item() == pytest.approx(expected_all, abs=1e-12)
    got_hard = cross_domain_triplet_loss(torch.tensor(tgt), torch.tensor(tgt_l), torch.tensor(cp),
                                         torch.tensor(cn), margin=m, mining="hard")
    assert got_hard.item() == pytest.approx(expected_hard, abs=1e-12)
    # A margin large enough makes every hinge active: the loss becomes linear in m.
    big = cdt_loss(torch.tensor(src), torch.tensor(src_l), torch.tensor(tgt), torch.tensor(tgt_l), margin=10.0)
    bigger = cdt_loss(torch.tensor(src), torch.tensor(src_l), torch.tensor(tgt), torch.tensor(tgt_l), margin=11.0)
    assert (bigger - big).item() == pytest.approx(1.0, abs=1e-9)


def test_losses_reach_the_backbone():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 8))
    x = torch.randn(12, 3, 10, 10)
    emb = F.normalize(net(x), dim=1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5])
    head = CosineSoftmaxHead(8, 6)
    mfr = mfr_domain_loss(emb[:3], emb[3:6], labels[:3], head, tau_p=1.1, tau_n=-1.1)
    total = (mfr["total"] + domain_alignment_loss(emb, torch.tensor([0] * 6 + [1] * 6))
             + cdt_loss(emb[:6], labels[:6], emb[6:], labels[6:], margin=5.0))
    total.backward()
    first = net[0].weight.grad
    assert first is not None and first.abs().sum().item() > 0
