"""MTCNN wrapper on real images: landmarks, batching over sizes, selection policies, no-face inputs."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from facemeta.align.detect import Face, select_faces
from facemeta.images import load_image


@pytest.fixture(scope="module")
def lfw_images(data_dir):
    names = ["Aaron_Sorkin/Aaron_Sorkin_0001.jpg", "Colin_Powell/Colin_Powell_0001.jpg",
             "Serena_Williams/Serena_Williams_0001.jpg", "Tony_Blair/Tony_Blair_0002.jpg"]
    return [load_image(data_dir / "lfw" / "images" / n) for n in names]


def two_face_photo(lfw_images):
    """A 'group photo': two real LFW faces side by side, the left one twice as large."""
    canvas = np.full((360, 560, 3), 128, np.uint8)
    big = cv2.resize(lfw_images[0], (300, 300))
    canvas[30:330, 10:310] = big
    canvas[105:255, 380:530] = lfw_images[1]
    return canvas


def _plausible(face: Face) -> bool:
    (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = face.landmarks
    x1, y1, x2, y2 = face.box
    inside = (face.landmarks[:, 0] >= x1 - 2).all() and (face.landmarks[:, 0] <= x2 + 2).all()
    return bool(inside and lx < rx and mlx < mrx and max(ly, ry) < ny < min(mly, mry))


def test_detect_one_face_with_landmarks(detector, lfw_images):
    faces = detector.detect(lfw_images[0])
    assert len(faces) >= 1
    f = faces[0]
    assert f.score > 0.95 and f.landmarks.shape == (5, 2) and f.box.shape == (4,)
    assert _plausible(f)
    cx, cy = (f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2
    assert abs(cx - 75) < 20 and abs(cy - 75) < 25  # LFW's face is centred
    assert set(f.to_dict()) == {"box", "score", "landmarks"}


def test_batch_matches_single_calls_across_sizes(detector, lfw_images, data_dir):
    orl = [load_image(data_dir / "orl" / f"s{k}" / "1.pgm") for k in (1, 2)]
    images = [lfw_images[0], orl[0], lfw_images[1], orl[1], lfw_images[2]]
    batch = detector.detect_batch(images)
    assert len(batch) == len(images)
    for img, got in zip(images, batch, strict=True):
        single = detector.detect(img)
        assert len(got) == len(single)
        for a, b in zip(got, single, strict=True):
            assert np.allclose(a.box, b.box, atol=1.0) and np.allclose(a.landmarks, b.landmarks, atol=1.0)


def test_selection_policies(detector, lfw_images):
    faces = detector.detect(two_face_photo(lfw_images))
    assert len(faces) >= 2
    largest = select_faces(faces, "largest")
    assert len(largest) == 1 and largest[0].box[2] < 330  # the big face is on the left
    assert largest[0].area == max(f.area for f in faces)
    confident = select_faces(faces, "confident")
    assert confident[0].score == max(f.score for f in faces)
    every = select_faces(faces, "all")
    assert len(every) == len(faces) and [f.score for f in every] == sorted((f.score for f in faces), reverse=True)
    assert select_faces([], "largest") == []
    with pytest.raises(ValueError):
        select_faces(faces, "smallest")


def test_no_face_inputs(detector, lfw_images):
    rng = np.random.default_rng(0)
    flat = np.full((200, 200, 3), 128, np.uint8)
    noise = rng.integers(0, 256, size=(200, 200, 3), dtype=np.uint8)
    background = cv2.resize(lfw_images[3][:40, :40], (160, 160))  # a corner of a news photo
    assert detector.detect_batch([flat, noise, background]) == [[], [], []]


def test_grey_and_large_inputs(detector, lfw_images):
    grey = cv2.cvtColor(lfw_images[0], cv2.COLOR_RGB2GRAY)
    faces = detector.detect(grey)
    assert faces and _plausible(faces[0])
    large = cv2.resize(lfw_images[0], (2000, 2000), interpolation=cv2.INTER_CUBIC)
    big = detector.detect(large)
    assert big and _plausible(big[0])
    # max_side shrinks the image for MTCNN; coordinates come back in the large image's pixels
    assert np.allclose(big[0].landmarks * 150 / 2000, faces[0].landmarks, atol=3.0)


def test_relaxed_thresholds_find_at_least_as_much(detector, lfw_images):
    img = lfw_images[2]
    before = detector.detect(img)
    assert len(detector.detect(img, thresholds=(0.3, 0.4, 0.4))) >= len(before)
    after = detector.detect(img)  # the override held for that call only
    assert [f.to_dict() for f in after] == [f.to_dict() for f in before]
