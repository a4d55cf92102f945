"""FaceEmbeddingModel, preprocess/embed and safetensors checkpoints, on real LFW faces."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facemeta.errors import CheckpointError, ConfigError
from facemeta.models import (
    FaceEmbeddingModel,
    ModelConfig,
    build_model,
    embed,
    load_checkpoint,
    preprocess,
    read_checkpoint_info,
    save_checkpoint,
    update_meta,
)

PEOPLE = ("Colin_Powell", "Serena_Williams")


def real_faces(data_dir: Path, size: int, per_person: int = 2) -> np.ndarray:
    """Real LFW photos, centre crop around the face (alignment is not this module's job), RGB uint8."""
    out = []
    for person in PEOPLE:
        for path in sorted((data_dir / "lfw" / "images" / person).glob("*.jpg"))[:per_person]:
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            assert bgr is not None, path
            crop = bgr[25:125, 25:125]
            out.append(cv2.resize(cv2.cvtColor(crop, cv2.COLOR_BGR2RGB), (size, size),
                                  interpolation=cv2.INTER_AREA))
    return np.stack(out)


@pytest.fixture(scope="module")
def faces64(data_dir) -> np.ndarray:
    return real_faces(data_dir, 64)


@pytest.fixture(scope="module")
def r18() -> FaceEmbeddingModel:
    """resnet18 at 64 px: the real architecture, 3x cheaper than 112 px for the behaviour tests."""
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="resnet18", image_size=64)).eval()


@pytest.mark.parametrize("backbone,size,emb", [
    ("resnet18", 112, 512),
    ("mobilenetv3_small_100", 64, 128),
    pytest.param("efficientnet_b0", 96, 256, marks=pytest.mark.slow),
    pytest.param("mobilenetv3_large_100", 112, 512, marks=pytest.mark.slow),
    ("vit_tiny_patch16_224", 64, 512),  # tokens [B, N, C], input size set at construction
])
def test_unit_embeddings_on_real_faces(data_dir, backbone, size, emb):
    faces = real_faces(data_dir, size)
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, image_size=size, embedding_size=emb))
    out = embed(model, faces, batch_size=4)
    assert out.shape == (len(faces), emb) and out.dtype == np.float32
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # rows are not copies of one vector (untrained nets map faces close together, but not equal)
    assert np.linalg.norm(out[0] - out[-1]) > 1e-5
    # training mode: gradients reach the first layer of the backbone
    model.train()
    x = model.preprocess(faces)
    (model(x) @ torch.randn(emb, 1)).sum().backward()  # not |e|^2: that is constant for unit vectors
    first = next(p for p in model.backbone.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_batching_channels_last_and_flip(r18, faces64):
    base = embed(r18, faces64, batch_size=64, channels_last=False)
    one = embed(r18, faces64, batch_size=1, channels_last=False)
    cl = embed(r18, faces64, batch_size=64, channels_last=True)
    np.testing.assert_allclose(one, base, atol=2e-5)
    np.testing.assert_allclose(cl, base, atol=2e-5)
    flipped = embed(r18, faces64, flip=True, channels_last=False)
    mirror = embed(r18, np.ascontiguousarray(faces64[:, :, ::-1]), channels_last=False)
    expect = base + mirror
    expect /= np.linalg.norm(expect, axis=1, keepdims=True)
    np.testing.assert_allclose(flipped, expect, atol=2e-5)
    assert not np.allclose(flipped, base, atol=1e-3)  # the mirror really changes something
    assert r18.training is False


def test_embed_keeps_training_mode(r18, faces64):
    r18.train()
    try:
        embed(r18, faces64[:2], channels_last=False)
        assert r18.training
    finally:
        r18.eval()


def test_head_matches_insightface_layout(r18):
    assert r18.feature_shape == (512, 2, 2)  # 64 px / stride 32
    assert r18.fc.in_features == 512 * 2 * 2 and r18.fc.out_features == 512
    names = {n for n, _ in r18.named_parameters()}
    assert "features.weight" not in names and "features.bias" in names  # BN1d scale fixed at 1
    assert torch.equal(r18.state_dict()["features.weight"], torch.ones(512))


def test_preprocess_values_and_resizing():
    faces = np.zeros((2, 112, 112, 3), np.uint8)
    faces[1] = 255
    x = preprocess(faces, ModelConfig())
    assert x.shape == (2, 3, 112, 112) and x.dtype == torch.float32
    assert torch.all(x[0] == -1) and torch.all(x[1] == 1)
    cfg = ModelConfig(image_size=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    grey = np.full((150, 150), 128, np.uint8)
    y = preprocess([grey, np.full((90, 90, 3), 128, np.uint8)], cfg)
    assert y.shape == (2, 3, 64, 64)
    np.testing.assert_allclose(y[0, :, 0, 0].numpy(), (128 / 255 - np.array(cfg.mean)) / np.array(cfg.std),
                               rtol=1e-5)
    with pytest.raises(ValueError):
        preprocess(np.zeros((1, 112, 112, 3), np.float32))
    with pytest.raises(ValueError):
        preprocess(np.zeros((112, 112, 3), np.uint8))  # a single face, not a batch


def test_unknown_backbone_is_config_error():
    with pytest.raises(ConfigError, match="unknown timm backbone"):
        build_model(ModelConfig(backbone="resnet_does_not_exist"))


def test_pretrained_path_loads_backbone_weights(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    donor = timm.create_model("resnet18", pretrained=False, num_classes=10)  # with a classifier
    pth, st = tmp_path / "r18.pth", tmp_path / "r18.safetensors"
    torch.save({"state_dict": donor.state_dict()}, pth)
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(st))
    for path in (pth, st):
        model = FaceEmbeddingModel(ModelConfig(), pretrained_path=path)
        assert torch.equal(model.backbone.conv1.weight, donor.conv1.weight)
        assert torch.equal(model.backbone.layer4[1].bn2.running_var, donor.layer4[1].bn2.running_var)
    other = tmp_path / "mnv3.pth"
    torch.save(timm.create_model("mobilenetv3_small_100", pretrained=False).state_dict(), other)
    with pytest.raises(CheckpointError, match="does not fit backbone"):
        FaceEmbeddingModel(ModelConfig(), pretrained_path=other)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pretrained_path_never_unpickles_objects(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"x": _Evil()}, evil)
    with pytest.raises(CheckpointError, match="cannot read weights"):
        FaceEmbeddingModel(ModelConfig(), pretrained_path=evil)


def test_checkpoint_round_trip_gives_equal_outputs(r18, faces64, tmp_path):
    meta = {"method": "erm", "train_sets": ["lfw:1-5", "orl"], "threshold": 0.31, "threshold_far": 1e-3}
    path = save_checkpoint(r18, tmp_path / "model.safetensors", meta=meta)
    assert path.is_file() and path.with_suffix(".json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]  # no temp files
    doc = json.loads(path.with_suffix(".json").read_text())
    assert doc["config"]["backbone"] == "resnet18" and doc["config"]["image_size"] == 64
    assert doc["meta"] == meta
    model, meta2 = load_checkpoint(path, expected=ModelConfig(image_size=64))
    assert meta2 == meta and model.config == r18.config and not model.training
    np.testing.assert_array_equal(embed(model, faces64, channels_last=False),
                                  embed(r18, faces64, channels_last=False))
    # a lone .safetensors still loads: the JSON is also inside its header
    path.with_suffix(".json").unlink()
    model3, meta3 = load_checkpoint(path)
    assert meta3 == meta
    np.testing.assert_array_equal(embed(model3, faces64[:2], channels_last=False),
                                  embed(r18, faces64[:2], channels_last=False))


def test_half_checkpoint_is_half_the_size_and_close(r18, faces64, tmp_path):
    full = save_checkpoint(r18, tmp_path / "full.safetensors", meta={"method": "erm"})
    half = save_checkpoint(r18, tmp_path / "half.safetensors", meta={"method": "erm"}, half=True)
    assert half.stat().st_size < 0.52 * full.stat().st_size
    model, meta = load_checkpoint(half)
    assert meta == {"method": "erm", "weights_dtype": "float16"}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # computed in float32 on load
    a = embed(r18, faces64, channels_last=False)
    b = embed(model, faces64, channels_last=False)
    assert not np.array_equal(a, b)  # the weights were rounded ...
    assert np.abs((a * b).sum(1) - 1).max() < 1e-3  # ... but the embeddings barely move (cosine)


def test_update_meta_leaves_weights_untouched(r18, tmp_path):
    path = save_checkpoint(r18, tmp_path / "m.safetensors", meta={"method": "erm"})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    new = update_meta(path, threshold=0.4, threshold_far=0.001)
    assert new == {"method": "erm", "threshold": 0.4, "threshold_far": 0.001}
    assert read_checkpoint_info(path)["meta"] == new
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="mobilenetv3_small_100", image_size=64, embedding_size=128))
    return save_checkpoint(model, tmp_path_factory.mktemp("ck") / "small.safetensors", meta={"m": 1})


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


