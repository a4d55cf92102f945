"""Ensembles through `facemeta adapt` and `facemeta eval` (issue 29, part 2): an ensemble of dlib's prior and SFace
adapted on AR people (sunglasses as the new domain) is an ensemble checkpoint with a new fingerprint, threshold and
"adapted on" card, enrolls and identifies through the gallery; --members adapts only the chosen members; eval scores
an ensemble on every member's chip."""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from facemeta.cli import main

pytest.importorskip("onnx", reason="SFace's converter reads its file with the onnx package (the prior extra)")
pytestmark = pytest.mark.usefixtures("module_on_one_torch_thread")

PEOPLE = ("001", "002", "003", "004")
NEW_DOMAIN, ENROLMENT = ("08", "21"), ("01", "14")  # AR: sunglasses (sessions 1 and 2); neutral


def _ar(data_dir: Path, person: str, number: str) -> Path:
    return data_dir / "ar" / person / f"face_{person}_{number}.png"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """dlib's prior (dlib chip, 150 px) and SFace (ArcFace chip, 112 px), zero-shot, as one ensemble checkpoint."""
    from facemeta.models.backbone import build_prior
    from facemeta.models.ensemble import ensemble_of, save_ensemble

    models = [build_prior(name)[0] for name in ("prior", "sface")]
    path = tmp_path_factory.mktemp("base") / "ensemble.safetensors"
    return save_ensemble(ensemble_of(models, [("dlib", 150), ("arcface", 112)]), path,
                         meta={"method": "ensemble", "threshold": 0.5, "threshold_far": 1e-3})


@pytest.fixture(scope="module")
def labelled(data_dir, tmp_path_factory) -> Path:
    """DIR/<person>/ two sunglasses photos (the new domain), DIR/<person>/enrolled/ two neutral ones."""
    root = tmp_path_factory.mktemp("labelled")
    for person in PEOPLE:
        (root / person / "enrolled").mkdir(parents=True)
        for n in NEW_DOMAIN:
            shutil.copy(_ar(data_dir, person, n), root / person)
        for n in ENROLMENT:
            shutil.copy(_ar(data_dir, person, n), root / person / "enrolled")
    return root


@pytest.fixture(scope="module")
def adapted(base, labelled, tmp_path_factory) -> tuple[Path, dict]:
    """The ensemble adapted on `labelled` (every member, 5 steps, a domain), through the command line (--json)."""
    out = tmp_path_factory.mktemp("adapted") / "sunglasses.safetensors"
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(["adapt", str(base), "--labelled", str(labelled), "--out", str(out), "--domain", "sunglasses",
                     "--steps", "5", "--json"])
    assert code == 0
    return out, json.loads(buf.getvalue())


def _states(path: Path) -> list[dict]:
    from facemeta.models.ensemble import load_model

    model, _ = load_model(path)
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in model.members]


def test_adapted_ensemble_file_fingerprint_threshold_and_card(adapted, base):
    from facemeta.embedder import file_fingerprint
    from facemeta.models.ensemble import EnsembleModel, load_model

    out, summary = adapted
    assert out.is_file() and out.with_suffix(".json").is_file() and out.with_suffix(".md").is_file()
    assert summary["fingerprint"] == file_fingerprint(out) != file_fingerprint(base)
    model, meta = load_model(out)
    assert isinstance(model, EnsembleModel) and model.chips == [("dlib", 150), ("arcface", 112)]
    assert -1.0 <= meta["threshold"] <= 1.0 and meta["threshold_far"] == pytest.approx(1e-3)
    card = meta["adapted_on"]
    assert card["domain"] == "sunglasses" and card["people"] == len(PEOPLE) and card["steps"] == 5
    assert card["photos"] == {"new": 2 * len(PEOPLE), "enrolled": 2 * len(PEOPLE)}
    assert card["base_model"]["fingerprint"] == file_fingerprint(base)
    members = card["members"]
    assert [m["backbone"] for m in members] == ["dlib_resnet29", "sface"] and all(m["adapted"] for m in members)
    assert [m["tail_blocks"] for m in members] == [4, 0]  # SFace has no residual blocks: its embedding layer only
    assert len(meta["domains"]["sunglasses"]["stats"]["mean"]) == 256  # the ensemble's vectors
    text = out.with_suffix(".md").read_text()
    assert "## Adapted on" in text and "member 0 (dlib_resnet29" in text and file_fingerprint(base) in text
    before, after = _states(base), _states(out)
    changed = [k for k, v in after[0].items() if not np.allclose(v.numpy(), before[0][k].numpy())]
    assert changed and all(k.startswith(("backbone.blocks.", "fc.")) for k in changed)  # dlib's tail only
    moved = [k for k, v in after[1].items() if not np.array_equal(v.numpy(), before[1][k].numpy())]
    assert all(not k.startswith("backbone.") for k in moved)  # SFace's trunk untouched
    for k in ("bn2.running_mean", "bn2.running_var", "features.running_mean", "features.running_var"):
        assert np.array_equal(after[1][k].numpy(), before[1][k].numpy())  # batch norms' statistics kept


