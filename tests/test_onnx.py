"""ONNX export (`facemeta export --onnx`) and the ONNX Runtime embedding (`runtime="onnx"`, `verify --runtime onnx`).

Parity is asserted with a single model that recognises faces for real, dlib's encoder (the prior, zero-shot, with
the threshold facemeta calibrates for it), on real LFW faces aligned by facemeta's pipeline onto its 150 px dlib chip:
every embedding agrees with torch's to cosine >= 0.9999, and the verification decisions at the model's calibrated
threshold are the same on a fixed subset of LFW pairs.txt folds 6-10 (all 3000 pairs in the `slow` test). A tiny
randomly initialised timm model stands for another model (and, in a slow test, another architecture). The shipped
model may be an ensemble; ensembles have their own tests (tests/test_onnx_ensemble.py).
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from facemeta.cli import main
from facemeta.embedder import FaceEmbedder, file_fingerprint
from facemeta.errors import CheckpointError

pytest.importorskip("onnxruntime", reason="the onnx extra (pip install 'facemeta[onnx]')")

# `facemeta train prior --steps 0 --set eval.flip=true`: the prior's threshold at FAR 1e-3 on the held-out source
# identities (all pairs of 866 photos of 89 people), with flip TTA
PRIOR_THRESHOLD = 0.9426060318946838
SUBSET_PER_FOLD = 14  # same and different pairs taken from each of folds 6-10 in the default run (140 pairs)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """dlib's encoder zero-shot (the prior) as a single facemeta checkpoint: 150 px dlib chip, 128-d, its calibrated
    threshold at FAR 1e-3."""
    from facemeta.models.backbone import ModelConfig, build_model, default_normalisation, installed_weights
    from facemeta.models.checkpoint import save_checkpoint

    mean, std = default_normalisation("dlib_resnet29")
    config = ModelConfig(backbone="dlib_resnet29", embedding_size=128, image_size=150, head="linear", mean=mean,
                         std=std)
    path = tmp_path_factory.mktemp("prior") / "prior.safetensors"
    save_checkpoint(build_model(config, pretrained_path=installed_weights("dlib_resnet29")), path,
                    meta={"align_size": 150, "align_chip": "dlib", "threshold": PRIOR_THRESHOLD,
                          "threshold_far": 1e-3})
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, data_dir, model):
    """The model exported by `facemeta export --json`, parity-checked on 8 LFW photos given with
    --check-images (without them the check runs on synthetic images: the shared data is never read for it)."""
    out = tmp_path_factory.mktemp("onnx") / "default.onnx"
    photos = sorted((data_dir / "lfw" / "images").glob("A*/*_0001.jpg"))[:8]
    code = main(["export", str(model), "--onnx", str(out), "--json", "--check-images", *map(str, photos)])
    assert code == 0
    return out


def _aligned_pairs(data_dir, session_tmp, pairs, name: str):
    """Align the images of `pairs` (dlib chip, 150 px, the model's) -> (rows, faces uint8, PairMatch)."""
    from facemeta.align.pipeline import align_rows
    from facemeta.data.sets import read_set
    from facemeta.eval.pairs import match_pairs
    from facemeta.images import load_image

    wanted = {p for pair in pairs for p in (pair.a, pair.b)}
    rows = [r for r in read_set("lfw", data_dir) if r.path in wanted]
    aligned, _ = align_rows(rows, session_tmp / "onnx-pairs" / name, size=150, workers=2, progress=False,
                            chip="dlib")
    aligned = sorted(aligned, key=lambda r: r.path)
    faces = np.stack([load_image(r.path) for r in aligned])
    return aligned, faces, match_pairs(aligned, pairs)


@pytest.fixture(scope="module")
def pair_subset(data_dir, session_tmp):
    """A fixed subset of LFW pairs.txt folds 6-10: the first SUBSET_PER_FOLD same and different pairs per fold."""
    from facemeta.data.sets import read_pairs

    pairs = [p for p in read_pairs("lfw", data_dir) if p.fold >= 6]
    chosen = []
    for fold in range(6, 11):
        for same in (True, False):
            chosen += [p for p in pairs if p.fold == fold and p.same == same][:SUBSET_PER_FOLD]
    return _aligned_pairs(data_dir, session_tmp, chosen, "subset")


@pytest.fixture(scope="module")
def runtimes(exported, model):
    """(torch embedder, onnx embedder) of the model."""
    return FaceEmbedder(model), FaceEmbedder(model, runtime="onnx", onnx_path=exported)


@pytest.fixture(scope="module")
def subset_embeddings(pair_subset, runtimes):
    """Embeddings (flip TTA, as verification uses) of the subset's faces by torch and by ONNX Runtime."""
    _, faces, _ = pair_subset
    return tuple(r.embed_aligned(faces) for r in runtimes)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A randomly initialised mobilenetv3_small_050 at 64 px (insightface head), saved as a facemeta checkpoint."""
    import torch

    from facemeta.models.backbone import ModelConfig, build_model
    from facemeta.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="mobilenetv3_small_050", embedding_size=64, image_size=64))
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    save_checkpoint(model, path, meta={"align_size": 64, "threshold": 0.5, "threshold_far": 0.01})
    return path


def _one_line_error(capsys, *argv) -> str:
    code, out, err = run_cli(capsys, *argv)
    assert code == 1 and out == "" and err.count("\n") == 1 and "Traceback" not in err, (code, out, err)
    return err


# ------------------------------------------------------------------------------------------------ export
def test_export_writes_graph_and_contract(exported, model):
    import onnx

    contract = json.loads(exported.with_suffix(".json").read_text())
    meta = json.loads(model.with_suffix(".json").read_text())["meta"]
    assert contract["format"] == "facemeta-onnx" and contract["opset"] == 18
    assert contract["checkpoint"]["fingerprint"] == file_fingerprint(model)
    assert contract["input"]["shape"] == ["N", 3, 150, 150] and contract["input"]["channel_order"] == "RGB"
    assert contract["image_size"] == 150 and contract["embedding_size"] == 128 and contract["flip_tta"] is True
    assert (contract["align_size"], contract["align_chip"]) == (150, "dlib")
    assert contract["threshold"] == meta["threshold"] and contract["threshold_far"] == meta["threshold_far"]
    assert contract["parity"]["faces"] == 8 and contract["parity"]["min_cosine"] >= 0.9999
    assert "faces of the images given" in contract["parity"]["source"]
    graph = onnx.load(str(exported))
    onnx.checker.check_model(graph)
    (inp,) = graph.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "input" and dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 150, 150]


def test_export_cli_help_and_defaults(capsys, model):
    from facemeta.commands import export as command
    from facemeta.models import onnx_export

    assert (command.DEFAULT_OPSET, command.MIN_OPSET, command.MAX_OPSET, command.PARITY_MIN_COSINE) == \
        (onnx_export.DEFAULT_OPSET, onnx_export.MIN_OPSET, onnx_export.MAX_OPSET, onnx_export.PARITY_MIN_COSINE)
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--onnx" in text and "--opset" in text and "contract" in text
    err = _one_line_error(capsys, "export", model, "--onnx", "x.onnx", "--opset", "9")
    assert "opset" in err


def test_export_refused_when_runtime_disagrees(exported, model, data_dir, tmp_path, monkeypatch):
    from facemeta.embedder import export_checkpoint_onnx
    from facemeta.models import onnx_export

    # the graph already exported (no second export), and a runtime that gets every vector wrong
    monkeypatch.setattr(onnx_export, "export_graph", lambda model, opset=18: exported.read_bytes())
    real = onnx_export.OnnxEmbeddingModel.embed
    monkeypatch.setattr(onnx_export.OnnxEmbeddingModel, "embed",
                        lambda self, faces, **kw: np.roll(real(self, faces, **kw), 1, axis=1))
    out = tmp_path / "bad.onnx"
    photos = [data_dir / "lfw" / "images" / "Bill_Gates" / f"Bill_Gates_000{i}.jpg" for i in (1, 2)]
    with pytest.raises(CheckpointError, match="disagrees with torch on 2 of 2.*nothing written") as err:
        export_checkpoint_onnx(model, out, images=photos)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no graph, no contract, no temporary file


# ------------------------------------------------------------------------------------------------ parity
def test_onnx_matches_torch_on_200_real_faces(pair_subset, subset_embeddings):
    _, faces, _ = pair_subset
    assert len(faces) >= 200, len(faces)
    torch_emb, onnx_emb = subset_embeddings
    assert onnx_emb.shape == torch_emb.shape == (len(faces), 128)
    cos = (torch_emb * onnx_emb).sum(axis=1)
    assert cos.min() >= 0.9999, np.sort(cos)[:5]
    assert np.allclose(np.linalg.norm(onnx_emb, axis=1), 1.0, atol=1e-5)


def _decisions(emb, match, threshold):
    scores = (emb[match.ia] * emb[match.ib]).sum(axis=1)
    return scores, scores >= threshold


def test_same_decisions_on_lfw_pairs_subset(pair_subset, runtimes, subset_embeddings):
    _, _, match = pair_subset
    assert len(match.ia) >= 135, len(match.missing)
    torch_rt, onnx_rt = runtimes
    thr = torch_rt.threshold
    assert onnx_rt.threshold == thr is not None  # the checkpoint's calibrated threshold (FAR 1e-3)
    s_torch, d_torch = _decisions(subset_embeddings[0], match, thr)
    s_onnx, d_onnx = _decisions(subset_embeddings[1], match, thr)
    assert np.abs(s_torch - s_onnx).max() < 1e-4
    assert np.array_equal(d_torch, d_onnx), np.flatnonzero(d_torch != d_onnx)
    # a model that recognises faces (strict FAR 1e-3 threshold): the decisions mean something
    assert (d_torch == match.same).mean() > 0.8 and not d_torch[~match.same].any()


def test_dynamic_batch(pair_subset, exported):
    from facemeta.models.onnx_export import OnnxEmbeddingModel

    _, faces, _ = pair_subset
    model = OnnxEmbeddingModel(exported)
    seven = model.embed(faces[:7], batch_size=7)
    ones = np.concatenate([model.embed(faces[i:i + 1], batch_size=1) for i in range(7)])
    assert seven.shape == ones.shape == (7, 128)
    assert np.allclose(seven, ones, atol=1e-5)


def test_verify_cli_runtime_onnx_matches_torch(exported, model, runtimes, data_dir, capsys):
    a = data_dir / "lfw" / "images" / "Bill_Gates" / "Bill_Gates_0001.jpg"
    b = data_dir / "lfw" / "images" / "Bill_Gates" / "Bill_Gates_0003.jpg"
    code, out, err = run_cli(capsys, "verify", a, b, "--model", model, "--json", "--runtime", "onnx",
                             "--onnx", exported)
    assert code == 0, err
    o, t = json.loads(out), runtimes[0].verify(a, b)
    assert o["runtime"] == "onnx" and o["fingerprint"] == runtimes[0].fingerprint == file_fingerprint(model)
    assert o["same"] == t.same and abs(o["score"] - t.score) < 1e-4 and o["threshold_far"] == 1e-3
    err = _one_line_error(capsys, "verify", a, b, "--onnx", exported)
    assert "--runtime onnx" in err


# ------------------------------------------------------------------------------------------------ cache, errors
def test_runtime_onnx_builds_and_reuses_the_cache(exported, model, runtimes, pair_subset, monkeypatch):
    from facemeta import embedder as embedder_module
    from facemeta.embedder import onnx_cache_path
    from facemeta.models import onnx_export

    # the build runs export_onnx (parity check on the first faces embedded, atomic writes) around the graph the
    # fixture exported: torch's exporter takes 10-20 s a call (a real cache build is the slow test below)
    exports = []

    def graph(model, opset=18):
        exports.append(opset)
        return exported.read_bytes()

    monkeypatch.setattr(onnx_export, "export_graph", graph)
    cached = onnx_cache_path(file_fingerprint(model))
    for stale in (cached, cached.with_suffix(".json")):  # another test of the session may have built it
        stale.unlink(missing_ok=True)
    emb = FaceEmbedder(model, runtime="onnx")
    assert emb.model is None and emb.onnx_model is None and not exports  # nothing exported before a face is seen
    assert emb.fingerprint == file_fingerprint(model) and emb.embedding_size == 128
    faces = pair_subset[1][:4]
    torch_emb = runtimes[0].embed_aligned(faces)
    assert ((emb.embed_aligned(faces) * torch_emb).sum(axis=1) >= 0.9999).all()
    assert emb.onnx_model.path == cached and len(exports) == 1
    contract = json.loads(cached.with_suffix(".json").read_text())
    assert contract["parity"]["faces"] == 8 and contract["parity"]["min_cosine"] >= 0.9999  # 4 faces, mirrored
    assert "first photos embedded" in contract["parity"]["source"]
    stamp = cached.stat().st_mtime_ns
    again = FaceEmbedder(model, runtime="onnx")  # reused, not exported again
    assert again.onnx_model is not None and cached.stat().st_mtime_ns == stamp and len(exports) == 1
    assert ((again.embed_aligned(faces) * torch_emb).sum(axis=1) >= 0.9999).all()
    # a damaged cache entry is exported again, not an error (the export replayed: it was just tested)
    good = cached.read_bytes()
    cached.write_bytes(good[:1000])

    def replay(model_path, out, faces):
        exports.append(out)
        out.write_bytes(good)

    monkeypatch.setattr(embedder_module, "_export_with_faces", replay)
    rebuilt = FaceEmbedder(model, runtime="onnx")
    assert ((rebuilt.embed_aligned(faces) * torch_emb).sum(axis=1) >= 0.9999).all() and exports[1:] == [cached]


def test_contract_of_another_model_is_refused(tiny_model, exported, capsys, data_dir):
    with pytest.raises(CheckpointError, match="another model") as err:
        FaceEmbedder(tiny_model, runtime="onnx", onnx_path=exported)
    assert "\n" not in str(err.value)
    photo = data_dir / "orl" / "s1" / "1.pgm"
    err = _one_line_error(capsys, "verify", photo, photo, "--model", tiny_model, "--runtime", "onnx",
                          "--onnx", exported)
    assert "another model" in err


def test_bad_onnx_files_are_one_line_errors(exported, model, tmp_path, capsys, data_dir):
    from facemeta.models.onnx_export import sha16

    contract = json.loads(exported.with_suffix(".json").read_text())
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(exported.read_bytes()[:4096])
    shutil.copy(exported.with_suffix(".json"), truncated.with_suffix(".json"))
    garbage = tmp_path / "garbage.onnx"  # not ONNX at all, with a contract that names its bytes
    garbage.write_bytes(b"not an onnx graph\n" * 100)
    garbage.with_suffix(".json").write_text(json.dumps({**contract, "onnx_sha256": sha16(garbage.read_bytes())}))
    lonely = tmp_path / "lonely.onnx"
    shutil.copy(exported, lonely)
    broken = tmp_path / "broken.onnx"
    shutil.copy(exported, broken)
    broken.with_suffix(".json").write_text("{not json")
    expected = {truncated: "not the graph its contract describes", garbage: "ONNX Runtime cannot load",
                lonely: "no contract", broken: "not valid JSON", tmp_path / "absent.onnx": "not found"}
    photo = data_dir / "orl" / "s1" / "1.pgm"
    for path, words in expected.items():
        with pytest.raises(CheckpointError, match=words) as err:
            FaceEmbedder(model, runtime="onnx", onnx_path=path)
        assert "\n" not in str(err.value)
        err = _one_line_error(capsys, "verify", photo, photo, "--model", model, "--runtime", "onnx", "--onnx", path)
        assert words in err


def test_missing_onnxruntime_names_the_extra(exported, model, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(CheckpointError, match=r"pip install 'facemeta\[onnx\]'"):
        FaceEmbedder(model, runtime="onnx", onnx_path=exported)


# ------------------------------------------------------------------------------------------------ slow: all pairs
@pytest.mark.slow
def test_same_decisions_on_lfw_folds_6_to_10(data_dir, session_tmp, runtimes):
    from facemeta.data.sets import read_pairs

    pairs = [p for p in read_pairs("lfw", data_dir) if p.fold >= 6]
    assert len(pairs) == 3000
    _, faces, match = _aligned_pairs(data_dir, session_tmp, pairs, "folds6-10")
    assert len(match.ia) >= 2950, len(match.missing)  # the few LFW images MTCNN cannot align are left out
    torch_rt, onnx_rt = runtimes
    thr = torch_rt.threshold
    torch_emb, onnx_emb = torch_rt.embed_aligned(faces), onnx_rt.embed_aligned(faces)
    assert (torch_emb * onnx_emb).sum(axis=1).min() >= 0.9999
    s_torch = (torch_emb[match.ia] * torch_emb[match.ib]).sum(axis=1)
    s_onnx = (onnx_emb[match.ia] * onnx_emb[match.ib]).sum(axis=1)
    d_torch, d_onnx = s_torch >= thr, s_onnx >= thr
    print(f"\n{len(match.ia)} pairs of {len(faces)} faces; max |score diff| {np.abs(s_torch - s_onnx).max():.2e}; "
          f"closest score to the threshold {np.abs(s_torch - thr).min():.2e}; "
          f"accuracy at the threshold {(d_torch == match.same).mean():.4f}")
    assert np.abs(s_torch - s_onnx).max() < 1e-4
    assert np.array_equal(d_torch, d_onnx), np.flatnonzero(d_torch != d_onnx)


@pytest.mark.slow
def test_runtime_onnx_exports_a_timm_backbone(tiny_model):
    """A real cache build (torch's exporter, parity check on LFW faces) of another architecture: timm's
    mobilenetv3_small_050 with insightface's head at 64 px."""
    from facemeta.embedder import onnx_cache_path

    emb = FaceEmbedder(tiny_model, runtime="onnx")
    assert emb.onnx_model is None and emb.embedding_size == 64  # exported on the first faces embedded
    faces = np.random.default_rng(1).integers(0, 256, (7, 64, 64, 3), dtype=np.uint8)
    ours, theirs = emb.embed_aligned(faces), FaceEmbedder(tiny_model).embed_aligned(faces)
    assert emb.onnx_model.path == onnx_cache_path(file_fingerprint(tiny_model))
    assert ((ours * theirs).sum(axis=1) >= 0.9999).all()
    assert np.allclose(emb.onnx_model.embed(faces[:1]), emb.onnx_model.embed(faces)[:1], atol=1e-5)
