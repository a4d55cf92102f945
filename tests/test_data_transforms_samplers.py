"""Training transforms, FaceDataset and the domain-balanced batch sampler, on real face images."""

from __future__ import annotations

from collections import Counter

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from facemeta.data.samplers import DomainBalancedBatchSampler, FaceDataset, read_rgb
from facemeta.data.sets import read_set
from facemeta.data.transforms import AugmentConfig, build_eval_transform, build_train_transform
from facemeta.errors import ConfigError, ImageReadError


@pytest.fixture(scope="module")
def face(data_dir) -> np.ndarray:
    """A real MFR2 face (160x160, colour, roughly aligned)."""
    return read_rgb(str(data_dir / "mfr2" / "AdrianDunbar" / "AdrianDunbar_0002.png"))


@pytest.fixture(scope="module")
def small_rows(data_dir):
    """Two small real domains: ORL (40 x 10, grey 92x112) and MFR2 (53 people, colour 160x160)."""
    return read_set("orl", data_dir) + read_set("mfr2", data_dir)


@pytest.fixture(scope="module")
def source_rows(data_dir, small_rows):
    """The leave-one-out style source pool: LFW people.txt folds 1-5, ORL, MFR2, Yale B (no decoding)."""
    lfw = [r for r in read_set("lfw", data_dir) if int(r.extra["people_fold"]) <= 5]
    return lfw + small_rows + read_set("yaleb", data_dir)


# ---------------------------------------------------------------------------------------- transforms

def test_eval_transform_normalises_and_resizes(face, data_dir):
    t = build_eval_transform(112)
    x = t(face)
    assert x.shape == (3, 112, 112) and x.dtype == torch.float32
    ref = cv2.resize(face, (112, 112), interpolation=cv2.INTER_AREA).astype(np.float32) / 127.5 - 1.0
    assert torch.allclose(x, torch.from_numpy(ref).permute(2, 0, 1), atol=1e-6)
    assert -1.0 <= x.min() < -0.5 and 0.5 < x.max() <= 1.0
    orl = cv2.imread(str(data_dir / "orl" / "s1" / "1.pgm"), cv2.IMREAD_GRAYSCALE)  # 92x112 grey, 2-D
    y = t(orl)
    assert y.shape == (3, 112, 112) and torch.equal(y[0], y[1]) and torch.equal(y[1], y[2])


def test_each_augmentation_can_be_switched(face):
    size = 160
    plain = build_eval_transform(size)(face)
    assert torch.equal(build_train_transform(AugmentConfig.off(), size)(face, seed=1), plain)
    flip = build_train_transform(AugmentConfig(flip=1.0, color=0, blur=0, jpeg=0, erase=0), size)
    assert torch.equal(flip(face, seed=3), torch.flip(plain, dims=[2]))
    changes = {}
    for name in ("color", "blur", "jpeg", "erase", "gray"):
        cfg = AugmentConfig.off()
        setattr(cfg, name, 1.0)
        out = build_train_transform(cfg, size)(face, seed=7)
        assert out.shape == plain.shape and out.min() >= -1.0 and out.max() <= 1.0
        changes[name] = (out - plain).abs()
    assert all(c.mean() > 0.005 for c in changes.values()), {k: float(v.mean()) for k, v in changes.items()}
    gray = build_train_transform(AugmentConfig(flip=0, color=0, blur=0, jpeg=0, erase=0, gray=1.0), size)(face)
    assert torch.allclose(gray[0], gray[1], atol=1e-6)
    # erasing touches one rectangle only: most pixels stay exactly as they were
    untouched = (changes["erase"].sum(0) == 0).float().mean()
    assert 0.5 < untouched < 0.99


