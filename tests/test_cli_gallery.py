"""`facemeta enroll / identify / gallery` and facemeta.recognizer.FaceRecognizer on real ORL photos.

The plumbing tests use two small randomly initialised checkpoints (a real MTCNN + timm pipeline;
an untrained model still maps one photo to one vector, so a photo enrolled is found again with
cosine ~1, and two different checkpoints have different fingerprints). The ORL identification
acceptance uses the project's shipped model (weights/default.safetensors, see weights/MODEL_CARD.md).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from facemeta.cli import main
from facemeta.errors import GalleryError

# ORL end to end, one enrolled photo per person, 360 probes. Measured with the shipped model (fine-tuned from the
# prior; ORL is a domain it never trained on): 1.000 (360/360), by tools/ship_model.py on 2026-12-01. The bar is
# issue 11's acceptance, 0.97 (the previous model, trained from random weights, reached 0.753; eigenfaces on raw
# pixels 0.725, tests/test_gallery_orl.py; chance is 1/40).
ORL_RANK1_BAR = 0.97


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a busy 2-core machine OpenMP spinning makes MTCNN ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_torch_thread) -> tuple[Path, Path]:
    import torch

    from facemeta.models.backbone import ModelConfig, build_model
    from facemeta.models.checkpoint import save_checkpoint

    out = []
    folder = tmp_path_factory.mktemp("models")
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(ModelConfig(backbone="mobilenetv3_small_100", image_size=64, embedding_size=128)).eval()
        out.append(save_checkpoint(model, folder / f"m{seed}.safetensors", meta={"threshold": 0.5, "threshold_far": 1e-3}))
    return out[0], out[1]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_enroll_identify_manage(tmp_path, data_dir, models, capsys):
    orl = data_dir / "orl"
    gal = tmp_path / "people"
    m0, m1 = models
    code, out, err = cli(capsys, "enroll", gal, "s1", orl / "s1/1.pgm", orl / "s1/2.pgm", "--model", m0)
    assert code == 0 and "enrolled 2 image(s) of s1" in out, err
    # A folder of identity subfolders; an unreadable file is reported, not fatal.
    people = tmp_path / "incoming"
    for s in ("s2", "s3"):
        (people / s).mkdir(parents=True)
        shutil.copy(orl / s / "1.pgm", people / s / "1.pgm")
    (people / "s3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, out, err = cli(capsys, "enroll", gal, "--folder", people, "--model", m0, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["added"] == {"s2": 1, "s3": 1} and res["identities"] == 3 and res["embeddings"] == 4
    assert [Path(p).name for p, _ in res["skipped"]] == ["broken.png"] and "skipped" in err

    code, out, err = cli(capsys, "identify", gal, orl / "s2/1.pgm", "--model", m0, "--json", "--top-k", "3")
    assert code == 0, err
    face = json.loads(out)["faces"][0]
    assert face["identity"] == "s2" and face["score"] > 0.999 and len(face["candidates"]) == 3
    assert len(face["box"]) == 4 and 0 < face["detector_score"] <= 1
    code, out, _ = cli(capsys, "identify", gal, orl / "s2/2.pgm", "--model", m0, "--threshold", "1")
    assert code == 0 and ": unknown (" in out and "nearest: " in out  # another photo scores below 1

    code, out, _ = cli(capsys, "gallery", "rename", gal, "s3", "Third Person")
    assert code == 0
    code, out, _ = cli(capsys, "gallery", "remove", gal, "s1")
    assert code == 0 and "2 embeddings" in out
    code, out, _ = cli(capsys, "gallery", "list", gal, "--json")
    assert {(p["name"], p["images"]) for p in json.loads(out)} == {("s2", 1), ("Third Person", 1)}
    code, out, _ = cli(capsys, "gallery", "info", gal, "--check", "--json")
    info = json.loads(out)
    assert code == 0 and info["embeddings"] == 2 and info["check"]["index_matches_database"]
    assert info["dim"] == 128 and info["threshold"] == 0.5  # the model's calibrated threshold

    # Another model's embeddings are refused with one line, and nothing changes.
    before = (gal / "gallery.sqlite").read_bytes()
    code, out, err = cli(capsys, "enroll", gal, "s4", orl / "s4/1.pgm", "--model", m1)
    assert code == 1 and "was built with model" in err and len(err.strip().splitlines()) == 1
    assert (gal / "gallery.sqlite").read_bytes() == before
    code, _, err = cli(capsys, "gallery", "remove", gal, "nobody")
    assert code == 1 and "no identity named 'nobody'" in err
    code, _, err = cli(capsys, "identify", tmp_path / "nowhere", orl / "s2/1.pgm", "--model", m0)
    assert code == 1 and "no gallery" in err

    # A damaged index: list and info still work from the database, identify is a one-line error,
    # then `gallery repair` rebuilds the index from the database.
    idx = gal / "index.faiss"
    idx.write_bytes(idx.read_bytes()[:-10])
    code, out, _ = cli(capsys, "gallery", "list", gal)
    assert code == 0 and "2 people" in out
    code, _, err = cli(capsys, "identify", gal, orl / "s2/1.pgm", "--model", m0)
    assert code == 1 and "truncated" in err and "gallery repair" in err and len(err.strip().splitlines()) == 1
    code, out, _ = cli(capsys, "gallery", "repair", gal)
    assert code == 0 and "2 embeddings" in out
    code, out, _ = cli(capsys, "identify", gal, orl / "s2/1.pgm", "--model", m0)
    assert code == 0 and ": s2 (" in out


def test_face_recognizer_api(tmp_path, data_dir, models):
    from facemeta.embedder import FaceEmbedder
    from facemeta.recognizer import FaceRecognizer

    orl = data_dir / "orl"
    emb = FaceEmbedder(models[0])
    with FaceRecognizer(tmp_path / "g", embedder=emb) as fr:
        assert not fr.exists()
        with pytest.raises(GalleryError, match="enroll someone first"):
            fr.identify(orl / "s1/1.pgm")
        r = fr.enroll("ada", [orl / "s1/1.pgm", orl / "s1/3.pgm"])
        assert r.added == {"ada": 2} and not r.skipped
        bob = tmp_path / "bob"
        bob.mkdir()
        for i in (1, 2, 3):
            shutil.copy(orl / "s2" / f"{i}.pgm", bob / f"{i}.pgm")
        fr.enroll("bob", bob)  # a folder: its three photos
        assert {(i.name, i.count) for i in fr.list()} == {("ada", 2), ("bob", 3)}
        faces = fr.identify(orl / "s1/3.pgm", top_k=2)
        assert len(faces) == 1 and faces[0]["identity"] == "ada" and faces[0]["score"] > 0.999
        recs = fr.gallery().records("ada")
        assert recs[0].source.endswith("s1/1.pgm") and 0 < recs[0].score <= 1 and recs[0].fingerprint == emb.fingerprint
        v = fr.verify(orl / "s1/1.pgm", orl / "s1/1.pgm")
        assert v.same and v.decision == "same" and v.score > 0.999 and v.threshold == 0.5
        fr.rename("bob", "robert")
        assert fr.remove("ada") == 2
        assert [i.name for i in fr.list()] == ["robert"]
    # Reopened with the other model: refused before anything is read or written.
    with pytest.raises(GalleryError, match="was built with model"):
        FaceRecognizer(tmp_path / "g", models[1])


def test_orl_identification_with_the_trained_model(tmp_path, data_dir, monkeypatch):
    """Acceptance: enroll each ORL person with photo 1, identify photos 2-10 end to end from files."""
    from facemeta.embedder import FaceEmbedder, default_model_path
    from facemeta.recognizer import FaceRecognizer

    monkeypatch.delenv("FACEMETA_MODEL", raising=False)
    model = default_model_path()
    emb = FaceEmbedder(model)
    orl = data_dir / "orl"
    subjects = sorted((p.name for p in orl.iterdir() if p.is_dir()), key=lambda s: int(s[1:]))
    with FaceRecognizer(tmp_path / "orl", embedder=emb) as fr:
        for s in subjects:
            fr.enroll(s, [orl / s / "1.pgm"])
        hits, total = 0, 0
        for s in subjects:
            for i in range(2, 11):
                faces = fr.identify(orl / s / f"{i}.pgm", threshold=-1.0)
                best = max(faces, key=lambda f: f["score"]) if faces else None
                hits += int(best is not None and best["identity"] == s)
                total += 1
    rank1 = hits / total
    print(f"ORL rank-1 with {model.name}: {rank1:.3f} ({hits}/{total})")
    assert total == 360 and rank1 >= ORL_RANK1_BAR
