"""MTCNN face detection: boxes, scores and five landmarks, batched over images.

facenet-pytorch's MTCNN supplies the three networks and their weights; the cascade that runs them is
facemeta.align.cascade (OpenCV resampling, about twice as fast on a CPU). MTCNN's ``forward()`` box crops
are not an alignment (the warp lives in warp.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from facemeta.registry import Registry

# The subject policy (select_faces): a face's score is its size (square root of the box area, as a share of the
# image's short side) times a centrality weight exp(-(d / SUBJECT_CENTRE_SCALE)^2), d the distance of the box
# centre from the image centre as a share of the short side, times its detector probability. Two faces whose
# scores are within SUBJECT_COMPETE of each other compete: the choice is reported as a warning.
SUBJECT_CENTRE_SCALE = 0.35
SUBJECT_COMPETE = 0.8


@dataclass
class Face:
    """One detected face: box (x1, y1, x2, y2), detector probability, 5x2 landmarks (image pixels)."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray

    @property
    def area(self) -> float:
        """Box area in pixels (for the 'largest' policy)."""
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))

    def shifted(self, dx: float, dy: float, scale: float = 1.0) -> Face:
        """The same face in another frame: coordinates scaled by `scale`, then moved by (dx, dy)."""
        off = np.array([dx, dy], dtype=np.float32)
        box = self.box * scale + np.concatenate([off, off])
        return Face(box.astype(np.float32), self.score, (self.landmarks * scale + off).astype(np.float32))

    def to_dict(self) -> dict:
        """JSON-ready form: box, score, landmarks as plain lists."""
        return {"box": [round(float(v), 2) for v in self.box], "score": round(float(self.score), 5),
                "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks]}


def subject_score(face: Face, width: int, height: int) -> float:
    """How likely a face is the subject of a photo: its size (share of the short side) weighted by how central
    it is and by the detector's probability (see SUBJECT_CENTRE_SCALE)."""
    short = float(max(1, min(width, height)))
    x1, y1, x2, y2 = (float(v) for v in face.box[:4])
    d = np.hypot((x1 + x2) / 2 - width / 2, (y1 + y2) / 2 - height / 2) / short
    return float(np.sqrt(face.area) / short * np.exp(-((d / SUBJECT_CENTRE_SCALE) ** 2)) * face.score)


def competing_note(faces: Sequence[Face], width: int, height: int) -> str | None:
    """A warning when the subject of a photo is not clear: the runner-up's subject score is within
    SUBJECT_COMPETE of the chosen face's; None otherwise (one face, or a clear subject)."""
    if len(faces) < 2:
        return None
    scores = sorted((subject_score(f, width, height) for f in faces), reverse=True)
    if scores[0] <= 0 or scores[1] < SUBJECT_COMPETE * scores[0]:
        return None
    return (f"{len(faces)} faces compete to be the subject (runner-up scores {scores[1] / scores[0]:.2f} of the "
            "chosen one); crop the photo to one face to be sure")


# Face-selection policies: name -> function(faces (non-empty), image height, width) -> the chosen faces.
FACE_POLICIES: Registry = Registry("face selection policy", error=ValueError)
FACE_POLICIES.register("subject", lambda faces, h, w: [max(faces, key=lambda f: subject_score(f, w, h))])
FACE_POLICIES.register("largest", lambda faces, h, w: [max(faces, key=lambda f: f.area)])
FACE_POLICIES.register("confident", lambda faces, h, w: [max(faces, key=lambda f: f.score)])
FACE_POLICIES.register("all", lambda faces, h, w: sorted(faces, key=lambda f: -f.score))
POLICIES = FACE_POLICIES.names()


def select_faces(faces: Sequence[Face], policy: str = "subject", shape: tuple[int, ...] | None = None) -> list[Face]:
    """Pick faces by policy (FACE_POLICIES): the photo's 'subject' (size, centrality and confidence together:
    needs the image `shape`; see subject_score), the 'largest' box, the most 'confident' score, or 'all' (most
    confident first)."""
    choose = FACE_POLICIES.get(policy)
    if not faces:
        return []
    if policy == "subject" and shape is None:
        raise ValueError("the subject policy needs the image's shape")
    height, width = (int(shape[0]), int(shape[1])) if shape is not None else (0, 0)
    return choose(list(faces), height, width)


class FaceDetector:
    """facenet-pytorch MTCNN wrapper that batches equal-sized images and returns Face lists.

    min_face_size and thresholds are MTCNN's (P-, R-, O-Net probabilities). Images larger than
    `max_side` pixels are shrunk for detection (coordinates are mapped back), which bounds the
    cost of MTCNN's image pyramid on large photos. `batch_size` caps how many images go through
    the networks at once.
    """

    def __init__(self, device: str = "cpu", min_face_size: int = 20,
                 thresholds: Sequence[float] = (0.6, 0.7, 0.7), max_side: int = 1600, batch_size: int = 32):
        from facenet_pytorch import MTCNN

        from facemeta.checks import check_device

        self.device = device = check_device(device)
        self.min_face_size = int(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.max_side = int(max_side)
        self.batch_size = int(batch_size)
        self.mtcnn = MTCNN(device=device)  # only its three networks and their weights are used (align.cascade)

    def detect(self, image: np.ndarray, thresholds: Sequence[float] | None = None) -> list[Face]:
        """Every face in one RGB uint8 image, most confident first."""
        return self.detect_batch([image], thresholds)[0]

    def detect_batch(self, images: Sequence[np.ndarray], thresholds: Sequence[float] | None = None,
                     min_face_fraction: float = 0.0) -> list[list[Face]]:
        """Faces of each image (most confident first); images of equal size share one MTCNN call.

        `thresholds` overrides the detector's thresholds for this call (used by the relaxed fallback).
        `min_face_fraction` > 0 skips faces smaller than that fraction of the image's short side
        (fewer pyramid levels and candidate boxes: a fast first pass when only the largest face matters).
        """
        prepared: list[np.ndarray] = []
        scales: list[float] = []
        for img in images:
            img, scale = self._prepare(img)
            prepared.append(img)
            scales.append(scale)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, img in enumerate(prepared):
            groups[img.shape].append(i)
        results: list[list[Face]] = [[] for _ in images]
        thr = self.thresholds if thresholds is None else tuple(float(t) for t in thresholds)
        for shape, idx in groups.items():
            min_size = max(self.min_face_size, int(min_face_fraction * min(shape[:2])))
            if min(shape[:2]) < min_size:
                continue  # smaller than the smallest face MTCNN looks for: its image pyramid would be empty
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                found = self._cascade(np.stack([prepared[i] for i in chunk]), min_size, thr)
                for i, (boxes, points) in zip(chunk, found, strict=True):
                    results[i] = _faces(boxes, points, 1.0 / scales[i])
        return results

    def _cascade(self, batch: np.ndarray, min_size: int, thresholds: tuple) -> list:
        """MTCNN's three stages over a batch of equal-sized images -> per image (boxes [F, 5], points [F, 5, 2]).
        Here facenet-pytorch's networks run by facemeta.align.cascade in torch; the ONNX detector overrides it."""
        from facemeta.align.cascade import detect_faces  # torch and facenet-pytorch load with the detector

        return detect_faces(batch, (self.mtcnn.pnet, self.mtcnn.rnet, self.mtcnn.onet), min_size, thresholds)

    def miss_note(self, image: np.ndarray) -> str:
        """Why an image may hold no face the detector can see: '' or a note on its size, for error messages."""
        h, w = np.shape(image)[:2]
        if min(h, w) < self.min_face_size:
            return f" (the image is {w}x{h} pixels, smaller than the smallest face looked for, {self.min_face_size} px)"
        return ""

    def _prepare(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """Make an RGB uint8 array no larger than max_side; return it and the scale applied."""
        img = np.asarray(image)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        elif img.ndim == 3 and img.shape[2] == 4:
            img = img[:, :, :3]
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 RGB image, got shape {img.shape}")
        if img.dtype != np.uint8:
            img = np.clip(img, 0, 255).astype(np.uint8)
        scale = 1.0
        h, w = img.shape[:2]
        if max(h, w) > self.max_side:
            scale = self.max_side / max(h, w)
            img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))),
                             interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(img), scale


def _faces(boxes: np.ndarray, points: np.ndarray, inv_scale: float) -> list[Face]:
    """Turn one image's cascade output (boxes [F, 5] with probabilities, points [F, 5, 2]) into Face objects,
    most confident first, in the coordinates of the image before `_prepare` shrank it."""
    faces = [Face(np.asarray(b[:4], dtype=np.float32) * inv_scale, float(b[4]),
                  np.asarray(pt, dtype=np.float32).reshape(5, 2) * inv_scale)
             for b, pt in zip(boxes, points, strict=True)]
    return sorted(faces, key=lambda f: -f.score)
