"""The `sface-heldout` benchmark preset (issue 29: the leave-one-domain-out table from SFace) and the zero-shot rows
of given checkpoints (`checkpoints:` of a bench preset, a single model or an ensemble)."""

from __future__ import annotations

import argparse

import pytest

from facemeta.commands import benchmark
from facemeta.data.manifest import ManifestRow
from facemeta.errors import CheckpointError, ConfigError
from facemeta.experiments.lodo import _matched
from facemeta.experiments.presets import grid, load_bench_preset, run_config


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    benchmark.add_parser(parser.add_subparsers())
    return parser.parse_args(["benchmark", *argv])


def test_sface_heldout_is_prior_heldout_from_sface():
    sface, prior = load_bench_preset("sface-heldout"), load_bench_preset("prior-heldout")
    assert sface.train == "sface" and prior.train == "prior"
    for key in ("targets", "seeds", "extra_sources", "method_overrides", "sources", "target_limit_per_identity",
                "lfw_pairs_per_fold", "flip"):
        assert getattr(sface, key) == getattr(prior, key), key
    # the same training settings but the thread counts (one torch thread on the shared CPU)
    differ = {k for k in {*sface.overrides, *prior.overrides} if sface.overrides.get(k) != prior.overrides.get(k)}
    assert differ <= {"threads", "data.align_workers"}
    assert [m for m in sface.methods if m not in sface.checkpoints] == prior.methods
    cfg = run_config(sface, "yaleb", "cdt", 1)
    assert (cfg.model.backbone, cfg.model.pretrained, cfg.model.image_size) == ("sface", True, 112)
    assert (cfg.data.align_chip, cfg.data.align_size, cfg.interpolate, cfg.steps) == ("arcface", 112, 0.5, 40)
    assert cfg.meta.alpha == 0.0 and run_config(sface, "yaleb", "mfr", 1).meta.alpha == 0.0005
    assert [(s.set, s.style) for s in cfg.data.sources] == [("lfw", None), ("orl", None), ("mfr2", None),
                                                             ("lfw", "harsh_light"), ("lfw", "mask")]
    teacher = run_config(sface, "orl", "teacher", 0)
    assert teacher.steps == 0 and teacher.model.backbone == "sface"
    # the zero-shot rows (teacher, the given checkpoints) run once per target; the trained ones once per seed
    cells = grid(sface)
    for row in ("teacher", *sface.checkpoints):
        assert [(t, s) for t, m, s in cells if m == row] == [(t, 0) for t in sface.targets]
    assert sum(m == "erm" for _, m, _ in cells) == len(sface.targets) * len(sface.seeds)


def test_checkpoint_rows_are_checked(tmp_path):
    path = tmp_path / "rows.yaml"
    path.write_text("train: cpu\nmethods: [teacher, mine]\ncheckpoints: {mine: missing/model.safetensors}\n")
    preset = load_bench_preset(str(path))
    assert grid(preset) == [(t, m, 0) for t in preset.targets for m in ("teacher", "mine")]
    args = _args(str(path), "--methods", "mine", "--targets", "orl", "--runs", str(tmp_path / "runs"),
                 "--out", str(tmp_path / "out"))
    with pytest.raises(CheckpointError, match="checkpoint missing/model.safetensors not found"):
        benchmark.run(args)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="unknown method 'other'"):
        benchmark.run(_args(str(path), "--methods", "other"))
    path.write_text("train: cpu\ncheckpoints: {erm: some.safetensors}\n")  # a row may not hide a method
    with pytest.raises(ConfigError, match="checkpoints takes a row name"):
        load_bench_preset(str(path))


def test_an_ensemble_is_evaluated_on_the_faces_aligned_on_every_chip():
    def rows(chip: str, names: list[str]) -> list[ManifestRow]:
        return [ManifestRow(f"/cache/{chip}/{n}.png", n[0], "d", {"source": f"/data/{n}.jpg"}) for n in names]

    dlib, arc = rows("dlib150", ["a1", "a2", "b1", "c1"]), rows("112", ["c1", "a1", "b1", "b2"])
    got = _matched([dlib, arc])
    assert [[r.path for r in chip] for chip in got] == [
        ["/cache/dlib150/a1.png", "/cache/dlib150/b1.png", "/cache/dlib150/c1.png"],
        ["/cache/112/a1.png", "/cache/112/b1.png", "/cache/112/c1.png"]]
    assert _matched([dlib]) == [dlib]
