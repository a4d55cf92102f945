"""Ensembles (facemeta.models.ensemble): dlib's prior and SFace as one model, each member on its own chip of the
same landmarks; one checkpoint (one fingerprint, one threshold) that round-trips through safetensors."""

from __future__ import annotations

import numpy as np
import pytest

from facemeta.errors import CheckpointError

pytest.importorskip("onnx", reason="SFace's converter reads its file with the onnx package (the prior extra)")


@pytest.fixture(scope="module")
def members():
    """dlib's prior (dlib chip, 150 px) and SFace (ArcFace chip, 112 px), zero-shot."""
    from facemeta.models.backbone import build_prior

    models = [build_prior(name)[0] for name in ("prior", "sface")]
    return models


@pytest.fixture(scope="module")
def chips(aligned_sample):
    """4 LFW faces on both chips, warped from the same detected landmarks: (dlib 150 px, ArcFace 112 px, and the
    (image, landmarks) they came from)."""
    from facemeta.align.warp import warp_face
    from facemeta.data.manifest import parse_landmarks
    from facemeta.images import load_image

    rows = [r for r in aligned_sample("lfw", 40)[1] if r.extra.get("landmarks")][:4]
    faces = [(load_image(r.extra["source"]), np.array(parse_landmarks(r.extra["landmarks"]), np.float32))
             for r in rows]
    dlib = np.stack([warp_face(image, points, 150, chip="dlib") for image, points in faces])
    arc = np.stack([warp_face(image, points, 112, chip="arcface") for image, points in faces])
    return dlib, arc, faces


def test_ensemble_is_the_mean_of_its_members(members, chips):
    from facemeta.align.warp import warp_face
    from facemeta.models.backbone import embed
    from facemeta.models.ensemble import ensemble_of

    model = ensemble_of(members, [("dlib", 150), ("arcface", 112)])
    assert model.chips == [("dlib", 150), ("arcface", 112)] and model.embedding_size == 256
    batches = model.chip_batches(chips[2], warp_face)  # what the embedder calls: one batch per member's chip
    assert all(np.array_equal(b, c) for b, c in zip(batches, chips[:2], strict=True))
    chips = chips[:2]
    vectors = model.embed(list(chips), flip=False)
    assert vectors.shape == (4, 256) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    a, b = (embed(m, c, flip=False) for m, c in zip(members, chips, strict=True))
    assert np.allclose(vectors @ vectors.T, (a @ a.T + b @ b.T) / 2, atol=1e-5)
    weighted = ensemble_of(members, [("dlib", 150), ("arcface", 112)], weights=[3.0, 1.0]).embed(list(chips), flip=False)
    assert np.allclose(weighted @ weighted.T, (3 * a @ a.T + b @ b.T) / 4, atol=1e-5)
    with pytest.raises(ValueError, match="one per chip"):
        model.embed([chips[0]], flip=False)
    with pytest.raises(ValueError, match="chip"):
        ensemble_of(members, [("dlib", 150), ("insightface", 112)])


def test_ensemble_checkpoint_round_trip(members, chips, tmp_path):
    chips = chips[:2]
    from facemeta.embedder import file_fingerprint
    from facemeta.models.checkpoint import load_checkpoint, save_checkpoint
    from facemeta.models.ensemble import EnsembleModel, ensemble_of, load_model, save_ensemble

    model = ensemble_of(members, [("dlib", 150), ("arcface", 112)])
    path = save_ensemble(model, tmp_path / "ens.safetensors", meta={"threshold": 0.5, "threshold_far": 1e-3})
    loaded, meta = load_model(path)
    assert isinstance(loaded, EnsembleModel) and meta["threshold"] == 0.5
    assert loaded.chips == model.chips
    assert np.array_equal(loaded.embed(list(chips), flip=False), model.embed(list(chips), flip=False))
    assert len(file_fingerprint(path)) == 16  # one file: one fingerprint for galleries
    # a loader of single models refuses it in one line; load_model loads single models as before
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
    single = save_checkpoint(members[1], tmp_path / "single.safetensors", meta={"align_size": 112})
    assert type(load_model(single)[0]) is type(members[1])
    # a damaged file is refused in one line
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (tmp_path / "broken.json").write_text((tmp_path / "ens.json").read_text())
    with pytest.raises(CheckpointError) as info:
        load_model(broken)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def ensemble_file(members, tmp_path_factory):
    """dlib's prior + SFace saved as one checkpoint, with the threshold tools/make_ensemble.py calibrated for this
    pair on held-out source identities (0.6716 at FAR 1e-3)."""
    from facemeta.models.ensemble import ensemble_of, save_ensemble

    path = tmp_path_factory.mktemp("ensemble") / "prior-sface.safetensors"
    save_ensemble(ensemble_of(members, [("dlib", 150), ("arcface", 112)]), path,
                  meta={"threshold": 0.6716, "threshold_far": 1e-3})
    return path


