"""Face embedding models: timm backbone + insightface embedding head, and safetensors checkpoints.

The names below load on first use, so importing a light submodule (checkpoint's JSON reader, the ONNX Runtime
model of onnx_export) does not import torch and timm through this package."""

from importlib import import_module

_WHERE = {"FaceEmbeddingModel": "backbone", "ModelConfig": "backbone", "build_model": "backbone",
          "embed": "backbone", "preprocess": "backbone", "load_checkpoint": "checkpoint",
          "read_checkpoint_info": "checkpoint", "save_checkpoint": "checkpoint", "update_meta": "checkpoint"}

__all__ = list(_WHERE)


def __getattr__(name: str):
    """Lazy package API: `facemeta.models.ModelConfig` imports facemeta.models.backbone then."""
    if name in _WHERE:
        return getattr(import_module(f"facemeta.models.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'facemeta.models' has no attribute {name!r}")