def test_seeded_augmentation_is_reproducible(face):
    t = build_train_transform(AugmentConfig(flip=0.5, color=0.5, blur=0.5, jpeg=0.5, erase=0.5), 112)
    a, b = t(face, seed=11), t(face, seed=11)
    assert torch.equal(a, b)
    outs = [t(face, seed=s).numpy() for s in range(12)]
    assert len({float(o.sum()) for o in outs}) > 6  # different seeds, different augmentations
    # the steps get independent streams: over many seeds flips and erasures are not tied together
    t2 = build_train_transform(AugmentConfig(flip=0.5, color=0, blur=0, jpeg=0, erase=0.5), 112)
    plain = build_eval_transform(112)(face).numpy()
    mirrored = plain[:, :, ::-1]
    kinds = Counter()
    for s in range(40):
        o = t2(face, seed=s).numpy()
        is_flip = bool((o == mirrored).mean() > (o == plain).mean())
        erased = not np.array_equal(o, mirrored if is_flip else plain)
        kinds[(is_flip, erased)] += 1
    assert len(kinds) == 4, kinds


def test_augment_config_validation():
    with pytest.raises(ConfigError, match="flip"):
        AugmentConfig(flip=1.5)
    with pytest.raises(ConfigError, match="jpeg_quality"):
        AugmentConfig(jpeg_quality=(0, 90))
    with pytest.raises(ConfigError, match="unknown augment setting"):
        AugmentConfig.from_dict({"flipp": 0.5})
    cfg = AugmentConfig.from_dict({"erase": 0.0, "jpeg_quality": [50, 90]})
    assert cfg.jpeg_quality == (50, 90) and cfg.as_dict()["jpeg_quality"] == [50, 90]


# ----------------------------------------------------------------------------------------- dataset

def test_face_dataset_items(small_rows, tmp_path):
    ds = FaceDataset(small_rows, build_train_transform(AugmentConfig(), 112), image_size=112)
    assert ds.domain_to_index == {"mfr2": 0, "orl": 1}
    names = sorted({r.identity for r in small_rows})
    assert ds.num_classes == 93 and ds.identity_to_label == {n: i for i, n in enumerate(names)}
    i_orl, i_mfr = 0, 400
    x, label, dom = ds[i_orl]
    assert x.shape == (3, 112, 112) and label == ds.identity_to_label["s1"] and dom == 1
    x, label, dom = ds[i_mfr]
    assert x.shape == (3, 112, 112) and label == ds.identity_to_label["AdrianDunbar"] and dom == 0
    assert torch.equal(ds[(i_mfr, 5)][0], ds[(i_mfr, 5)][0])
    raw = FaceDataset(small_rows[:2], None)
    assert raw[0][0].dtype == torch.uint8 and raw[0][0].shape == (3, 112, 92)
    # a validation set keeps the training label map; identities outside it are an error
    val = FaceDataset(small_rows[:10], None, identity_to_label=ds.identity_to_label)
    assert val.labels.tolist() == [ds.identity_to_label["s1"]] * 10
    with pytest.raises(ConfigError, match="missing from identity_to_label"):
        FaceDataset(small_rows, None, identity_to_label={"s1": 0})
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    bad = FaceDataset([small_rows[0].__class__(str(broken), "x", "orl")], None)
    with pytest.raises(ImageReadError, match="cannot read"):
        bad[0]


def test_dataloader_with_balanced_seeded_batches(small_rows):
    ds = FaceDataset(small_rows, build_train_transform(AugmentConfig(), 112), image_size=112)
    sampler = DomainBalancedBatchSampler(ds.labels, ds.domains, identities_per_domain=3, images_per_identity=2,
                                         seed=5, num_batches=2, with_seeds=True)
    first = [b for b in DataLoader(ds, batch_sampler=sampler)]
    again = [b for b in DataLoader(ds, batch_sampler=sampler)]
    assert len(first) == 2
    images, labels, domains = first[0]
    assert images.shape == (12, 3, 112, 112) and domains.tolist() == [0] * 6 + [1] * 6
    assert Counter(labels.tolist()) == Counter({lab: 2 for lab in labels.tolist()})
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))


# ----------------------------------------------------------------------------------------- sampler

