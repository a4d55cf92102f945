"""facemeta.train: configs (YAML presets), the ERM trainer with exact resume, and DDP helpers."""

from facemeta.train.config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config"]
