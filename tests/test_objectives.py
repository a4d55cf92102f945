"""ArcFace / CosFace heads and the triplet loss, checked against numbers worked out by hand."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from facemeta.objectives import ArcFaceHead, CosFaceHead, triplet_loss


def head_with(cls, weights, **kw):
    head = cls(embedding_size=len(weights[0]), num_classes=len(weights), **kw)
    with torch.no_grad():
        head.weight.copy_(torch.tensor(weights, dtype=torch.float32))
    return head


# class directions (1,0), (0,1) (given unnormalised: the head normalises), (-1,0)
W = [[1.0, 0.0], [0.0, 3.0], [-2.0, 0.0]]


def test_cosface_logits_by_hand():
    head = head_with(CosFaceHead, W)  # s=64, m=0.4
    emb = torch.tensor([[3.0, 4.0]])  # unit direction (0.6, 0.8): cos = 0.6, 0.8, -0.6
    logits = head(emb, torch.tensor([1]))
    torch.testing.assert_close(logits, torch.tensor([[38.4, 64 * (0.8 - 0.4), -38.4]]))  # 25.6 on target


def test_arcface_logits_by_hand():
    head = head_with(ArcFaceHead, W)  # s=64, m=0.5
    emb = torch.tensor([[0.6, 0.8]])
    # target: cos(acos 0.8 + 0.5) = 0.8 cos 0.5 − 0.6 sin 0.5 = 0.70206 − 0.28766 = 0.41441
    logits = head(emb, torch.tensor([1]))
    torch.testing.assert_close(logits, torch.tensor([[38.4, 64 * 0.414405, -38.4]]), rtol=0, atol=2e-3)
    # beyond θ + m = π (cos θ = −0.96 < cos(π − 0.5) = −0.8776) insightface uses cos θ − m·sin(m)
    far = torch.tensor([[-0.96, 0.28]])
    logits = head(far, torch.tensor([0]))
    assert logits[0, 0].item() == pytest.approx(64 * (-0.96 - 0.5 * math.sin(0.5)), abs=1e-3)  # −76.78
    # easy margin: no margin where cos θ <= 0
    easy = head_with(ArcFaceHead, W, easy_margin=True)
    assert easy(emb, torch.tensor([2]))[0, 2].item() == pytest.approx(-38.4, abs=1e-4)
    assert easy(emb, torch.tensor([1]))[0, 1].item() == pytest.approx(64 * 0.414405, abs=2e-3)


@pytest.mark.parametrize("cls", [ArcFaceHead, CosFaceHead])
def test_margin_only_on_target_class_and_gradients_flow(cls):
    torch.manual_seed(0)
    head = cls(16, 10)
    emb = torch.randn(12, 16, requires_grad=True)
    labels = torch.randint(0, 10, (12,))
    logits = head(emb, labels)
    plain = head.cosine(emb) * head.s
    target = F.one_hot(labels, 10).bool()
    torch.testing.assert_close(logits[~target], plain[~target])
    assert torch.all(logits[target] < plain[target])  # the margin makes the target harder
    loss = head.loss(emb, labels)
    loss.backward()
    assert torch.isfinite(loss) and emb.grad is not None and emb.grad.abs().sum() > 0
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_unlabelled_rows_get_no_margin_and_no_loss():
    torch.manual_seed(1)
    head = CosFaceHead(8, 5)
    emb = torch.randn(4, 8)
    labels = torch.tensor([0, -1, 3, -1])
    logits = head(emb, labels)
    torch.testing.assert_close(logits[1], head.cosine(emb)[1] * 64)
    keep = labels >= 0
    torch.testing.assert_close(head.loss(emb, labels), F.cross_entropy(logits[keep], labels[keep]))
    with pytest.raises(ValueError):
        head(emb, torch.tensor([0, 1, 2, 5]))


def test_arcface_is_finite_when_embedding_equals_class_weight():
    head = head_with(ArcFaceHead, W)
    emb = torch.tensor([[1.0, 0.0]], requires_grad=True)  # cos θ = 1, sin θ = 0
    head.loss(emb, torch.tensor([0])).backward()
    assert torch.all(torch.isfinite(emb.grad))


@pytest.mark.parametrize("cls", [ArcFaceHead, CosFaceHead])
def test_training_free_embeddings_separates_classes(cls):
    torch.manual_seed(2)
    head = cls(8, 4, s=16.0)
    emb = torch.nn.Parameter(torch.randn(32, 8))
    labels = torch.arange(32) % 4
    opt = torch.optim.SGD([emb, *head.parameters()], lr=0.5)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = head.loss(emb, labels)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert torch.equal(head.cosine(emb).argmax(1), labels)


# Four unit vectors: labels 0, 0, 1, 1. Squared distances (2 − 2 cos): d01=0.8, d02=0.4, d03=4,
# d12=0.08, d13=3.2, d23=3.6.
PTS = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [-1.0, 0.0]])
LAB = torch.tensor([0, 0, 1, 1])


def test_batch_hard_triplet_by_hand():
    # anchors: 0.8−0.4+0.2=0.6, 0.8−0.08+0.2=0.92, 3.6−0.08+0.2=3.72, 3.6−3.2+0.2=0.6 -> mean 1.46
    assert triplet_loss(PTS * 2.5, LAB, margin=0.2).item() == pytest.approx(1.46, abs=1e-5)


def test_batch_all_triplet_by_hand():
    # active triplets: (0,1,2) 0.6, (1,0,2) 0.92, (2,3,0) 3.4, (2,3,1) 3.72, (3,2,1) 0.6 -> mean 1.848
    assert triplet_loss(PTS, LAB, margin=0.2, mining="all").item() == pytest.approx(1.848, abs=1e-5)


def test_triplet_matches_loops_and_trains():
    torch.manual_seed(3)
    emb = torch.randn(24, 6, requires_grad=True)
    labels = torch.randint(0, 5, (24,))
    e = F.normalize(emb.detach(), dim=1)
    d = ((e[:, None] - e[None]) ** 2).sum(-1)
    hard, every = [], []
    for a in range(24):
        pos = [p for p in range(24) if p != a and labels[p] == labels[a]]
        neg = [n for n in range(24) if labels[n] != labels[a]]
        if pos and neg:
            hard.append(max(0.0, max(d[a, p] for p in pos) - min(d[a, n] for n in neg) + 0.3))
        every += [max(0.0, float(d[a, p] - d[a, n] + 0.3)) for p, n in itertools.product(pos, neg)]
    active = [v for v in every if v > 0]
    loss = triplet_loss(emb, labels, margin=0.3)
    assert loss.item() == pytest.approx(float(sum(hard) / len(hard)), abs=1e-5)
    assert triplet_loss(emb, labels, 0.3, "all").item() == pytest.approx(sum(active) / len(active), abs=1e-5)
    loss.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    opt = torch.optim.SGD([emb], lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        triplet_loss(emb, labels, margin=0.3).backward()
        opt.step()
    assert triplet_loss(emb, labels, margin=0.3).item() < 0.5 * loss.item()


def test_triplet_without_valid_triplets_is_zero_and_connected():
    emb = torch.randn(3, 4, requires_grad=True)
    loss = triplet_loss(emb, torch.tensor([0, 1, 2]))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    with pytest.raises(ValueError, match="unknown mining"):
        triplet_loss(emb, torch.tensor([0, 0, 1]), mining="semi")