def test_batches_hold_every_domain_with_p_identities_of_k(source_rows):
    ds = FaceDataset(source_rows, None)
    P, K = 8, 2
    s = DomainBalancedBatchSampler(ds.labels, ds.domains, identities_per_domain=P, images_per_identity=K, seed=3)
    assert s.batch_size == 4 * P * K and len(s) == s.num_batches > 10
    counts = Counter(zip(ds.domains.tolist(), ds.labels.tolist(), strict=True))
    batches = list(s)
    for batch in batches:
        assert len(batch) == s.batch_size and len(set(batch)) == len(batch)
        per_domain = Counter(int(ds.domains[i]) for i in batch)
        assert per_domain == {d: P * K for d in range(4)}
        per_id = Counter((int(ds.domains[i]), int(ds.labels[i])) for i in batch)
        assert len(per_id) == 4 * P and set(per_id.values()) == {K}
        assert all(counts[key] >= K for key in per_id)  # single-image LFW people never drawn
    # ORL's 40 identities are all used before any repeats: 5 batches of 8 cover each once
    orl = ds.domain_to_index["orl"]
    first5 = Counter(int(ds.labels[i]) for b in batches[:5] for i in b if ds.domains[i] == orl)
    assert len(first5) == 40 and set(first5.values()) == {K}
    with pytest.raises(ConfigError, match="identities with >= 11 images"):
        DomainBalancedBatchSampler(ds.labels, ds.domains, identities_per_domain=2, images_per_identity=11)


def test_sampler_is_deterministic_and_resumes_exactly(source_rows):
    ds = FaceDataset(source_rows, None)
    make = lambda: DomainBalancedBatchSampler(ds.labels, ds.domains, 4, 2, seed=9, num_batches=20)  # noqa: E731
    a, b = make(), make()
    epoch0 = [list(x) for x in a]
    assert epoch0 == [list(x) for x in b]
    a.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 != epoch0
    # an interrupted epoch: save after 7 batches, resume in a fresh sampler
    c = make()
    c.set_epoch(1)
    it = iter(c)
    done = [next(it) for _ in range(7)]
    state = c.state_dict()
    assert state["epoch"] == 1 and state["position"] == 7
    d = make()
    d.load_state_dict(state)
    assert len(d) == 13
    rest = list(d)
    assert done + rest == epoch1
    # a DataLoader that pulled ahead: the trainer passes the batches it actually consumed
    e = make()
    e.load_state_dict(c.state_dict(consumed=5))
    assert list(e) == epoch1[5:]
    assert list(e) == epoch1  # the resume position applies to one iteration only
    with pytest.raises(ConfigError, match="num_batches"):
        DomainBalancedBatchSampler(ds.labels, ds.domains, 4, 2, seed=9, num_batches=21).load_state_dict(state)


def test_ddp_ranks_get_disjoint_shares(source_rows):
    ds = FaceDataset(source_rows, None)
    ranks = [DomainBalancedBatchSampler(ds.labels, ds.domains, 4, 2, seed=2, num_batches=6, rank=r, world_size=3)
             for r in range(3)]
    shares = [[tuple(x) for x in s] for s in ranks]
    assert all(len(sh) == 6 for sh in shares)
    glob = [tuple(x.tolist()) for x in ranks[0].epoch_batches()]
    assert len(glob) == 18 and len(set(glob)) == 18
    for r, sh in enumerate(shares):
        assert sh == glob[r::3]
    assert not (set(shares[0]) & set(shares[1])) and not (set(shares[1]) & set(shares[2]))
    with pytest.raises(ConfigError, match="rank"):
        DomainBalancedBatchSampler(ds.labels, ds.domains, 4, 2, rank=3, world_size=3)


def test_dataloader_workers_do_not_repeat_each_others_augmentations(small_rows):
    # forked workers inherit the same albumentations generators; FaceDataset reseeds each worker
    row = small_rows[400]
    ds = FaceDataset([row] * 4, build_train_transform(AugmentConfig(flip=0.5, color=1.0, blur=0, jpeg=0, erase=0), 112),
                     image_size=112)
    batches = [b[0] for b in DataLoader(ds, batch_size=2, num_workers=2, shuffle=False)]
    assert len(batches) == 2  # batch 0 from worker 0, batch 1 from worker 1
    assert not torch.equal(batches[0][0], batches[1][0]) and not torch.equal(batches[0][1], batches[1][1])
