"""ONNX export and ONNX Runtime inference of an ensemble (issue 29: "everything that takes a model takes it").

The ensemble is real: dlib's prior (dlib chip, 150 px) and SFace (ArcFace chip, 112 px), zero-shot, saved as one
checkpoint in a temporary folder. `facemeta export` writes ONE graph with one input per member (``input_0``,
``input_1``) and the ensemble's unit vector as output; its contract (version 3) lists each member's input, chip,
normalisation, weight and scale. ONNX Runtime must agree with torch on real LFW faces (cosine >= 0.9999, flip TTA
per member as torch does it), through the embedder, the CLI and a gallery built with torch and searched with
ONNX Runtime; a contract that lies is refused in one line.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from facemeta.cli import main
from facemeta.embedder import FaceEmbedder, file_fingerprint

pytest.importorskip("onnxruntime", reason="the onnx extra (pip install 'facemeta[onnx]')")
pytest.importorskip("onnx", reason="SFace's converter reads its file with the onnx package (the prior extra)")

THRESHOLD = 0.6716  # tools/make_ensemble.py's calibration of this pair (tests/test_ensemble.py)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(capsys, *argv) -> str:
    code, out, err = run_cli(capsys, *argv)
    assert code == 1 and out == "" and err.count("\n") == 1 and "Traceback" not in err, (code, out, err)
    return err


def lfw(data_dir, name: str, k: int) -> str:
    return str(data_dir / "lfw" / "images" / name / f"{name}_{k:04d}.jpg")


@pytest.fixture(scope="module")
def ensemble_file(tmp_path_factory):
    """dlib's prior + SFace, zero-shot, as one ensemble checkpoint (members referenced to the installed priors)."""
    from facemeta.models.backbone import build_prior
    from facemeta.models.ensemble import ensemble_of, save_ensemble

    models = [build_prior(name)[0] for name in ("prior", "sface")]
    path = tmp_path_factory.mktemp("ensemble") / "prior-sface.safetensors"
    save_ensemble(ensemble_of(models, [("dlib", 150), ("arcface", 112)]), path,
                  meta={"threshold": THRESHOLD, "threshold_far": 1e-3})
    return path


@pytest.fixture(scope="module")
def exported(ensemble_file, data_dir):
    """`facemeta export ENSEMBLE --onnx OUT.onnx --json`, parity-checked on 4 LFW photos."""
    out = ensemble_file.parent / "onnx" / "ensemble.onnx"
    photos = [lfw(data_dir, name, 1) for name in ("Colin_Powell", "Tony_Blair", "Serena_Williams", "Hugo_Chavez")]
    assert main(["export", str(ensemble_file), "--onnx", str(out), "--json", "--check-images", *photos]) == 0
    return out


@pytest.fixture(scope="module")
def torch_embedder(ensemble_file):
    return FaceEmbedder(ensemble_file)


@pytest.fixture(scope="module")
def photos(data_dir) -> list[str]:
    """Six LFW photos of three people (two each)."""
    return [lfw(data_dir, name, k) for name in ("Colin_Powell", "Tony_Blair", "Jean_Chretien")
            for k in (2, 3)]


# ------------------------------------------------------------------------------------------------ export
def test_export_writes_one_graph_with_an_input_per_member(exported, ensemble_file):
    import onnx

    from facemeta.models.ensemble import load_model
    from facemeta.models.onnx_contract import numbers_digest

    contract = json.loads(exported.with_suffix(".json").read_text())
    model, _ = load_model(ensemble_file)
    assert contract["format"] == "facemeta-onnx" and contract["version"] == 3 and contract["kind"] == "ensemble"
    assert contract["checkpoint"]["fingerprint"] == file_fingerprint(ensemble_file)
    assert contract["checkpoint"]["backbones"] == ["dlib_resnet29", "sface"]
    assert contract["embedding_size"] == 256 and contract["output"]["shape"] == ["N", 256]
    assert contract["threshold"] == THRESHOLD and contract["threshold_far"] == 1e-3 and contract["flip_tta"] is True
    members = contract["members"]
    assert [m["input"]["name"] for m in members] == ["input_0", "input_1"]
    assert [(m["align_chip"], m["align_size"], m["image_size"]) for m in members] == [("dlib", 150, 150),
                                                                                        ("arcface", 112, 112)]
    for m, member in zip(members, model.members, strict=True):
        s = member.config.image_size
        assert m["input"]["shape"] == ["N", 3, s, s] and m["input"]["channel_order"] == "RGB"
        assert tuple(m["input"]["mean"]) == member.config.mean and tuple(m["input"]["std"]) == member.config.std
    assert [m["weight"] for m in members] == [1.0, 1.0] and [m["offset"] for m in members] == [0, 128]
    assert all(math.isclose(m["scale"], math.sqrt(0.5)) for m in members)
    assert contract["parity"]["faces"] == 4 and contract["parity"]["min_cosine"] >= 0.9999
    assert contract["numbers_sha256"] == numbers_digest(contract)
    graph = onnx.load(str(exported))
    onnx.checker.check_model(graph)
    shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert shapes == {"input_0": ["batch", 3, 150, 150], "input_1": ["batch", 3, 112, 112]}
    assert [o.name for o in graph.graph.output] == ["embedding"]