def test_missing_and_corrupt_checkpoints(small_ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="not found") as e:
        load_checkpoint(tmp_path / "nothing.safetensors")
    _one_line(e)
    data = small_ckpt.read_bytes()
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(truncated)
    assert "trunc.safetensors" in _one_line(e)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="corrupt") as e:
        load_checkpoint(garbage)
    _one_line(e)
    bad_json = tmp_path / "badjson.safetensors"
    bad_json.write_bytes(data)
    bad_json.with_suffix(".json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(bad_json)


def test_wrong_architecture_is_a_clear_error(small_ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="is mobilenetv3_small_100 128-d 64px, expected resnet18") as e:
        load_checkpoint(small_ckpt, expected=ModelConfig(backbone="resnet18"))
    _one_line(e)
    with pytest.raises(CheckpointError, match="normalises with"):
        load_checkpoint(small_ckpt, expected=ModelConfig(backbone="mobilenetv3_small_100", image_size=64,
                                                         embedding_size=128, mean=(0.4, 0.4, 0.4)))
    # weights of one model under the config of another (a lone file with a lying header)
    from safetensors.torch import load_file, save

    cfg = ModelConfig(backbone="mobilenetv3_small_100", image_size=112, embedding_size=128)
    doc = {"format": "facemeta-checkpoint", "version": 1, "config": cfg.to_dict(), "meta": {}}
    liar = tmp_path / "liar.safetensors"
    liar.write_bytes(save(load_file(str(small_ckpt)), metadata={"facemeta": json.dumps(doc)}))
    with pytest.raises(CheckpointError, match="does not match its architecture") as e:
        load_checkpoint(liar)
    assert "shape mismatches" in _one_line(e)
    # a sidecar that belongs to another checkpoint
    mixed = tmp_path / "mixed.safetensors"
    mixed.write_bytes(small_ckpt.read_bytes())
    mixed.with_suffix(".json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="describes another model"):
        load_checkpoint(mixed)
