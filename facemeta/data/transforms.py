"""Image transforms for training and evaluation (albumentations 2), ending in a normalised CHW tensor.

Training augmentation imitates the nuisances of unseen domains: mirror images, colour and
exposure shifts, defocus, JPEG artefacts, occlusion (random erasing stands in for masks and
glasses) and, optionally, grey sensors. Each has its own probability in :class:`AugmentConfig`
(0 turns it off). A call may pass a seed, which fixes every random choice of that call, so a
resumed training run can replay exactly the augmentations of an unbroken one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import albumentations as A
import cv2
import numpy as np
import torch

from facemeta.errors import ConfigError


def _pair(value, name: str, cast=float) -> tuple:
    try:
        lo, hi = (cast(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"augment.{name} must be a pair [low, high], got {value!r}") from None
    if lo > hi:
        raise ConfigError(f"augment.{name} must have low <= high, got {value!r}")
    return lo, hi


@dataclass
class AugmentConfig:
    """Probabilities (0 disables) and strengths of the training augmentations.

    flip: horizontal mirror. color: brightness/contrast/saturation/hue jitter (strengths below).
    blur: Gaussian blur with sigma in blur_sigma. jpeg: re-encode at a quality in jpeg_quality.
    erase: erase one rectangle covering erase_scale of the image (occlusion). gray: grey image
    (three equal channels), for grey target domains.
    """

    flip: float = 0.5
    color: float = 0.3
    blur: float = 0.1
    jpeg: float = 0.2
    erase: float = 0.1
    gray: float = 0.0
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.05
    blur_sigma: tuple[float, float] = (0.3, 1.5)
    jpeg_quality: tuple[int, int] = (30, 95)
    erase_scale: tuple[float, float] = (0.02, 0.2)

    def __post_init__(self) -> None:
        for name in ("flip", "color", "blur", "jpeg", "erase", "gray"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"augment.{name} is a probability in [0, 1], got {value!r}")
            setattr(self, name, float(value))
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"augment.{name} must be in [0, 1), got {value!r}")
        if not isinstance(self.hue, (int, float)) or not 0.0 <= self.hue <= 0.5:
            raise ConfigError(f"augment.hue must be in [0, 0.5], got {self.hue!r}")
        self.blur_sigma = _pair(self.blur_sigma, "blur_sigma")
        self.jpeg_quality = _pair(self.jpeg_quality, "jpeg_quality", int)
        self.erase_scale = _pair(self.erase_scale, "erase_scale")
        if self.blur_sigma[0] <= 0:
            raise ConfigError(f"augment.blur_sigma must be positive, got {self.blur_sigma}")
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ConfigError(f"augment.jpeg_quality must lie in [1, 100], got {self.jpeg_quality}")
        if not 0 < self.erase_scale[0] <= self.erase_scale[1] < 1:
            raise ConfigError(f"augment.erase_scale must lie in (0, 1), got {self.erase_scale}")

    @classmethod
    def from_dict(cls, values: dict | None) -> AugmentConfig:
        """Build from a config mapping; an unknown key is a ConfigError."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown augment setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**values)

    @classmethod
    def off(cls) -> AugmentConfig:
        """Every augmentation disabled (the training transform then equals the evaluation one)."""
        return cls(flip=0.0, color=0.0, blur=0.0, jpeg=0.0, erase=0.0, gray=0.0)

    def as_dict(self) -> dict:
        """Plain dict (lists for pairs), for checkpoints' JSON."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def to_tensor(image: np.ndarray, mean: Sequence[float] = (0.5, 0.5, 0.5),
              std: Sequence[float] = (0.5, 0.5, 0.5)) -> torch.Tensor:
    """HxWx3 uint8 RGB -> 3xHxW float32 tensor, (x / 255 - mean) / std."""
    # numpy, not torch ops: single-threaded, so data workers do not fight over the cores
    scale = np.float32(1.0 / 255.0) / np.asarray(std, dtype=np.float32)
    shift = np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32)
    chw = np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1), dtype=np.float32)
    chw *= scale[:, None, None]
    chw -= shift[:, None, None]
    return torch.from_numpy(chw)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"transforms take uint8 images, got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 4:
        return np.ascontiguousarray(image[:, :, :3])
    if image.ndim != 3 or image.shape[2] != 3:
        raise TypeError(f"transforms take HxWx3 RGB images, got shape {image.shape}")
    return image


class FaceTransform:
    """A callable image -> normalised tensor: resize to image_size, the given albumentations steps, normalise.

    ``transform(image, seed=s)`` reseeds every step from `s` (each step its own stream), so the
    same (image, seed) always gives the same tensor; without a seed the steps' own generators run on.
    """

    def __init__(self, steps: list, image_size: int, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5)):
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.steps = list(steps)
        self.resize = A.Resize(self.image_size, self.image_size, interpolation=cv2.INTER_LINEAR,
                               area_for_downscale="image", p=1.0)
        self.compose = A.Compose(self.steps, p=1.0) if self.steps else None

    def reseed(self, seed: int) -> None:
        """Give each step an independent generator derived from `seed` (one seed for all would correlate them)."""
        if self.compose is None:
            return
        states = np.random.SeedSequence(int(seed) & 0xFFFFFFFFFFFFFFFF).generate_state(len(self.steps) + 1)
        self.compose.random_generator = np.random.default_rng(int(states[0]))
        self.compose.py_random = random.Random(int(states[0]))
        for step, state in zip(self.steps, states[1:], strict=True):
            step.set_random_seed(int(state))

    def __call__(self, image: np.ndarray, seed: int | None = None) -> torch.Tensor:
        image = _as_rgb(image)
        if image.shape[:2] != (self.image_size, self.image_size):
            image = self.resize(image=image)["image"]
        if self.compose is not None:
            if seed is not None:
                self.reseed(seed)
            image = self.compose(image=image)["image"]
        return to_tensor(image, self.mean, self.std)

    def __repr__(self) -> str:
        names = ", ".join(type(s).__name__ for s in self.steps) or "none"
        return f"FaceTransform(size={self.image_size}, steps=[{names}])"


def build_train_transform(cfg: AugmentConfig | None, image_size: int, mean: Sequence[float] = (0.5, 0.5, 0.5),
                          std: Sequence[float] = (0.5, 0.5, 0.5)) -> FaceTransform:
    """Training transform: resize, then each augmentation with its probability (0 leaves it out), normalise."""
    cfg = cfg or AugmentConfig()
    steps: list = []
    if cfg.flip > 0:
        steps.append(A.HorizontalFlip(p=cfg.flip))
    if cfg.color > 0:
        steps.append(A.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast, saturation=cfg.saturation,
                                   hue=cfg.hue, p=cfg.color))
    if cfg.gray > 0:
        steps.append(A.ToGray(num_output_channels=3, p=cfg.gray))
    if cfg.blur > 0:
        steps.append(A.GaussianBlur(blur_limit=0, sigma_limit=cfg.blur_sigma, p=cfg.blur))
    if cfg.jpeg > 0:
        steps.append(A.ImageCompression(compression_type="jpeg", quality_range=cfg.jpeg_quality, p=cfg.jpeg))
    if cfg.erase > 0:
        steps.append(A.Erasing(scale=cfg.erase_scale, ratio=(0.3, 3.3), fill="random_uniform", p=cfg.erase))
    return FaceTransform(steps, image_size, mean, std)


def build_eval_transform(image_size: int, mean: Sequence[float] = (0.5, 0.5, 0.5),
                         std: Sequence[float] = (0.5, 0.5, 0.5)) -> FaceTransform:
    """Evaluation transform: resize when needed and normalise, nothing random."""
    return FaceTransform([], image_size, mean, std)