def test_a_single_models_contract_stays_version_2():
    """Older facemeta reads single models' contracts: they are written as before (version 2, one input)."""
    from facemeta.models.backbone import ModelConfig
    from facemeta.models.onnx_contract import build_contract

    doc = build_contract(ModelConfig(image_size=64, embedding_size=64), {"align_size": 112, "align_chip": "arcface"},
                         "0" * 16, 18, True)
    assert doc["version"] == 2 and "kind" not in doc and doc["input"]["name"] == "input"


# ------------------------------------------------------------------------------------------------ parity
def test_onnx_runtime_matches_torch_with_and_without_flip(exported, torch_embedder, photos):
    """Each face warped onto both chips from the same landmarks; ONNX Runtime's vectors equal torch's (cosine >=
    0.9999), with flip TTA (combined per member, as torch does) and without; batches of any size."""
    from facemeta.models.onnx_export import OnnxEmbeddingModel

    found = torch_embedder.faces_in_images([torch_embedder._load(p) for p in photos])
    chips = [torch_embedder.warp(torch_embedder._load(p), f[0].face.landmarks) for p, f in zip(photos, found,
                                                                                               strict=True)]
    batches = [np.stack([c[k] for c in chips]) for k in range(2)]
    runtime = OnnxEmbeddingModel(exported, fingerprint=torch_embedder.fingerprint)
    assert runtime.ensemble and runtime.chips == [("dlib", 150), ("arcface", 112)]
    for flip in (True, False):
        ours = runtime.embed(batches, batch_size=3, flip=flip)
        theirs = torch_embedder.model.embed(batches, flip=flip)
        assert ours.shape == theirs.shape == (len(photos), 256)
        cos = (ours * theirs).sum(axis=1)
        assert cos.min() >= 0.9999, (flip, np.sort(cos)[:3])
    assert np.allclose(runtime.embed(batches, flip=True), runtime.embed(batches, batch_size=1, flip=True), atol=1e-5)
    # flip TTA is per member: the sum of the two whole outputs renormalised is another (wrong) vector
    xs = [g.preprocessing.preprocess(b) for g, b in zip(runtime.inputs, batches, strict=True)]
    e, m = runtime.run(xs), runtime.run([x[:, :, :, ::-1] for x in xs])
    whole = (e + m) / np.linalg.norm(e + m, axis=1, keepdims=True)
    assert not np.allclose(whole, torch_embedder.model.embed(batches, flip=True), atol=1e-6)
    for wrong in (batches[:1], batches[1][:2]):  # one batch only; two faces that are not two batches
        with pytest.raises(ValueError, match="one per chip"):
            runtime.embed(wrong)


def test_verify_runtime_onnx_agrees_with_torch(exported, ensemble_file, torch_embedder, data_dir, capsys):
    a, b, c = lfw(data_dir, "Colin_Powell", 1), lfw(data_dir, "Colin_Powell", 2), lfw(data_dir, "George_W_Bush", 10)
    for other in (b, c):
        code, out, err = run_cli(capsys, "verify", a, other, "--model", ensemble_file, "--json", "--runtime", "onnx",
                                 "--onnx", exported)
        assert code == 0, err
        o, t = json.loads(out), torch_embedder.verify(a, other)
        assert o["runtime"] == "onnx" and o["fingerprint"] == file_fingerprint(ensemble_file)
        assert o["same"] == t.same and abs(o["score"] - t.score) < 1e-4 and o["threshold"] == pytest.approx(THRESHOLD)


