"""facemeta's MTCNN cascade (OpenCV resampling) against facenet-pytorch's own, on real faces of ../shared/data."""

from __future__ import annotations

import numpy as np
import pytest

from facemeta.align.cascade import detect_faces
from facemeta.images import load_image


@pytest.fixture(scope="module")
def faces_of_lfw(data_dir):
    """Thirteen LFW photos of thirteen people (one clear face each, some with others behind), as one batch."""
    people = sorted(p for p in (data_dir / "lfw" / "images").iterdir() if p.is_dir())[:400:33]
    return np.stack([load_image(sorted(p.iterdir())[0]) for p in people])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_cascade_finds_what_facenet_pytorch_finds(detector, faces_of_lfw):
    """Same networks, same thresholds: every face facenet-pytorch finds with probability > 0.95 is found here
    too (box IoU > 0.6; a different face would overlap by about 0), and the landmarks of the matched faces lie
    within MTCNN's jitter of facenet-pytorch's (median distance under 3 px on these 150-px photos)."""
    nets = (detector.mtcnn.pnet, detector.mtcnn.rnet, detector.mtcnn.onet)
    ours = detect_faces(faces_of_lfw, nets, 20, detector.thresholds)
    boxes, probs, points = detector.mtcnn.detect(faces_of_lfw, landmarks=True)
    dists = []
    for (b, pts), fb, fp, fpts in zip(ours, boxes, probs, points, strict=True):
        assert fb is not None and len(b) >= 1 and pts.shape[1:] == (5, 2)
        for box, prob, marks in zip(fb, fp, fpts, strict=True):
            if prob <= 0.95:
                continue
            overlap = [_iou(mine, box) for mine in b[:, :4]]
            best = int(np.argmax(overlap))
            assert overlap[best] > 0.6 and b[best, 4] > 0.9
            dists.append(np.linalg.norm(pts[best] - marks, axis=1))
    assert len(dists) >= len(faces_of_lfw)
    assert float(np.median(np.concatenate(dists))) < 3.0


def test_cascade_batch_equals_single_images(detector, faces_of_lfw):
    nets = (detector.mtcnn.pnet, detector.mtcnn.rnet, detector.mtcnn.onet)
    batch = detect_faces(faces_of_lfw[:4], nets, 40, detector.thresholds)
    for img, (boxes, points) in zip(faces_of_lfw[:4], batch, strict=True):
        one_boxes, one_points = detect_faces(img[None], nets, 40, detector.thresholds)[0]
        assert np.allclose(boxes, one_boxes, atol=1e-3) and np.allclose(points, one_points, atol=1e-3)


def test_cascade_on_images_without_faces(detector):
    nets = (detector.mtcnn.pnet, detector.mtcnn.rnet, detector.mtcnn.onet)
    blank = np.zeros((2, 120, 160, 3), np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (1, 120, 160, 3), dtype=np.uint8)
    for boxes, points in detect_faces(np.concatenate([blank, noise]), nets, 20, detector.thresholds):
        assert boxes.shape == (0, 5) and points.shape == (0, 5, 2)
