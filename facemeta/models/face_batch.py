"""Aligned faces as one uint8 batch at a model's input size: the checks and resizing that the torch and the
ONNX Runtime embedding paths share (numpy and OpenCV only, so the torch-free path imports no torch)."""

from __future__ import annotations

import cv2
import numpy as np


def face_batch(faces: np.ndarray | list[np.ndarray], size: int) -> np.ndarray:
    """uint8 RGB faces [B,H,W,3] (or a list of HxWx3 / HxW arrays) -> uint8 [B,size,size,3]: grey faces get three
    channels, other sizes are resized (area when shrinking, linear when enlarging). ValueError on anything else."""
    if isinstance(faces, np.ndarray) and faces.ndim == 3 and faces.shape[-1] == 3:
        raise ValueError("preprocess expects a batch [B,H,W,3]; wrap a single face as faces[None]")
    if isinstance(faces, np.ndarray) and faces.ndim == 4:
        if faces.dtype != np.uint8 or faces.shape[-1] != 3:
            raise ValueError(f"faces must be uint8 [B,H,W,3], got {faces.dtype} {faces.shape}")
        if faces.shape[1:3] == (size, size):
            return faces
    out = []
    for f in faces:
        f = np.asarray(f)
        if f.dtype != np.uint8:
            raise ValueError(f"faces must be uint8, got {f.dtype}")
        if f.ndim == 2:
            f = np.repeat(f[:, :, None], 3, axis=2)
        if f.ndim != 3 or f.shape[2] != 3:
            raise ValueError(f"each face must be HxWx3 (or HxW grey), got {f.shape}")
        out.append(_resize(f, size))
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def _resize(face: np.ndarray, size: int) -> np.ndarray:
    h, w = face.shape[:2]
    if (h, w) == (size, size):
        return face
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR
    return cv2.resize(face, (size, size), interpolation=interp)
