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
