"""A fast start (issue 27, item 7): `facemeta verify` and `facemeta identify` import only what they use, and
with ``--runtime onnx`` no torch at all once the networks are in the cache. Each check runs the command line in
a fresh process and reads which modules that process loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

# Never needed to verify or identify a face; torch and facenet-pytorch not with --runtime onnx either.
TRAINING_STACK = ("timm", "matplotlib", "albumentations", "facemeta.train", "facemeta.experiments")
TORCH = ("torch", "torchvision", "facenet_pytorch")
DRIVER = """import json, sys
from facemeta.cli import main
try:
    sys.exit(main(sys.argv[1:]))
finally:  # --help exits inside main
    print("MODULES " + json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


def facemeta(*args: str, cwd=None) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `facemeta ARGS` in a fresh process -> (the finished process, the modules it had loaded at the end)."""
    out = subprocess.run([sys.executable, "-c", DRIVER, *args], capture_output=True, text=True, timeout=600,
                         cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = [x for x in out.stderr.splitlines() if x.startswith("MODULES ")]
    assert line, out.stderr[-2000:]
    return out, set(json.loads(line[-1].removeprefix("MODULES ")))


def loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    """Which of `names` (packages: their submodules count) are among `modules`."""
    return sorted(n for n in names if any(m == n or m.startswith(n + ".") for m in modules))


@pytest.fixture(scope="module")
def lfw_pair(data_dir) -> tuple[str, str]:
    """Two LFW photos of one person."""
    photos = sorted((data_dir / "lfw" / "images" / "Aaron_Peirsol").glob("*.jpg"))
    return str(photos[0]), str(photos[1])


@pytest.fixture(scope="module")
def first_onnx_run(lfw_pair):
    """The first `verify --runtime onnx` of this test session's cache: it exports the embedding network and
    MTCNN's three networks there (with torch, once) -> its JSON answer."""
    out, _ = facemeta("verify", *lfw_pair, "--runtime", "onnx", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_verify_onnx_loads_no_torch(first_onnx_run, lfw_pair):
    """Later runs: the same answer, and neither torch nor the training stack in the process."""
    out, modules = facemeta("verify", *lfw_pair, "--runtime", "onnx", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    assert loaded(modules, TORCH + TRAINING_STACK) == []
    again = json.loads(out.stdout)
    assert again["runtime"] == "onnx" and again["decision"] == first_onnx_run["decision"]
    assert abs(again["score"] - first_onnx_run["score"]) < 1e-6


def test_enroll_and_identify_onnx_load_no_torch(first_onnx_run, lfw_pair, tmp_path):
    """A gallery built and searched with --runtime onnx: no torch in either process, and the face is found."""
    gallery = str(tmp_path / "gallery")
    out, modules = facemeta("enroll", gallery, "Aaron_Peirsol", lfw_pair[0], "--runtime", "onnx", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    assert loaded(modules, TORCH + TRAINING_STACK) == []
    out, modules = facemeta("identify", gallery, lfw_pair[1], "--runtime", "onnx", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    assert loaded(modules, TORCH + TRAINING_STACK) == []
    assert json.loads(out.stdout)["faces"][0]["candidates"][0]["identity"] == "Aaron_Peirsol"


def test_verify_torch_loads_no_training_stack(lfw_pair):
    """The torch runtime needs torch and its detector, but no plotting, augmentation, training or experiments
    (timm still comes in: facemeta.models.backbone builds even facemeta's own trunks through timm's registry)."""
    out, modules = facemeta("verify", *lfw_pair, "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    assert loaded(modules, ("matplotlib", "albumentations", "facemeta.train", "facemeta.experiments")) == []
    assert json.loads(out.stdout)["runtime"] == "torch"


def test_command_line_imports_only_the_command_it_runs():
    """Building the parser for one command imports no other command's module (their option lists may load
    heavy modules), and `verify --help` loads neither torch nor the training stack."""
    out, modules = facemeta("verify", "--help")
    assert out.returncode == 0 and "--runtime" in out.stdout
    assert loaded(modules, TORCH + TRAINING_STACK) == []
    commands = {m for m in modules if m.startswith("facemeta.commands.")}
    assert "facemeta.commands.verify" in commands
    assert not commands & {"facemeta.commands.train", "facemeta.commands.benchmark", "facemeta.commands.align"}


def test_numpy_preprocessing_equals_torch(data_dir):
    """The ONNX model's torch-free preprocessing gives backbone.preprocess's numbers exactly (shrunk, enlarged,
    grey and same-size faces), so the two runtimes see the same input."""
    from facemeta.images import load_image
    from facemeta.models.backbone import ModelConfig, preprocess
    from facemeta.models.onnx_export import Preprocessing

    image = load_image(sorted((data_dir / "lfw" / "images" / "Aaron_Peirsol").glob("*.jpg"))[0])
    faces = [image[50:200, 50:200], image[60:160, 70:170], image[40:212, 40:212, 0], image[10:160, 20:170]]
    for size, mean, std in ((150, (0.48, 0.46, 0.41), (1.0039, 1.0039, 1.0039)), (112, (0.5,) * 3, (0.5,) * 3)):
        ours = Preprocessing(128, size, mean, std).preprocess(faces)
        theirs = preprocess(faces, ModelConfig(image_size=size, mean=mean, std=std)).numpy()
        assert ours.dtype == np.float32 and ours.shape == (4, 3, size, size)
        assert np.array_equal(ours, theirs)