def test_members_option_adapts_only_the_chosen_ones(base, labelled, tmp_path):
    from facemeta.models.ensemble import load_model
    from facemeta.train.adapt import AdaptSettings, adapt_model

    out = tmp_path / "dlib-only.safetensors"
    summary = adapt_model(base, labelled, out, AdaptSettings(steps=3), members="0")
    assert [m["adapted"] for m in summary["adapted_on"]["members"]] == [True, False]
    before, after = _states(base), _states(out)
    assert any(not np.array_equal(v.numpy(), before[0][k].numpy()) for k, v in after[0].items())
    assert all(np.array_equal(v.numpy(), before[1][k].numpy()) for k, v in after[1].items())
    model, meta = load_model(out)
    assert meta["adapted_on"]["members"][1] == {"member": 1, "backbone": "sface", "chip": "arcface",
                                                "align_size": 112, "adapted": False}
    assert "kept as it was" in out.with_suffix(".md").read_text()
    entries = [json.loads(p.with_suffix(".json").read_text())["config"]["members"] for p in (base, out)]
    if entries[0][1].get("prior"):  # members equal to an installed prior are stored as references to it
        assert entries[1][1].get("prior") == entries[0][1]["prior"] and not entries[1][0].get("prior")


def _refused(args: list[str], capsys) -> str:
    code = main(["adapt", *args, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and err.startswith("facemeta adapt: error:")
    return err


def test_bad_member_choices_are_refused_in_one_line(base, labelled, tmp_path, capsys):
    from facemeta.models.checkpoint import save_checkpoint
    from facemeta.models.ensemble import load_model

    out = tmp_path / "new.safetensors"
    args = [str(base), "--labelled", str(labelled), "--out", str(out), "--members"]
    assert "members are 0..1" in _refused([*args, "2"], capsys)
    assert "member numbers" in _refused([*args, "dlib"], capsys)
    single = tmp_path / "single.safetensors"
    save_checkpoint(load_model(base)[0].members[1], single, {"align_chip": "arcface", "align_size": 112})
    assert "single model" in _refused([str(single), "--labelled", str(labelled), "--out", str(out), "--members", "0"],
                                      capsys)
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_training_from_an_ensemble_is_refused_in_one_line(base):
    """model.pretrained_path: a run trains one model; an ensemble is refused in one line naming the ways that work."""
    from facemeta.errors import ConfigError
    from facemeta.train.config import load_config
    from facemeta.train.start import pretrained_file

    cfg = load_config("prior", overrides={"model.pretrained": False, "model.pretrained_path": str(base)})
    with pytest.raises(ConfigError, match="is an ensemble of 2 models") as info:
        pretrained_file(cfg)
    assert "\n" not in str(info.value) and "distill.teacher" in str(info.value)


def test_adapted_ensemble_enrolls_and_identifies(adapted, labelled, tmp_path):
    """Through FaceRecognizer: the neutral photos enrolled, every labelled sunglasses photo identified; the strong
    base models, barely moved by 5 steps, get most right among 4 people."""
    from facemeta.recognizer import FaceRecognizer

    out, summary = adapted
    probes = [(name, p) for name in PEOPLE for p in sorted((labelled / name).glob("*.png"))]
    with FaceRecognizer(tmp_path / "g", out) as fr:
        for name in PEOPLE:
            fr.enroll(name, sorted((labelled / name / "enrolled").glob("*.png")))
        info = fr.gallery().info()
        assert info["identities"] == len(PEOPLE)
        found = [fr.identify(p, top_k=len(PEOPLE))[0]["candidates"][0]["identity"] == name for name, p in probes]
    assert sum(found) >= len(probes) - 2


def test_eval_scores_an_ensemble_on_every_members_chip(adapted, data_dir, tmp_path, capsys):
    """`facemeta eval` of an ensemble on a folder of AR people: each member's chip aligned, the vectors those of
    the ensemble on the chips it reads (embed_chip_rows), the metrics reported."""
    from facemeta.eval.benchmark import embed_chip_rows, read_aligned
    from facemeta.eval.sets import load_eval_chip_rows
    from facemeta.models.ensemble import load_model

    out, _ = adapted
    folder = tmp_path / "ar"
    for person in PEOPLE:
        (folder / person).mkdir(parents=True)
        for n in ("01", "08", "11"):
            shutil.copy(_ar(data_dir, person, n), folder / person)
    assert main(["eval", str(out), "--set", str(folder), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["backbone"] == "dlib_resnet29+sface" and res["image_size"] == [150, 112]
    assert res["n_images"] >= 3 * len(PEOPLE) - 2 and res["n_identities"] == len(PEOPLE)
    assert 0.0 <= res["auc"] <= 1.0 and res["rank1"] is not None
    model, _ = load_model(out)
    per_chip, _, _ = load_eval_chip_rows(str(folder), model.chips)
    assert [len(rows) for rows in per_chip] == [res["n_images"]] * 2
    assert [r.extra.get("source") for r in per_chip[0]] == [r.extra.get("source") for r in per_chip[1]]
    vectors = embed_chip_rows(model, per_chip, batch_size=5)
    direct = model.embed([[read_aligned(r.path) for r in rows] for rows in per_chip])
    assert vectors.shape == (res["n_images"], 256) and np.allclose(vectors, direct, atol=1e-5)
    manifest = tmp_path / "aligned.csv"
    manifest.write_text("path,identity,domain\n")
    from facemeta.errors import ConfigError

    with pytest.raises(ConfigError, match="holds faces on one chip"):
        load_eval_chip_rows(str(manifest), model.chips)


def test_distil_an_ensemble_into_one_student(base, data_dir, tmp_path):
    """distill.teacher: the ensemble as the teacher of a timm student (a few steps on a small slice of the smoke
    preset's sources): the teacher's vectors are the ensemble's (256-d; its dlib part is the prior's own teacher
    vector, scaled by sqrt(1/2)), the projection maps the student onto them, the steps are finite."""
    import json as _json

    import torch

    from facemeta.models.checkpoint import load_checkpoint
    from facemeta.train.config import load_config
    from facemeta.train.data import prepare_data
    from facemeta.train.teacher import teacher_embeddings
    from facemeta.train.trainer import Trainer

    sources = [{"set": "lfw", "people_folds": [1, 2, 3, 4, 5], "min_images": 4, "max_identities": 8,
                "limit_per_identity": 4}, {"set": "orl", "max_identities": 8, "limit_per_identity": 4}]
    cfg = load_config("smoke", overrides={
        "data.root": str(data_dir), "output": str(tmp_path / "student"), "threads": 1, "steps": 2,
        "checkpoint_every": 0, "log_every": 1, "data.sources": sources, "sampler.identities_per_domain": 4,
        "distill.weight": 1.0, "distill.pair_weight": 1.0, "distill.teacher": str(base)})
    data = prepare_data(cfg)
    trainer = Trainer(cfg, data, progress=False)
    model, _ = load_checkpoint(trainer.fit())
    assert model.config.backbone == "mobilenetv3_small_050"
    teacher = trainer.teacher.numpy()
    ok = np.isfinite(teacher).all(axis=1)
    assert teacher.shape == (len(data.train), 256) and ok.mean() > 0.9
    assert np.allclose(np.linalg.norm(teacher[ok], axis=1), 1.0, atol=1e-4)
    assert trainer.distill.projection.weight.shape == torch.Size([256, 128])
    prior = teacher_embeddings(data.train, cfg.data.cache, workers=1)  # the default teacher: dlib's prior
    both = ok & np.isfinite(prior).all(axis=1)
    assert both.sum() > 0.9 * len(prior) and np.allclose(teacher[both, :128] * np.sqrt(2), prior[both], atol=1e-4)
    logs = [_json.loads(x) for x in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logs if "loss" in r]
    assert len(steps) == 2 and all(np.isfinite(r["loss"]) for r in steps)
