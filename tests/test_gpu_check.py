"""benchmarks/gpu_check.sh and its Python part run their dry mode here (no GPU needed): the stages write their
parts, the report merges them, and the shell script parses its arguments."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shell_script_help_and_bad_argument():
    ok = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "--dry-run" in ok.stdout and "8 minutes" in ok.stdout
    bad = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown argument --bogus" in bad.stderr


def test_python_part_help_lists_the_stages():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    for stage in ("env", "train", "embed", "adapt", "report", "prepare"):
        assert stage in out.stdout


def test_dry_train_and_adapt_stages_write_parts_and_the_report(tmp_path):
    """erm's step (bf16 autocast and channels_last included) and adapt on random faces, tiny, on the CPU; a second
    run resumes (keeps the rows); the report lists both."""
    gc = _module()
    common = ["--quick", "--device", "cpu", "--out", str(tmp_path), "--carry", str(tmp_path / "no-carry")]
    assert gc.main(["--stage", "train", "--methods", "erm", *common]) == 0
    train = json.loads((tmp_path / "parts" / "train.json").read_text())
    assert set(train["rows"]) == {"erm/fp32", "erm/bf16+cl"} and not train["errors"]
    assert all(r["loss_finite"] and r["images_per_s"] > 0 for r in train["rows"].values())
    stamp = train["rows"]["erm/fp32"]["median_s"]
    assert gc.main(["--stage", "train", "--methods", "erm", *common]) == 0  # resumed: nothing re-measured
    assert json.loads((tmp_path / "parts" / "train.json").read_text())["rows"]["erm/fp32"]["median_s"] == stamp

    assert gc.main(["--stage", "adapt", *common]) == 0
    adapt = json.loads((tmp_path / "parts" / "adapt.json").read_text())
    (row,) = adapt["rows"].values()
    assert row["synthetic"] and set(row["rows"]) == {"base", "stats-only", "adapt"} and not adapt["errors"]

    assert gc.main(["--stage", "report", *common]) == 0
    md = (tmp_path / "results.md").read_text()
    assert "| erm | bf16+cl |" in md and "| synthetic | 3 | default-2steps | 1 |" in md
    assert set(json.loads((tmp_path / "results.json").read_text())) == {"train", "adapt"}


@pytest.mark.slow
def test_whole_dry_run_of_the_shell_script(tmp_path):
    """Every stage of gpu_check.sh --dry-run on this machine, each within its limit."""
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, timeout=1200)
    assert out.returncode == 0, out.stdout[-2000:]
    parts = {p.stem for p in (tmp_path / "parts").glob("*.json")}
    assert parts == {"env", "train", "embed", "adapt"}
    assert "## Training throughput per method" in (tmp_path / "results.md").read_text()


def test_device_side_helpers_match_the_product():
    """stats_only_np (the device machine has no FAISS, so no facemeta.gallery) gives adapt_bench.stats_only's
    vectors; model_configs finds a single model's config and an ensemble's members' configs in a checkpoint JSON."""
    import numpy as np

    from facemeta.experiments.adapt_bench import stats_only

    gc = _module()
    rng = np.random.default_rng(0)
    v = rng.normal(size=(20, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    conditions = np.array([0, 1] * 10)
    adapt_idx = np.arange(6)
    np.testing.assert_allclose(gc.stats_only_np(v, conditions, adapt_idx), stats_only(v, conditions, adapt_idx),
                               atol=1e-6)
    single = {"config": {"backbone": "dlib_resnet29", "image_size": 150}, "meta": {"validation": {"backbone": "x"}}}
    ensemble = {"config": {"members": [{"config": {"backbone": "dlib_resnet29"}}, {"config": {"backbone": "sface"}}]}}
    assert [c["backbone"] for c in gc.model_configs(single["config"])] == ["dlib_resnet29"]
    assert [c["backbone"] for c in gc.model_configs(ensemble["config"])] == ["dlib_resnet29", "sface"]
    for path in (ROOT / "weights").glob("*.json"):  # the shipped model's sidecar, single or ensemble
        doc = json.loads(path.read_text())
        if "config" in doc:
            assert all(c["backbone"] for c in gc.model_configs(doc["config"]))
