"""Exact resume: a training process killed with SIGKILL after a checkpoint, then resumed, ends with
bit-identical weights to an unbroken run (CPU, deterministic algorithms, one thread).

Real aligned faces (the smoke preset's slice), a tiny network (mobilenetv3_small_050 at 32x32),
all augmentations on and dropout on, so the data order, the per-image augmentation draws and the
torch RNG all have to be restored for the weights to match.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from facemeta.errors import CheckpointError, ConfigError
from facemeta.train.config import load_config
from facemeta.train.data import prepare_data
from facemeta.train.state import STATE_FILE, load_state
from facemeta.train.trainer import Trainer

STEPS = 30
OVERRIDES = {
    "model.image_size": 32, "model.dropout": 0.2, "model.embedding_size": 64,
    "sampler.identities_per_domain": 4, "steps": STEPS, "checkpoint_every": 3, "log_every": 3,
    "threads": 1, "eval.every": 0, "optim.warmup_steps": 5,
    "augment": {"flip": 0.5, "color": 0.5, "blur": 0.3, "jpeg": 0.3, "erase": 0.3, "gray": 0.2},
}


def _config(data_dir: Path, out: Path, **extra):
    return load_config("smoke", overrides={**OVERRIDES, "data.root": str(data_dir), "output": str(out), **extra})


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _trainer(cfg, **kwargs) -> Trainer:
    """A Trainer of `cfg` on its prepared data."""
    return Trainer(cfg, prepare_data(cfg), **kwargs)


def _write_yaml(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def test_killed_run_resumes_to_identical_weights(data_dir, tmp_path):
    # unbroken reference run, in this process
    ref = _trainer(_config(data_dir, tmp_path / "ref"), progress=False).fit()

    # the same run in a subprocess, killed (SIGKILL) once its first checkpoint is on disk
    out = tmp_path / "killed"
    cfg_path = _write_yaml(_config(data_dir, out), tmp_path / "run.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "facemeta", "train", str(cfg_path), "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / "checkpoints" / STATE_FILE
    deadline = time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (out / "model.safetensors").exists()
    killed_at = load_state(state)["step"]
    assert 3 <= killed_at < STEPS

    resumed = _trainer(_config(data_dir, out), resume=True, progress=False)
    final = resumed.fit()
    assert resumed.resumed_from == killed_at
    a, b = _weights(ref), _weights(final)
    assert a.keys() == b.keys()
    mismatched = [k for k in a if not torch.equal(a[k], b[k])]
    assert not mismatched, mismatched[:5]

    # the log has each step once, in order, after the resume trimmed what the killed run wrote late
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in lines if "loss" in r]
    assert logged == list(range(3, STEPS + 1, 3))
    ref_lines = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    ref_loss = [r["loss"] for r in ref_lines if "loss" in r]
    assert [r["loss"] for r in lines if "loss" in r] == ref_loss
    # old checkpoints are pruned to keep_checkpoints
    assert len(list((out / "checkpoints").glob("step-*.safetensors"))) == 2


def test_resume_guards(data_dir, tmp_path):
    out = tmp_path / "run"
    _trainer(_config(data_dir, out, steps=3, checkpoint_every=0), progress=False).fit()
    # training again into a used folder without --resume is refused (nothing is overwritten)
    with pytest.raises(ConfigError, match="--resume"):
        _trainer(_config(data_dir, out, steps=3, checkpoint_every=0), progress=False).fit()
    # resuming with settings that change the result is refused
    with pytest.raises(ConfigError, match="differs"):
        _trainer(_config(data_dir, out, steps=3, checkpoint_every=0, seed=1), resume=True, progress=False).fit()
    # a state file is only ever read with weights_only=True: a pickled object is rejected
    state = out / "checkpoints" / STATE_FILE
    torch.save({"version": 1, "evil": Path("x")}, state)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_state(state)
    state.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="corrupt"):
        _trainer(_config(data_dir, out, steps=3, checkpoint_every=0), resume=True, progress=False).fit()
    with pytest.raises(CheckpointError, match="no training state"):
        _trainer(_config(data_dir, tmp_path / "empty", steps=3), resume=True, progress=False).fit()