def test_gallery_built_with_torch_is_searched_with_onnx(exported, ensemble_file, data_dir, tmp_path, capsys):
    """One fingerprint for both runtimes: a gallery enrolled by torch is searched by ONNX Runtime, and a gallery
    of another model is refused in one line."""
    gallery = tmp_path / "g"
    for name in ("Tony_Blair", "Colin_Powell"):
        code, _, err = run_cli(capsys, "enroll", gallery, name, lfw(data_dir, name, 1), "--model", ensemble_file,
                               "--no-progress")
        assert code == 0, err
    code, out, err = run_cli(capsys, "identify", gallery, lfw(data_dir, "Tony_Blair", 3), "--model", ensemble_file,
                             "--runtime", "onnx", "--onnx", exported, "--top-k", "2", "--json")
    assert code == 0, err
    candidates = json.loads(out)["faces"][0]["candidates"]
    assert candidates[0]["identity"] == "Tony_Blair" and candidates[0]["score"] > candidates[1]["score"]
    from facemeta.models.ensemble import ensemble_of, load_model, save_ensemble

    model, meta = load_model(ensemble_file)  # the same members weighed 2:1: another model, another fingerprint
    other = save_ensemble(ensemble_of(list(model.members), model.chips, weights=[2.0, 1.0]),
                          tmp_path / "other.safetensors", meta=meta)
    err = one_line_error(capsys, "identify", gallery, lfw(data_dir, "Tony_Blair", 3), "--model", other,
                         "--runtime", "onnx")
    assert "was built with model " + file_fingerprint(ensemble_file) in err
    err = one_line_error(capsys, "identify", gallery, lfw(data_dir, "Tony_Blair", 3), "--model", other,
                         "--runtime", "onnx", "--onnx", exported)
    assert "was exported from another model" in err


