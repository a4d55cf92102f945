"""The wheel and the sdist carry the shipped model and its card (issue 27, item 6).

The wheel is built from a copy of the sources (so the checkout gets no build/ folder), offline and without build
isolation (`pip wheel . --no-deps --no-build-isolation`); the slow tests install it with --target beside the
project's dependencies and run `facemeta verify` on two LFW photos from another folder, where the wheel's copy of
facemeta shadows the checkout's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("default.safetensors", "default.json", "MODEL_CARD.md", "model-card.json", "NOTICE",
           "LICENSE-Apache-2.0.txt")


def _can_build() -> bool:
    """setuptools with its own bdist_wheel (70.1 and later), or the wheel package."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    import setuptools

    major, minor = (int(p) for p in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


pytestmark = pytest.mark.skipif(not _can_build(), reason="needs setuptools >= 70.1 (or wheel) to build offline")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sources(dst: Path) -> Path:
    """What the build reads, copied from the checkout (no caches, no build leftovers)."""
    dst.mkdir(parents=True)
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(REPO / name, dst / name)
    shutil.copytree(REPO / "facemeta", dst / "facemeta", ignore=shutil.ignore_patterns("__pycache__", "weights"))
    shutil.copytree(REPO / "weights", dst / "weights")
    return dst


def _pip(*args: str, cwd: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "-q"], cwd=cwd, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PIP_NO_INDEX": "1"})
    assert out.returncode == 0, out.stderr[-2000:]


def _build_wheel(src: Path, out: Path) -> Path:
    _pip("wheel", ".", "--no-build-isolation", "-w", str(out), cwd=src)
    (wheel,) = out.glob("facemeta-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    return _build_wheel(_sources(tmp / "src"), tmp / "dist")


def test_the_wheel_carries_the_model_and_its_card(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for name in SHIPPED:
            member = f"facemeta/weights/{name}"
            assert member in names, f"{member} is not in {wheel.name}"
            assert hashlib.sha256(z.read(member)).hexdigest() == _sha(REPO / "weights" / name)
        assert "facemeta/configs/smoke.yaml" in names
        record = z.read(next(n for n in names if n.endswith(".dist-info/RECORD"))).decode()
        assert "facemeta/weights/default.safetensors," in record


def test_a_checkout_has_no_packaged_model():
    """In the source tree the model is found in weights/, not in the package (nothing copied there)."""
    from facemeta.paths import packaged_weights_dir

    assert packaged_weights_dir() is None
    assert not (REPO / "facemeta" / "weights").exists()


@pytest.mark.slow
def test_the_installed_wheel_verifies_two_lfw_photos(wheel, tmp_path, data_dir):
    site = tmp_path / "site"
    _pip("install", "--target", str(site), str(wheel), cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "FACEMETA_MODEL"}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    where = subprocess.run([sys.executable, "-c", "import facemeta, facemeta.paths as p; "
                            "print(facemeta.__file__); print(p.packaged_weights_dir())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split("\n")
    assert Path(where[0]).is_relative_to(site) and Path(where[1]) == site / "facemeta" / "weights"
    photos = data_dir / "lfw" / "images" / "Aaron_Peirsol"
    out = subprocess.run([sys.executable, "-m", "facemeta", "verify", str(photos / "Aaron_Peirsol_0001.jpg"),
                          str(photos / "Aaron_Peirsol_0002.jpg"), "--json"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    answer = json.loads(out.stdout)
    assert Path(answer["model"]) == site / "facemeta" / "weights" / "default.safetensors"
    assert len(answer["faces"]) == 2 and -1.0 <= answer["score"] <= 1.0


@pytest.mark.slow
def test_the_sdist_carries_the_model_and_builds_a_wheel_with_it(tmp_path):
    src = _sources(tmp_path / "src")
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path / 'sdist')!r}))"
    name = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, check=True,
                          timeout=600).stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / "sdist" / name) as t:
        root = name.removesuffix(".tar.gz")
        for shipped in SHIPPED:
            assert f"{root}/weights/{shipped}" in t.getnames()
        t.extractall(tmp_path / "unpacked", filter="data")
    wheel = _build_wheel(tmp_path / "unpacked" / root, tmp_path / "dist")
    with zipfile.ZipFile(wheel) as z:
        assert hashlib.sha256(z.read("facemeta/weights/default.safetensors")).hexdigest() == \
            _sha(REPO / "weights" / "default.safetensors")
