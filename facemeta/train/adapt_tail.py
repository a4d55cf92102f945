"""The network `facemeta adapt` fine-tunes, split into a frozen front and a trainable tail (facemeta.train.adapt):
the tail is the last residual blocks of dlib_resnet29, or the last depthwise-separable pairs of SFace
(facemeta.models.sface: 13 pairs, the last two its 1024-channel 7x7 stage), and the embedding head; any other
backbone, or no blocks, gives the embedding head alone. The front runs once over the faces (cached features);
front then tail is the whole network's raw embedding.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facemeta.errors import ConfigError


def _trunk_kind(trunk: nn.Module) -> str | None:
    """"dlib" (dlib_resnet29: stem_conv/stem_affine, residual blocks), "sface" (SFace's stem and depthwise-separable
    blocks, facemeta.models.sface) or None: a trunk the tail cannot split (its embedding head only)."""
    if not isinstance(getattr(trunk, "blocks", None), nn.Sequential):
        return None
    if hasattr(trunk, "stem_conv"):
        return "dlib"
    from facemeta.models.sface import SFaceNet

    return "sface" if isinstance(trunk, SFaceNet) else None


class Tail(nn.Module):
    """The trainable end of a FaceEmbeddingModel: its last `blocks` (dlib_resnet29's residual blocks, or SFace's
    depthwise-separable pairs) and its embedding head; its parameters ARE the model's (shared tensors), so
    training the tail trains the model. ``forward(features)`` takes what :meth:`front` returns and gives the raw
    (unnormalised) embedding."""

    def __init__(self, model: nn.Module, blocks: int):
        super().__init__()
        trunk = model.backbone
        self.head_kind = model.config.head
        self.kind = _trunk_kind(trunk)
        has_blocks = self.kind == "dlib" or (self.kind == "sface" and blocks > 0)
        if blocks and not has_blocks:
            raise ConfigError(f"tail_blocks > 0 needs the dlib_resnet29 or the sface backbone; "
                              f"{model.config.backbone} adapts its embedding head only (tail_blocks 0)")
        self.split = len(trunk.blocks) - min(blocks, len(trunk.blocks)) if has_blocks else None
        self.blocks = nn.Sequential(*list(trunk.blocks)[self.split:]) if has_blocks else nn.Sequential()
        self.fc = model.fc
        self.bn2 = getattr(model, "bn2", None)
        self.features = getattr(model, "features", None)
        self._model = [model]  # not a submodule: its parameters stay out of this module's

    @torch.no_grad()
    def front(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen front of the network on normalised images [B,3,S,S] -> the tail's input."""
        model = self._model[0]
        if self.split is None:
            return model.feature_map(x)
        trunk = model.backbone
        if self.kind == "sface":
            return trunk.blocks[:self.split](trunk.stem(x))
        x = F.max_pool2d(F.relu(trunk.stem_affine(trunk.stem_conv(x))), 3, 2)
        return trunk.blocks[:self.split](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        if self.head_kind == "linear":
            return self.fc(x.mean(dim=(2, 3)))
        return self.features(self.fc(torch.flatten(self.bn2(x), 1)))


def front_features(tail: Tail, faces: np.ndarray, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen front over aligned faces and their mirror images -> (features, mirrored features)."""
    from facemeta.models.backbone import preprocess

    model = tail._model[0]
    model.eval()
    out, flipped = [], []
    with torch.inference_mode():
        for i in range(0, len(faces), batch):
            x = preprocess(faces[i:i + batch], model.config)
            out.append(tail.front(x))
            flipped.append(tail.front(torch.flip(x, dims=[3])))
    return torch.cat(out).clone(), torch.cat(flipped).clone()
