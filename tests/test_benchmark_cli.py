"""`facemeta benchmark`: presets, grid checks, and the smoke preset end to end on real faces."""

from __future__ import annotations

import argparse
import json

import pytest

from facemeta.commands import benchmark
from facemeta.errors import ConfigError
from facemeta.experiments.presets import load_bench_preset, run_config


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    benchmark.add_parser(parser.add_subparsers())
    return parser.parse_args(["benchmark", *argv])


def test_presets_load_and_bad_grids_are_refused(tmp_path):
    for name in ("smoke", "cpu", "gpu"):
        p = load_bench_preset(name)
        assert p.name == name and p.methods and p.targets and p.seeds
    cpu = load_bench_preset("cpu")
    assert len(cpu.methods) * len(cpu.targets) * len(cpu.seeds) == 45
    # the leave-one-out rewrite: LFW folds 1-5 + the other two sets; the method and seed set
    cfg = run_config(cpu, "orl", "mfr", 2)
    assert [s.set for s in cfg.data.sources] == ["lfw", "yaleb", "mfr2"]
    assert cfg.data.sources[0].people_folds == [1, 2, 3, 4, 5]
    assert cfg.data.targets == ["orl"] and cfg.method == "mfr" and cfg.seed == 2
    with pytest.raises(ConfigError, match="unknown method"):
        benchmark.run(_args("smoke", "--methods", "erm,sgdx"))
    with pytest.raises(ConfigError, match="unknown target"):
        benchmark.run(_args("smoke", "--targets", "lfw"))
    with pytest.raises(ConfigError, match="no benchmark preset"):
        load_bench_preset("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: smoke\nmethod: [erm]\n")
    with pytest.raises(ConfigError, match="unknown key 'method'"):
        load_bench_preset(str(bad))


def test_method_overrides_reach_that_method_only(tmp_path):
    path = tmp_path / "chosen.yaml"
    path.write_text("train: cpu\noverrides: {meta.alpha: 0.02}\nmethods: [teacher, erm, mfr, cdt]\n"
                    "method_overrides: {cdt: {meta.alpha: 0.0, meta.cdt_weight: 2.0}}\n")
    preset = load_bench_preset(str(path))
    cdt, mfr = run_config(preset, "orl", "cdt", 0), run_config(preset, "orl", "mfr", 0)
    assert (cdt.meta.alpha, cdt.meta.cdt_weight) == (0.0, 2.0)
    assert (mfr.meta.alpha, mfr.meta.cdt_weight) == (0.02, 1.0)
    path.write_text("train: cpu\nmethod_overrides: {sgdx: {meta.alpha: 0.0}}\n")
    with pytest.raises(ConfigError, match="method_overrides"):
        load_bench_preset(str(path))


def test_smoke_benchmark_writes_the_table_and_resumes(data_dir, tmp_path, capsys):
    out = tmp_path / "results"
    args = _args("smoke", "--runs", str(tmp_path / "runs"), "--out", str(out), "--data", str(data_dir))
    assert benchmark.run(args) == 0
    md = (out / "results.md").read_text()
    assert "## Target orl" in md and "| erm |" in md and "| mfr |" in md and "**" in md
    assert "lfw tar@far=1e-2" in md
    summary = json.loads((out / "results.json").read_text())
    assert {(r["method"], r["target"]) for r in summary["runs"]} == {("erm", "orl"), ("mfr", "orl")}
    for r in summary["runs"]:
        m = r["metrics"]
        assert 0.0 <= m["orl"]["tar@far=1e-2"] <= 1.0 and 0.0 <= m["orl"]["auc"] <= 1.0
        assert m["orl"]["n_images"] == 160 and m["lfw"]["n_pairs"] == 100
        assert r["images_seen"] == 10 * 3 * 4 * 2
    assert (out / "roc-orl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    # a second call finds every run finished and only rewrites the summary
    assert benchmark.run(args) == 0
    assert capsys.readouterr().out.count("(done, skipped)") == 2


def test_summary_draws_roc_only_for_methods_whose_runs_carry_points(tmp_path):
    """A result.json rebuilt from a results.json has no ROC points: its method stays in the tables, not the plot."""
    from facemeta.experiments.summary import write_summary

    def run(method, seed, tar, roc=True):
        orl = {"tar@far=1e-2": tar, "tar@far=1e-3": tar / 2, "auc": 0.9, "rank1": 0.5}
        if roc:
            orl["roc"] = {"far": [0.0, 0.01, 1.0], "tar": [0.0, tar, 1.0]}
        lfw = {"tar@far=1e-2": 0.1, "tar@far=1e-3": 0.05, "auc": 0.7, "rank1": 0.02, "acc": 0.66}
        return {"target": "orl", "method": method, "seed": seed, "metrics": {"orl": orl, "lfw": lfw}}

    results = [run("erm", s, 0.30 + 0.01 * s, roc=False) for s in range(3)]
    results += [run("cdt", s, 0.50 + 0.01 * s) for s in range(3)]
    summary = write_summary(load_bench_preset("smoke"), results, tmp_path)
    text = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert (tmp_path / "roc-orl.png").stat().st_size > 0
    assert "ROC curve not drawn for erm" in text and "ROC curve not drawn for cdt" not in text
    assert summary["goal"]["erm"]["mean TAR@FAR=1e-2 over targets"] == pytest.approx([0.30, 0.31, 0.32])
    assert "- cdt: +0.200 vs ERM (spread 0.010): beats ERM by more than the spread over seeds." in text