# ------------------------------------------------------------------------------------------------ cache
def test_runtime_onnx_exports_into_the_cache_then_needs_no_torch(exported, ensemble_file, torch_embedder, photos,
                                                                 data_dir, monkeypatch):
    """No graph given: the first faces export the ensemble into the cache (parity checked on them), later
    embedders reuse it, and a fresh `verify --runtime onnx` process loads no torch."""
    import subprocess
    import sys

    from facemeta.embedder import onnx_cache_path
    from facemeta.models import onnx_export

    exports = []

    def graph(model, opset=18):  # torch's exporter takes 10-30 s: replay the graph the fixture exported
        exports.append(opset)
        assert hasattr(model, "chips")
        return exported.read_bytes()

    monkeypatch.setattr(onnx_export, "export_graph", graph)
    cached = onnx_cache_path(file_fingerprint(ensemble_file))
    emb = FaceEmbedder(ensemble_file, runtime="onnx")
    assert emb.model is None and emb.onnx_model is None and not exports  # nothing exported before a face is seen
    assert emb.ensemble and emb.chips == [("dlib", 150), ("arcface", 112)] and emb.embedding_size == 256
    ours = emb.embed_files(photos[:3])
    theirs = torch_embedder.embed_files(photos[:3])
    assert emb.onnx_model.path == cached and len(exports) == 1
    assert all(float(a @ b) >= 0.9999 for a, b in zip(ours, theirs, strict=True))
    contract = json.loads(cached.with_suffix(".json").read_text())
    assert contract["kind"] == "ensemble" and "first photos embedded" in contract["parity"]["source"]
    assert contract["parity"]["faces"] == 6  # 3 faces and their mirror images, on both chips
    a, b = lfw(data_dir, "Colin_Powell", 1), lfw(data_dir, "Colin_Powell", 2)
    first = emb.verify(a, b)  # builds MTCNN's ONNX cache too (with torch, once)
    assert first.score == pytest.approx(torch_embedder.verify(a, b).score, abs=1e-4)
    driver = ("import json, sys\nfrom facemeta.cli import main\ncode = main(sys.argv[1:])\n"
              "print('MODULES ' + json.dumps(sorted(sys.modules)), file=sys.stderr)\nsys.exit(code)\n")
    out = subprocess.run([sys.executable, "-c", driver, "verify", a, b, "--model", str(ensemble_file), "--runtime",
                          "onnx", "--json"], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    modules = json.loads(next(x for x in out.stderr.splitlines() if x.startswith("MODULES "))[8:])
    assert not [m for m in modules if m.split(".")[0] in ("torch", "torchvision", "facenet_pytorch", "timm")]
    assert json.loads(out.stdout)["score"] == pytest.approx(first.score, abs=1e-6)


# ------------------------------------------------------------------------------------------------ refusals
def test_a_contract_that_lies_is_refused_in_one_line(exported, ensemble_file, tmp_path, data_dir, capsys):
    from facemeta.models.onnx_contract import numbers_digest

    good = json.loads(exported.with_suffix(".json").read_text())
    graph = tmp_path / "e.onnx"
    shutil.copy(exported, graph)
    photo = lfw(data_dir, "Colin_Powell", 1)

    def member(k, **change):
        return lambda c: c["members"][k].update(change)

    def swap_chips(c):
        a, b = c["members"]
        a["align_chip"], b["align_chip"] = b["align_chip"], a["align_chip"]

    cases = [(lambda c: c.update(threshold=0.1), False, "numbers (input size, mean, std, thresholds...) are not"),
             (lambda c: c["members"][0]["input"].update(mean=[0.1, 0.1, 0.1]), False, "not those it was exported"),
             (member(1, weight=3.0), True, "scale 0.707"),
             (lambda c: c["members"][0]["input"].update(mean=[0.1, 0.1, 0.1]), True, "member 0's mean"),
             (member(0, image_size=112), True, "the graph's input 'input_0' is"),
             (swap_chips, True, "its contract says member 0's chip is arcface, the checkpoint 'dlib'"),
             (lambda c: c["checkpoint"].update(fingerprint="0123456789abcdef"), True, "another model"),
             (lambda c: c.update(version=4), True, "newer than this facemeta"),
             (lambda c: c.update(kind="mixture"), True, "unknown kind"),
             (lambda c: c["members"].pop(), True, "an ensemble needs 2..16 members")]
    for edit, redigest, words in cases:
        doc = json.loads(json.dumps(good))
        edit(doc)
        if redigest:  # a forger's contract: its digest recomputed
            doc["numbers_sha256"] = numbers_digest(doc)
        graph.with_suffix(".json").write_text(json.dumps(doc))
        err = one_line_error(capsys, "verify", photo, photo, "--model", ensemble_file, "--runtime", "onnx",
                             "--onnx", graph)
        assert words in err, (words, err)
    graph.with_suffix(".json").write_text(json.dumps(good))  # the honest contract works again
    assert FaceEmbedder(ensemble_file, runtime="onnx", onnx_path=graph).onnx_model.ensemble


def test_export_says_what_it_wrote(exported, ensemble_file, tmp_path, capsys, monkeypatch):
    """Without --json: one line naming the members' inputs, one with the parity check (synthetic faces here)."""
    from facemeta.models import onnx_export

    monkeypatch.setattr(onnx_export, "export_graph", lambda model, opset=18: exported.read_bytes())
    code, out, err = run_cli(capsys, "export", ensemble_file, "--onnx", tmp_path / "e.onnx")
    assert code == 0, err
    assert "ensemble of 2: 150 px (dlib chip) + 112 px (arcface chip) in, 256-d out" in out
    assert "on 8 synthetic images" in out and (tmp_path / "e.json").is_file()


# ------------------------------------------------------------------------------------------------ slow
@pytest.mark.slow
def test_a_weighted_ensemble_exports_into_the_cache_for_real(ensemble_file, tmp_path, photos):
    """Members weighed 3:1 (scales sqrt(3/4) and sqrt(1/4)): torch's exporter runs for real on the first faces,
    and the flip TTA per member still matches torch."""
    from facemeta.models.ensemble import ensemble_of, load_model, save_ensemble

    model, meta = load_model(ensemble_file)
    path = save_ensemble(ensemble_of(list(model.members), model.chips, weights=[3.0, 1.0]),
                         tmp_path / "weighted.safetensors", meta=meta)
    onnx_emb, torch_emb = FaceEmbedder(path, runtime="onnx"), FaceEmbedder(path)
    ours, theirs = onnx_emb.embed_files(photos), torch_emb.embed_files(photos)
    assert min(float(a @ b) for a, b in zip(ours, theirs, strict=True)) >= 0.9999
    members = onnx_emb.onnx_model.contract["members"]
    assert [m["weight"] for m in members] == [3.0, 1.0]
    assert [round(m["scale"] ** 2, 6) for m in members] == [0.75, 0.25]
