"""`facemeta adapt` (issue 26): the adapted model file, its fingerprint, threshold and card; each bad input refused
in one line with nothing written; the adapted model enrolls and identifies through the gallery and the service;
the adaptation episodes never let the outer loss see the inner loop's people."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from facemeta.cli import main

PEOPLE = ("JustinTrudeau", "XiJinping", "GavinNewsom")  # MFR2 people with 2 unmasked and >= 3 masked photos
pytestmark = pytest.mark.usefixtures("module_on_one_torch_thread")


def _mfr2(data_dir: Path) -> dict[str, tuple[list[Path], list[Path]]]:
    """{person: (masked photos, unmasked photos)} of PEOPLE, from mfr2_labels.txt."""
    out: dict[str, tuple[list[Path], list[Path]]] = {p: ([], []) for p in PEOPLE}
    for line in (data_dir / "mfr2" / "mfr2_labels.txt").read_text().splitlines():
        name, num, kind = (t.strip() for t in line.split(","))
        if name in out:
            out[name][kind == "no-mask"].append(data_dir / "mfr2" / name / f"{name}_{int(num):04d}.png")
    return out


@pytest.fixture(scope="module")
def labelled(data_dir, tmp_path_factory) -> Path:
    """DIR/<person>/ two masked photos (the new domain), DIR/<person>/enrolled/ the unmasked ones."""
    root = tmp_path_factory.mktemp("labelled")
    for name, (masked, unmasked) in _mfr2(data_dir).items():
        (root / name / "enrolled").mkdir(parents=True)
        for p in masked[:2]:
            shutil.copy(p, root / name / p.name)
        for p in unmasked:
            shutil.copy(p, root / name / "enrolled" / p.name)
    return root


@pytest.fixture(scope="module")
def base_path(prior_model) -> Path:
    """A single model to adapt: dlib's prior zero-shot (conftest's prior_model; the shipped model is an ensemble,
    whose adaptation tests/test_adapt_ensemble.py covers)."""
    return prior_model.model_path


@pytest.fixture(scope="module")
def adapted(labelled, tmp_path_factory, base_path) -> tuple[Path, dict]:
    """A single model adapted on `labelled` with few steps, through the command line (--json)."""
    import io
    from contextlib import redirect_stdout

    out = tmp_path_factory.mktemp("adapted") / "masked.safetensors"
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(["adapt", str(base_path), "--labelled", str(labelled), "--out", str(out), "--domain", "masked",
                     "--steps", "5", "--json"])
    assert code == 0
    return out, json.loads(buf.getvalue())


def test_adapted_model_file_fingerprint_threshold_and_card(adapted, base_path):
    from facemeta.embedder import file_fingerprint
    from facemeta.models.checkpoint import load_checkpoint

    out, summary = adapted
    assert out.is_file() and out.with_suffix(".json").is_file() and out.with_suffix(".md").is_file()
    assert summary["fingerprint"] == file_fingerprint(out) != file_fingerprint(base_path)
    model, meta = load_checkpoint(out)
    assert -1.0 <= meta["threshold"] <= 1.0 and meta["threshold_far"] > 0
    card = meta["adapted_on"]
    assert card["domain"] == "masked" and card["people"] == len(PEOPLE) and card["steps"] == 5
    assert card["photos"] == {"new": 2 * len(PEOPLE), "enrolled": 2 * len(PEOPLE)}
    assert card["base_model"]["fingerprint"] == file_fingerprint(base_path)
    assert "masked" in meta["domains"] and len(meta["domains"]["masked"]["stats"]["mean"]) == 128
    text = out.with_suffix(".md").read_text()
    assert "## Adapted on" in text and file_fingerprint(base_path) in text
    base, _ = load_checkpoint(base_path)
    changed = [k for k, v in model.state_dict().items() if not np.allclose(v.numpy(), base.state_dict()[k].numpy())]
    assert changed and all(k.startswith(("backbone.blocks.", "fc.")) for k in changed)  # the tail only


def _refused(args: list[str], capsys) -> str:
    code = main(["adapt", *args, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and err.startswith("facemeta adapt: error:")
    return err


def test_bad_inputs_are_refused_in_one_line(labelled, data_dir, tmp_path, capsys, base_path):
    out = tmp_path / "new.safetensors"
    one = tmp_path / "one"
    shutil.copytree(labelled / PEOPLE[0], one / PEOPLE[0])
    assert "one person only" in _refused([str(base_path), "--labelled", str(one), "--out", str(out)], capsys)
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted((labelled / PEOPLE[0]).glob("*.png")):
        shutil.copy(p, flat / p.name)
    assert "no identity folders" in _refused([str(base_path), "--labelled", str(flat), "--out", str(out)], capsys)
    faceless = tmp_path / "faceless"
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (faceless / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((120, 120, 3), 90 + 40 * i, np.uint8)).save(faceless / name / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (120, 120, 3), dtype=np.uint8)).save(faceless / "b" / "noise.png")
    assert "a photo with a face" in _refused([str(base_path), "--labelled", str(faceless), "--out", str(out)], capsys)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model at all" * 10)
    assert "not a facemeta model" in _refused([str(junk), "--labelled", str(labelled), "--out", str(out)], capsys)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07")
    assert "ONNX export" in _refused([str(onnx), "--labelled", str(labelled), "--out", str(out)], capsys)
    assert "needs --domain" in _refused([str(base_path), "--labelled", str(labelled), "--out", str(out), "--unlabelled",
                                         str(labelled)], capsys)
    assert "base model itself" in _refused([str(base_path), "--labelled", str(labelled), "--out", str(base_path)], capsys)
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_adapted_model_enrolls_and_identifies(adapted, labelled, tmp_path):
    """Through FaceRecognizer (the gallery) and the service's FaceService: the unmasked photos enrolled, every
    labelled masked photo identified; the strong base model, barely moved by 5 steps, gets most right."""
    from facemeta.recognizer import FaceRecognizer
    from facemeta.serve.service import FaceService

    out, summary = adapted
    probes = [(name, p) for name in PEOPLE for p in sorted((labelled / name).glob("*.png"))]
    with FaceRecognizer(tmp_path / "g", out) as fr:
        for name in PEOPLE:
            fr.enroll(name, sorted((labelled / name / "enrolled").glob("*.png")))
        assert fr.gallery().info()["identities"] == len(PEOPLE)
        found = [fr.identify(p, top_k=len(PEOPLE))[0]["candidates"][0]["identity"] == name for name, p in probes]
    assert sum(found) >= len(probes) - 2
    svc = FaceService(tmp_path / "s", out, slots=1, threads=1)
    try:
        for name in PEOPLE:
            files = [(p.name, p.open("rb")) for p in sorted((labelled / name / "enrolled").glob("*.png"))]
            assert svc.enroll(name, files)["added"] == len(files)
        name, probe = probes[0]
        with probe.open("rb") as fh:
            answer = svc.identify((probe.name, fh), top_k=3)
        assert answer["faces"] and answer["threshold"] == pytest.approx(summary["threshold"])
        assert svc.info()["model"]["fingerprint"] == summary["fingerprint"]
    finally:
        svc.close()


def test_adaptation_episodes_keep_inner_people_out_of_the_outer_loss():
    """The sampler over a dataset and the training methods' split of an episode batch: the outer (judging) people
    are never inner (adapting) people, each side gets both images of its people, and an overlap is refused."""
    import torch

    from facemeta.train.adapt_episodes import AdaptEpisodeSampler, AdaptSplit, inner_outer

    people = np.repeat(np.arange(30), 3)
    domains = people % 3
    sampler = AdaptEpisodeSampler(people, domains, k=4, people_per_episode=8, seed=1)
    for step in range(60):
        ep = sampler.episode(step)
        inner, outer = set(people[list(ep.inner)]), set(people[list(ep.outer)])
        assert len(inner) == 4 and len(outer) == 4 and not inner & outer
        assert {int(domains[i]) for i in ep.inner + ep.outer} == {ep.domain}
        assert max(ep.inner_labels) == 3 and max(ep.outer_labels) == 3
    with pytest.raises(ValueError, match="outer loss would see inner people"):
        AdaptSplit((0, 1), (1, 2))
    labels = torch.tensor([11, 12, 13, 14, 15, 16])
    gallery = labels.float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2)  # each image says whose it is
    rng = np.random.default_rng(0)
    for _ in range(20):
        (xi, yi), (xo, yo) = inner_outer(gallery, gallery + 0.5, labels, rng)
        whose_in, whose_out = set(xi[:, 0, 0, 0].floor().tolist()), set(xo[:, 0, 0, 0].floor().tolist())
        assert whose_in and whose_out and not whose_in & whose_out
        assert len(xi) == 2 * len(whose_in) and len(xo) == 2 * len(whose_out)  # gallery and probe of each
        assert len(set(yi.tolist())) == len(whose_in) and len(set(yo.tolist())) == len(whose_out)


@pytest.mark.parametrize("method", ["adapt-maml-fo", "adapt-reptile"])
def test_adaptation_methods_train_the_tail(method):
    """One step of each registered method on a small random episode: finite loss, gradients on the tail that
    adapt trains and nowhere else."""
    import torch

    from facemeta.models.backbone import ModelConfig, build_model
    from facemeta.train.methods import METHODS, DomainTensors, EpisodeBatch, Joint, MethodSettings

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="dlib_resnet29", head="linear", embedding_size=128, image_size=150))
    joint = Joint(model, {})
    doms = [DomainTensors(d, torch.randn(4, 3, 150, 150), torch.randn(4, 3, 150, 150), torch.arange(4) + 4 * d)
            for d in range(2)]
    out = METHODS.get(method).grad(joint, EpisodeBatch(doms[:1], doms[1:]), MethodSettings(inner_lr=0.01))
    assert np.isfinite(out["loss"])
    with_grad = {n for n, p in joint.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "model.fc.weight" in with_grad and any(n.startswith("model.backbone.blocks.13.") for n in with_grad)
    assert not any(n.startswith(("model.backbone.stem", "model.backbone.blocks.0.")) for n in with_grad)


def test_adapt_benchmark_scores_only_cross_condition_pairs_and_pairs_the_draws():
    """The benchmark's scoring: enrolment-vs-target pairs only, and differences paired by draw."""
    from facemeta.experiments.adapt_bench import cross_scores, summarise

    vectors = np.eye(4, dtype=np.float32)
    scores, same = cross_scores(vectors, np.array(["a", "a", "b", "b"]), np.array([1, 0, 1, 0]))
    assert len(scores) == 4 and same.tolist() == [True, False, False, True]  # (a1,a0) (a1,b0) (b1,a0) (b1,b0)
    cells = [{"protocol": "p", "k": 5, "seed": s, "rows": {"base": {"tar": 0.5 + s / 10}, "stats-only": {"tar": 0.4},
                                                            "adapt": {"tar": 0.6 + s / 10, "far_at_threshold": 0.01}}}
             for s in (0, 1)]
    rows = {r["row"]: r for r in summarise({"cells": cells})}
    assert rows["adapt"]["vs base"] == pytest.approx((0.1, 0.0)) and rows["adapt"]["n"] == 2
    assert rows["adapt"]["vs stats-only"][0] == pytest.approx(0.25) and rows["base"]["vs base"] is None
