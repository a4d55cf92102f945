"""Shared test fixtures: the real face data in ../shared/data (or $FACEMETA_DATA)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from facemeta.paths import DataNotFoundError, data_root

# Keep torch from oversubscribing the 2 CI cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder holding lfw/, yaleb/, mfr2/ and orl/."""
    try:
        return data_root()
    except DataNotFoundError as exc:
        pytest.fail(f"real face data is required for the tests: {exc}")


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    """A temporary folder shared by the whole test session (for cached aligned faces)."""
    return tmp_path_factory.mktemp("session")


# ---------------------------------------------------------------- trained model (TRAIN helper)
class TrainedModel:
    """A model trained by facemeta.train for the tests, with the rows it was trained and validated on."""

    def __init__(self, out: Path, model_path: Path, steps: int, train_rows: list, heldout: list):
        self.out, self.model_path, self.steps = out, model_path, steps
        self.train_rows, self.heldout = train_rows, heldout
        self.train_identities = {r.identity for r in train_rows}


@pytest.fixture(scope="session")
def trained_model(data_dir, session_tmp) -> TrainedModel:
    """ERM on the `smoke` preset's real slice (40 LFW people of folds 1-5 + 30 ORL subjects, MTCNN-aligned):
    mobilenetv3_small_050 at 64x64, 200 SGD steps of batch 32, one thread (about a minute on 2 cores).
    Its verification threshold is calibrated at FAR 1e-2 on the held-out source identities (a small
    model's working point; the presets use 1e-3)."""
    from facemeta.train.config import load_config
    from facemeta.train.trainer import Trainer, prepare_data

    out = session_tmp / "trained-smoke"
    cfg = load_config("smoke", overrides={"data.root": str(data_dir), "output": str(out), "threads": 1,
                                          "log_every": 25, "checkpoint_every": 100, "eval.far": 1e-2})
    path = Trainer(cfg, progress=False).fit()
    data = prepare_data(cfg)
    return TrainedModel(out, path, cfg.steps, data.train, data.heldout)
