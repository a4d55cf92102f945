"""Face embedding models: timm backbone + insightface embedding head, and safetensors checkpoints."""

from facemeta.models.backbone import FaceEmbeddingModel, ModelConfig, build_model, embed, preprocess
from facemeta.models.checkpoint import load_checkpoint, read_checkpoint_info, save_checkpoint, update_meta

__all__ = ["FaceEmbeddingModel", "ModelConfig", "build_model", "embed", "preprocess",
           "load_checkpoint", "read_checkpoint_info", "save_checkpoint", "update_meta"]