def test_an_ensemble_verifies_enrolls_and_identifies_through_the_one_route(ensemble_file, data_dir, tmp_path):
    """The embedder warps each face once per member from the same landmarks; verify, the gallery and the
    fingerprint treat the ensemble as one model; ONNX Runtime takes it too (tests/test_onnx_ensemble.py)."""
    from facemeta.align.warp import warp_face
    from facemeta.embedder import FaceEmbedder, file_fingerprint
    from facemeta.images import load_image
    from facemeta.recognizer import FaceRecognizer

    lfw = data_dir / "lfw" / "images"
    emb = FaceEmbedder(ensemble_file)
    assert emb.ensemble and emb.chips == [("dlib", 150), ("arcface", 112)] and emb.embedding_size == 256
    image = load_image(lfw / "Colin_Powell" / "Colin_Powell_0001.jpg")
    (face,) = emb.faces_in_images([image])[0]
    by_hand = emb.model.embed([warp_face(image, face.face.landmarks, 150, "dlib")[None],
                               warp_face(image, face.face.landmarks, 112, "arcface")[None]], flip=True)[0]
    assert face.vector.shape == (256,) and np.allclose(face.vector, by_hand, atol=1e-5)
    assert face.crop.shape == (150, 150, 3)  # the first member's chip, for pictures
    same = emb.verify(lfw / "Colin_Powell" / "Colin_Powell_0001.jpg", lfw / "Colin_Powell" / "Colin_Powell_0002.jpg")
    other = emb.verify(lfw / "Colin_Powell" / "Colin_Powell_0001.jpg", lfw / "George_W_Bush" / "George_W_Bush_0010.jpg")
    assert same.score > other.score + 0.3 and same.threshold == pytest.approx(0.6716)
    with FaceRecognizer(tmp_path / "g", ensemble_file) as fr:
        fr.enroll("Colin Powell", [lfw / "Colin_Powell" / "Colin_Powell_0001.jpg"])
        fr.enroll("Tony Blair", [lfw / "Tony_Blair" / "Tony_Blair_0001.jpg"])
        (found,) = fr.identify(lfw / "Tony_Blair" / "Tony_Blair_0003.jpg", top_k=2)
        assert found["candidates"][0]["identity"] == "Tony Blair"
        assert found["candidates"][0]["score"] > found["candidates"][1]["score"] + 0.1  # measured: 0.79 vs 0.60
        assert fr.gallery().fingerprint == file_fingerprint(ensemble_file)
    lazy = FaceEmbedder(ensemble_file, runtime="onnx")  # exported on its first faces
    assert lazy.ensemble and lazy.chips == emb.chips and lazy.embedding_size == 256 and lazy.onnx_model is None


def test_an_unchanged_prior_member_is_stored_as_a_reference(members, chips, tmp_path):
    """SFace's (and dlib's) weights never go into an ensemble file while they are the installed prior's: the
    member is a reference pinned to the package file's digest; a trained member is stored in full."""
    import json

    import torch
    from safetensors import safe_open

    from facemeta.models.ensemble import ensemble_of, load_model, save_ensemble

    chips = chips[:2]
    trained = type(members[0])(members[0].config)
    trained.load_state_dict(members[0].state_dict())
    with torch.no_grad():
        trained.fc.weight.mul_(1.01)  # a member facemeta changed: no longer the prior
    model = ensemble_of([trained, members[1]], [("dlib", 150), ("arcface", 112)])
    path = save_ensemble(model, tmp_path / "ref.safetensors", meta={"threshold": 0.5, "threshold_far": 1e-3})
    with safe_open(str(path), "pt") as fh:
        keys = list(fh.keys())
    assert any(k.startswith("members.0.") for k in keys) and not any(k.startswith("members.1.") for k in keys)
    entries = json.loads((tmp_path / "ref.json").read_text())["config"]["members"]
    assert "prior" not in entries[0] and entries[1]["prior"].startswith("sface-v")
    loaded, _ = load_model(path)
    assert np.array_equal(loaded.embed(list(chips), flip=False), model.embed(list(chips), flip=False))
    full = save_ensemble(model, tmp_path / "full.safetensors", meta={"threshold": 0.5}, reference=False)
    assert full.stat().st_size > path.stat().st_size + 10_000_000  # SFace's ~10 M parameters are in this one
    # a reference to another version of the package's file is refused in one line, naming it
    doc = json.loads((tmp_path / "ref.json").read_text())
    doc["config"]["members"][1]["prior"] = "sface-v1-0000000000000000"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata={"facemeta": json.dumps(doc)})
    (tmp_path / "other.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="sface-v1-0000000000000000") as info:
        load_model(tmp_path / "other.safetensors")
    assert "\n" not in str(info.value)
