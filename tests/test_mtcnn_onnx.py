"""The torch-free MTCNN (facemeta.align.mtcnn_onnx) against facemeta's torch detector, on real photos of
../shared/data: same faces, boxes and landmarks within a pixel, scores within 1e-3; later runs load no torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from facemeta.align.detect import FaceDetector
from facemeta.align.mtcnn_onnx import MANIFEST, OnnxFaceDetector, _cached_graphs, onnx_folder
from facemeta.images import load_image


@pytest.fixture(scope="module")
def onnx_detector():
    """The ONNX detector of this test session's cache (exported there on first use)."""
    return OnnxFaceDetector(threads=1)


@pytest.fixture(scope="module")
def photos(data_dir) -> list[Path]:
    """32 photos: 12 LFW people (news photos, some with several faces), 6 Yale B people in two lightings,
    4 ORL people (grey, 92x112), 4 MFR2 people (masked or not)."""
    lfw = [sorted(p.iterdir())[0] for p in sorted((data_dir / "lfw" / "images").iterdir())[:600:50]]
    yaleb = [sorted(p.glob("*.png"))[i] for p in sorted((data_dir / "yaleb").iterdir())[:6] for i in (0, 7)]
    orl = [sorted(p.glob("*.pgm"))[0] for p in sorted((data_dir / "orl").glob("s*"))[:4]]
    mfr2 = [sorted(p.glob("*.png"))[1] for p in sorted(d for d in (data_dir / "mfr2").iterdir() if d.is_dir())[:4]]
    return lfw + yaleb + orl + mfr2


def _assert_same(expected: list, got: list, where: list[Path]) -> int:
    """Same number of faces per image, in the same order; boxes and landmarks within 1 px, scores 1e-3."""
    faces = 0
    for path, a, b in zip(where, expected, got, strict=True):
        assert len(a) == len(b), f"{path}: torch found {len(a)} faces, ONNX {len(b)}"
        for fa, fb in zip(a, b, strict=True):
            assert np.abs(fa.box - fb.box).max() <= 1.0, (path, fa.box, fb.box)
            assert np.abs(fa.landmarks - fb.landmarks).max() <= 1.0, (path, fa.landmarks, fb.landmarks)
            assert abs(fa.score - fb.score) <= 1e-3, (path, fa.score, fb.score)
            faces += 1
    return faces


def test_same_faces_as_the_torch_detector(detector, onnx_detector, photos):
    """Batched (equal-sized images share a call) and one by one, with the default and the relaxed thresholds
    and the fast first pass's smallest face: the ONNX cascade answers as the torch one does."""
    images = [load_image(p) for p in photos]
    faces = _assert_same(detector.detect_batch(images), onnx_detector.detect_batch(images), photos)
    assert faces >= 20  # most photos hold a face the direct pass sees: the comparison is not of empty lists
    _assert_same([detector.detect(i) for i in images[:8]], [onnx_detector.detect(i) for i in images[:8]], photos[:8])
    relaxed = dict(thresholds=(0.4, 0.5, 0.5), min_face_fraction=0.25)
    _assert_same(detector.detect_batch(images, **relaxed), onnx_detector.detect_batch(images, **relaxed), photos)


def test_interface_of_face_detector(onnx_detector):
    """A FaceDetector with its settings, its miss note, and the CPU only."""
    assert isinstance(onnx_detector, FaceDetector)
    assert onnx_detector.thresholds == (0.6, 0.7, 0.7) and onnx_detector.min_face_size == 20
    tiny = np.zeros((12, 15, 3), np.uint8)
    assert onnx_detector.detect(tiny) == [] and "15x12" in onnx_detector.miss_note(tiny)
    with pytest.raises(ValueError, match="CPU"):
        OnnxFaceDetector(device="cuda")


def test_damaged_cache_is_not_used(onnx_detector, tmp_path):
    """A graph that is not the one its manifest names is refused (and exported again on load)."""
    folder = onnx_folder()
    assert _cached_graphs(folder) is not None
    for f in [*folder.glob("mtcnn-*.onnx"), folder / MANIFEST]:
        (tmp_path / f.name).write_bytes(f.read_bytes())
    data = bytearray((tmp_path / "mtcnn-rnet.onnx").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "mtcnn-rnet.onnx").write_bytes(bytes(data))
    assert _cached_graphs(tmp_path) is None
    for broken in ("[]", '{"format": "facemeta-mtcnn-onnx", "version": 1}', "{"):
        (tmp_path / MANIFEST).write_text(broken)
        assert _cached_graphs(tmp_path) is None
    manifest = json.loads((folder / MANIFEST).read_text())
    assert set(manifest["graphs"]) == {"pnet", "rnet", "onet"}


def test_later_runs_load_no_torch(onnx_detector, photos):
    """With the graphs in the cache, a fresh process detects faces without importing torch."""
    code = ("import sys; from facemeta.align.mtcnn_onnx import OnnxFaceDetector; from facemeta.images import "
            f"load_image; faces = OnnxFaceDetector().detect(load_image({str(photos[0])!r})); "
            "print(len(faces), 'torch' in sys.modules, 'facenet_pytorch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    count, torch_loaded, facenet_loaded = out.stdout.split()
    assert int(count) >= 1 and torch_loaded == "False" and facenet_loaded == "False"


def test_unwritable_cache_is_a_one_line_error(onnx_detector, tmp_path):
    """An export that cannot write its graphs says where, as a FacemetaError (the CLI's one-line error)."""
    from facemeta.align.mtcnn_onnx import load_graphs
    from facemeta.errors import FacemetaError

    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(FacemetaError, match="cannot write .*file/onnx"):
        load_graphs(tmp_path / "file" / "onnx")
