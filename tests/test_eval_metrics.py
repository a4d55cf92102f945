"""Verification / identification metrics, pair protocols, evaluate_rows on real faces, and reports."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import pytest
import torch

from facemeta.data.manifest import ManifestRow
from facemeta.eval.benchmark import evaluate_rows, identification_split, verification_metrics
from facemeta.eval.metrics import (
    best_accuracy_threshold,
    kfold_accuracy,
    rank1,
    rates_at_threshold,
    roc_auc,
    roc_curve,
    tar_at_far,
    threshold_at_far,
)
from facemeta.eval.pairs import all_pairs, match_pairs, pair_indices, pair_scores
from facemeta.eval.report import markdown_table, plot_roc
from facemeta.models import ModelConfig, build_model

# Six pairs by hand, sorted by score: + + − + − −
S6 = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
Y6 = np.array([1, 1, 0, 1, 0, 0], bool)


def test_roc_by_hand():
    far, tar, thr = roc_curve(S6[::-1], Y6[::-1])  # order of the input does not matter
    np.testing.assert_allclose(far, [0, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(tar, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    # 8 of the 9 (positive, negative) pairs are ordered correctly
    assert roc_auc(S6, Y6) == pytest.approx(8 / 9)


def test_tar_and_threshold_at_far_by_hand():
    assert tar_at_far(S6, Y6, 0.0) == pytest.approx(2 / 3)  # stop above the 0.7 negative
    assert tar_at_far(S6, Y6, 0.2) == pytest.approx(2 / 3)  # 1/3 > 0.2: still no negative allowed
    assert tar_at_far(S6, Y6, 1 / 3) == pytest.approx(1.0)
    assert threshold_at_far(S6, Y6, 0.0) == pytest.approx(0.75)  # halfway between 0.8 and 0.7
    assert threshold_at_far(S6, Y6, 1 / 3) == pytest.approx(0.55)
    # ties move together: with the top negative tied to a positive, FAR 0 accepts neither
    assert tar_at_far([0.9, 0.9, 0.5], [True, False, True], 0.0) == 0.0
    assert threshold_at_far([0.9, 0.9, 0.5], [True, False, True], 0.0) > 0.9


def test_rates_at_a_fixed_threshold_by_hand():
    assert rates_at_threshold(S6, Y6, 0.75) == (pytest.approx(2 / 3), 0.0)
    assert rates_at_threshold(S6, Y6, 0.55) == (1.0, pytest.approx(1 / 3))
    assert rates_at_threshold(S6, Y6, 0.5) == (1.0, pytest.approx(2 / 3))  # accepted when score >= threshold
    res = verification_metrics(S6, Y6, thresholds={"calibrated": 0.55})
    assert res["at_threshold"]["calibrated"] == {"threshold": 0.55, "tar": 1.0, "far": pytest.approx(1 / 3)}


def test_auc_with_ties_equals_roc_area_and_threshold_keeps_far():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 20, 3000).astype(float)  # many ties
    same = rng.random(3000) < 0.3 + scores / 40
    far, tar, _ = roc_curve(scores, same)
    assert roc_auc(scores, same) == pytest.approx(np.trapezoid(tar, far), abs=1e-12)
    for target in (0.3, 0.1, 0.01):
        t = threshold_at_far(scores, same, target)
        accepted = scores >= t
        assert accepted[~same].mean() <= target
        assert accepted[same].mean() == pytest.approx(tar_at_far(scores, same, target))


def test_perfect_separation():
    rng = np.random.default_rng(1)
    same = rng.random(5000) < 0.2
    scores = np.where(same, rng.uniform(0.6, 1.0, 5000), rng.uniform(-1.0, 0.5, 5000))
    assert roc_auc(scores, same) == 1.0
    assert tar_at_far(scores, same, 1e-3) == 1.0
    assert kfold_accuracy(scores, same)[0] == 1.0
    t = threshold_at_far(scores, same, 0.0)
    assert scores[~same].max() < t <= scores[same].min()
    # FAR 1e-3 of 3,988 negatives lets 3 through: the threshold goes below the 3rd highest negative
    t = threshold_at_far(scores, same, 1e-3)
    assert np.sum(scores[~same] >= t) == 3


def test_random_scores_are_at_chance():
    rng = np.random.default_rng(2)
    scores, same = rng.random(400_000), rng.random(400_000) < 0.5
    assert roc_auc(scores, same) == pytest.approx(0.5, abs=0.005)
    assert tar_at_far(scores, same, 0.01) == pytest.approx(0.01, abs=0.002)
    assert tar_at_far(scores, same, 0.1) == pytest.approx(0.1, abs=0.005)


def test_kfold_threshold_is_chosen_on_the_other_folds():
    # folds 2 and 3 separate at 0.5; fold 1 is shifted: its own best threshold (0.4) would score 100 %,
    # the others' threshold (0.5) rejects its positives -> 50 %.
    scores = np.array([0.45, 0.45, 0.35, 0.35, 0.8, 0.8, 0.2, 0.2, 0.8, 0.8, 0.2, 0.2])
    same = np.array([1, 1, 0, 0] * 3, bool)
    folds = np.repeat([1, 2, 3], 4)
    mean, std, thr = kfold_accuracy(scores, same, folds)
    assert thr[0] == pytest.approx(0.5)
    assert mean == pytest.approx((0.5 + 1 + 1) / 3)
    assert std == pytest.approx(np.std([0.5, 1, 1]))
    # an int gives contiguous folds, the layout of LFW pairs.txt
    assert kfold_accuracy(scores, same, 3)[0] == pytest.approx(mean)
    assert best_accuracy_threshold(S6, Y6) == (pytest.approx(0.75), pytest.approx(5 / 6))


def test_rank1_by_hand():
    gallery = np.array([[1, 0], [0, 1], [-1, 0]], float)
    probes = np.array([[0.9, 0.1], [0.2, 0.9], [-0.1, 1.0], [0.1, 0.9]], float)
    # nearest: a, b, b, b; the last probe is of identity "z", not enrolled -> a miss
    assert rank1(gallery, ["a", "b", "c"], probes, ["a", "b", "c", "z"]) == pytest.approx(0.5)
    assert rank1(gallery * 5, ["a", "b", "c"], probes, ["a", "b", "c", "z"], chunk=1) == pytest.approx(0.5)
    g, p = identification_split(["x", "y", "x", "x", "z", "y"])
    assert g.tolist() == [0, 1, 4] and p.tolist() == [2, 3, 5]


def test_all_pairs_and_scores():
    ia, ib, same = all_pairs(["a", "a", "b", "c", "b"])
    assert ia.size == 10 and np.all(ia < ib) and len(set(zip(ia, ib, strict=True))) == 10
    assert {(int(a), int(b)) for a, b, s in zip(ia, ib, same, strict=True) if s} == {(0, 1), (2, 4)}
    emb = np.random.default_rng(3).normal(size=(5, 8)).astype(np.float32)
    expect = np.einsum("ij,ij->i", emb[ia], emb[ib])
    np.testing.assert_allclose(pair_scores(emb, ia, ib), expect, rtol=1e-5)
    np.testing.assert_allclose(pair_scores(emb, ia, ib, chunk=3, gram_limit_bytes=0), expect, rtol=1e-5)
    with pytest.raises(ValueError, match="max_pairs"):
        all_pairs(np.arange(100), max_pairs=100)


def test_all_pairs_of_extended_yale_b(data_dir):
    ids = [p.parent.name for p in sorted((data_dir / "yaleb").glob("*/*.png"))]
    assert len(ids) == 2452
    ia, ib, same = all_pairs(ids)
    counts = np.unique(ids, return_counts=True)[1]
    assert ia.size == 2452 * 2451 // 2 == 3_004_926
    assert int(same.sum()) == int((counts * (counts - 1) // 2).sum())
    assert ia.dtype == np.int32 and ia.nbytes == 4 * ia.size


@dataclass
class P:
    """Stand-in with the fields of facemeta.data.sets.Pair."""

    a: str
    b: str
    same: bool
    fold: int


PEOPLE = ("Colin_Powell", "Serena_Williams", "Tony_Blair")


@pytest.fixture(scope="module")
def aligned(data_dir, tmp_path_factory):
    """Real LFW photos, centre crop written as 64 px PNGs under aligned/<person>/<stem>.png, plus raw paths."""
    root = tmp_path_factory.mktemp("aligned")
    raw, rows = [], []
    for person in PEOPLE:
        for src in sorted((data_dir / "lfw" / "images" / person).glob("*.jpg"))[:3]:
            img = cv2.imread(str(src))
            dst = root / person / f"{src.stem}.png"
            dst.parent.mkdir(exist_ok=True)
            cv2.imwrite(str(dst), cv2.resize(img[25:125, 25:125], (64, 64), interpolation=cv2.INTER_AREA))
            raw.append(str(src))
            rows.append(ManifestRow(str(dst), person, "lfw"))
    return raw, rows


def test_pair_paths_map_onto_aligned_rows(aligned):
    raw, rows = aligned
    pairs = [P(raw[0], raw[1], True, 1), P(rows[2].path, raw[4], False, 1), P(raw[0], "/x/Nobody_0001.jpg", False, 2)]
    m = match_pairs(rows, pairs)
    assert m.ia.tolist() == [0, 2] and m.ib.tolist() == [1, 4] and m.same.tolist() == [True, False]
    assert m.fold.tolist() == [1, 1] and m.missing == [(raw[0], "/x/Nobody_0001.jpg")]
    with pytest.warns(UserWarning, match="1 of 3 pairs"):
        ia, _, _ = pair_indices(rows, pairs)
    assert ia.tolist() == [0, 2]


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="mobilenetv3_small_100", image_size=64, embedding_size=128))


def test_evaluate_rows_end_to_end_on_real_faces(aligned, small_model):
    """Duplicated images are the only positives: an untrained net still scores identical inputs 1.0,
    above every pair of different photos, so AUC, TAR and rank-1 must all be 1 if the wiring is right."""
    raw, rows = aligned
    labelled = [ManifestRow(r.path, f"img{i}", "lfw") for i, r in enumerate(rows)]
    dups = [ManifestRow(r.path, f"img{i}", "lfw") for i, r in enumerate(rows[:6])]
    res = evaluate_rows(small_model, labelled + dups, flip=True)
    n = len(labelled) + len(dups)
    assert res["protocol"] == "all_pairs" and res["n_images"] == n
    assert res["n_pairs"] == n * (n - 1) // 2 and res["n_pos"] == 6
    assert res["auc"] == 1.0 and res["tar@far=1e-2"] == 1.0 and res["tar@far=1e-3"] == 1.0
    assert res["n_neg"] == 99 and not res["tar@far=1e-2_resolved"]  # FAR 1e-2 needs >= 100 negatives
    assert res["rank1"] == 1.0 and res["n_probes"] == 6
    assert len(res["roc"]["far"]) == len(res["roc"]["tar"]) > 0

    # pair-list protocol with folds; raw LFW paths map onto the aligned copies by file stem
    pairs = [P(rows[i].path, rows[i].path, True, 1 + i % 3) for i in range(6)]
    pairs += [P(raw[i], raw[j], False, 1 + (i + j) % 3) for i, j in [(0, 3), (1, 4), (2, 5), (0, 6), (1, 7),
                                                                    (2, 8), (3, 6), (4, 7), (5, 8)]]
    pairs.append(P(raw[0], "/elsewhere/Nobody_0001.jpg", True, 1))
    res = evaluate_rows(small_model, rows, pairs=pairs, flip=False)
    assert res["protocol"] == "pairs" and res["pairs_missing"] == 1
    assert res["n_pos"] == 6 and res["n_neg"] == 9
    assert res["acc"] == 1.0 and res["auc"] == 1.0
    assert res["rank1"] is not None and 0.0 <= res["rank1"] <= 1.0 and res["n_probes"] == 6


def test_plot_roc_writes_png(tmp_path):
    far, tar, _ = roc_curve(S6, Y6)
    rng = np.random.default_rng(4)
    s, y = rng.random(2000), rng.random(2000) < 0.5
    out = plot_roc({"hand": (far, tar), "random": roc_curve(s + y * 0.3, y)[:2]}, tmp_path / "roc.png",
                   title="test")
    img = cv2.imread(str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and img is not None and img.shape[0] > 200
    assert [p.name for p in tmp_path.iterdir()] == ["roc.png"]


def test_markdown_table_mean_std_and_best():
    results = {"ERM": {"auc": [0.90, 0.92, 0.94], "tar": 0.5, "eer": 0.1},
               "MFR": {"auc": [0.95, 0.95, 0.95], "tar": None, "eer": 0.2}}
    text = markdown_table(results, columns=["auc", "tar", "eer"], scale={"auc": 100}, digits=1,
                          lower_is_better=["eer"], headers={"auc": "AUC (%)"})
    lines = text.strip().splitlines()
    assert lines[0] == "| method | AUC (%) | tar | eer |"
    assert lines[2] == "| ERM | 92.0 ± 2.0 | **0.5** | **0.1** |"
    assert lines[3] == "| MFR | **95.0 ± 0.0** | — | 0.2 |"
