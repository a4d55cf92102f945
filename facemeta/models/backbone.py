"""Face embedder: any timm backbone + insightface's embedding head, giving L2-normalised vectors.

The head follows insightface's iresnet (arcface_torch): the backbone's last feature map goes through
BatchNorm2d -> Dropout -> Flatten -> Linear -> BatchNorm1d. The flatten keeps the spatial layout
(insightface's "fc" over 7x7x512), so the Linear layer's size depends on the image size; the final
BatchNorm1d has its scale fixed at 1 (insightface freezes it) - here it is a buffer, not a frozen
parameter, so optimisers and functional (meta-learning) code see only trainable parameters.
Token backbones (ViT-like, output [B, N, C]) are read as a C x N x 1 map; NHWC backbones (timm's Swin)
are permuted to NCHW.

A second head, ``linear``, is a global average pool and a linear layer without bias: dlib's encoder (the prior,
``dlib_resnet29``) ends that way, so with its weights the model is the prior itself, zero-shot.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facemeta.errors import CheckpointError, ConfigError, one_line
from facemeta.models import dlib_resnet, sface  # register dlib_resnet29 and sface with timm

HEADS = ("insightface", "linear")


def default_normalisation(backbone: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) a backbone expects when none is given: dlib's for the prior's architecture, SFace's for
    ``sface``, 0.5 otherwise."""
    if backbone == dlib_resnet.PRIOR_NAME:
        return dlib_resnet.PRIOR_MEAN, dlib_resnet.PRIOR_STD
    if backbone == sface.SFACE_NAME:
        return sface.SFACE_MEAN, sface.SFACE_STD
    return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def installed_weights(backbone: str, cache: str | os.PathLike | None = None) -> Path | None:
    """The local weights ``pretrained: true`` means for `backbone` (converted into the cache on first use): dlib's
    encoder for ``dlib_resnet29``, SFace for ``sface``; None for any other backbone (facemeta never downloads)."""
    if backbone == dlib_resnet.PRIOR_NAME:
        return dlib_resnet.prior_weights_path(cache)
    if backbone == sface.SFACE_NAME:
        return sface.prior_weights_path(cache)
    return None


@dataclass
class ModelConfig:
    """What is needed to rebuild an embedder: backbone name, sizes and input normalisation."""

    backbone: str = "resnet18"
    embedding_size: int = 512
    image_size: int = 112
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    dropout: float = 0.0
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    head: str = "insightface"

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, not {self.head!r}")
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need three values (RGB)")
        if any(v <= 0 for v in self.std):
            raise ValueError("std values must be positive")
        if int(self.embedding_size) <= 0 or int(self.image_size) < 16:
            raise ValueError("embedding_size must be > 0 and image_size >= 16")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        self.embedding_size = int(self.embedding_size)
        self.image_size = int(self.image_size)
        self.dropout = float(self.dropout)
        self.backbone_kwargs = dict(self.backbone_kwargs or {})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a config of something else)."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)

    def architecture(self) -> tuple:
        """The fields that decide the weight shapes (compared when a checkpoint is loaded)."""
        return (self.backbone, self.embedding_size, self.image_size,
                tuple(sorted(self.backbone_kwargs.items())), self.head)


def _create_backbone(config: ModelConfig) -> tuple[nn.Module, str, tuple[int, int, int]]:
    """Build the timm trunk and probe its output: returns (module, layout, (C, H, W) of the head input).

    ViT-like models fix their input size at construction, so if a probe at the config's image size
    fails the model is rebuilt with ``img_size``.
    """
    import timm

    name, size = config.backbone, config.image_size
    kwargs = dict(pretrained=False, num_classes=0, global_pool="", **config.backbone_kwargs)
    try:
        trunk = timm.create_model(name, **kwargs)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise ConfigError(f"unknown timm backbone '{name}': {exc}") from exc
    try:
        out = _probe(trunk, size)
    except (AssertionError, RuntimeError, ValueError):
        if "img_size" in kwargs:
            raise
        try:
            trunk = timm.create_model(name, img_size=size, **kwargs)
        except TypeError as exc:
            raise ValueError(f"backbone '{name}' does not accept {size}x{size} inputs") from exc
        out = _probe(trunk, size)
    fmt = str(getattr(trunk, "output_fmt", "NCHW"))
    if out.ndim == 3:  # tokens [B, N, C]
        return trunk, "tokens", (out.shape[2], out.shape[1], 1)
    if out.ndim == 4 and fmt.upper() == "NHWC":
        return trunk, "nhwc", (out.shape[3], out.shape[1], out.shape[2])
    if out.ndim == 4:
        return trunk, "nchw", (out.shape[1], out.shape[2], out.shape[3])
    raise ValueError(f"backbone '{name}' returns features of shape {tuple(out.shape)}; "
                     "need a feature map [B,C,H,W] or tokens [B,N,C]")


@torch.no_grad()
def _probe(trunk: nn.Module, size: int) -> torch.Tensor:
    """One dummy forward (eval mode, so BatchNorm statistics are untouched)."""
    was_training = trunk.training
    trunk.eval()
    try:
        return trunk.forward_features(torch.zeros(1, 3, size, size))
    finally:
        trunk.train(was_training)


class FaceEmbeddingModel(nn.Module):
    """timm backbone + embedding head -> unit vectors [B, E].

    Head ``insightface``: BN2d, dropout, flatten, linear, BN1d. Head ``linear``: global average pool, dropout,
    linear without bias. `pretrained_path` loads backbone weights from a local file (.safetensors, or a torch
    file read with ``weights_only=True``); a classifier in that file is ignored, any other missing or
    mismatched key is a CheckpointError. With the ``linear`` head, an ``fc.weight`` of the head's shape in
    that file (the prior's 128-d projection) is loaded into the head too; with the ``insightface`` head, a
    complete head under ``head.`` in that file (SFace's, :mod:`facemeta.models.sface`) is, when its shapes fit.
    """

    def __init__(self, config: ModelConfig | None = None, pretrained_path: str | os.PathLike | None = None):
        super().__init__()
        self.config = config or ModelConfig()
        self.backbone, self.layout, (c, h, w) = _create_backbone(self.config)
        self.feature_shape = (c, h, w)
        e = self.config.embedding_size
        self.dropout = nn.Dropout(p=self.config.dropout)
        if self.config.head == "linear":
            self.fc = nn.Linear(c, e, bias=False)
        else:
            self.bn2 = nn.BatchNorm2d(c, eps=1e-5)
            self.fc = nn.Linear(c * h * w, e)
            self.features = nn.BatchNorm1d(e, eps=1e-5)
            # insightface fixes the last BN's scale at 1: keep it as a buffer so it is never trained.
            del self.features.weight
            self.features.register_buffer("weight", torch.ones(e))
        if pretrained_path is not None:
            state = load_backbone_weights(self.backbone, pretrained_path)
            projection = state.get("fc.weight")
            if self.config.head == "linear" and projection is not None \
                    and tuple(projection.shape) == tuple(self.fc.weight.shape):
                with torch.no_grad():
                    self.fc.weight.copy_(projection)
            self._load_prior_head(state)

    def _load_prior_head(self, state: dict[str, torch.Tensor]) -> None:
        """Load the head from a prior file's ``head.*`` keys when it holds all of this head's, shapes equal."""
        if self.config.head != "insightface":
            return
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}
        head = {k: state.get(sface.HEAD_PREFIX + k) for k in own}
        if all(v is not None and tuple(v.shape) == tuple(own[k].shape) for k, v in head.items()):
            self.load_state_dict(head, strict=False)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone output as an NCHW map (tokens become C x N x 1)."""
        f = self.backbone.forward_features(x)
        if self.layout == "tokens":
            return f.transpose(1, 2).unsqueeze(-1)
        if self.layout == "nhwc":
            return f.permute(0, 3, 1, 2)
        return f

    def forward_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding before L2 normalisation (what insightface's network, or dlib's, returns)."""
        if self.config.head == "linear":
            return self.fc(self.dropout(self.feature_map(x).mean(dim=(2, 3))))
        f = self.bn2(self.feature_map(x))
        f = self.dropout(f)
        f = torch.flatten(f, 1)
        return self.features(self.fc(f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] normalised -> L2-normalised embeddings [B, E]."""
        return F.normalize(self.forward_raw(x), dim=1)

    def preprocess(self, faces: np.ndarray | list[np.ndarray]) -> torch.Tensor:
        """uint8 RGB faces -> normalised float tensor at this model's image size and normalisation."""
        return preprocess(faces, self.config)


def build_model(config: ModelConfig | None = None, pretrained_path: str | os.PathLike | None = None
                ) -> FaceEmbeddingModel:
    """Build a FaceEmbeddingModel from a config (randomly initialised unless `pretrained_path`)."""
    return FaceEmbeddingModel(config or ModelConfig(), pretrained_path=pretrained_path)


# The installed priors by short name: backbone, the chip and size they read, their head.
PRIORS = {"prior": (dlib_resnet.PRIOR_NAME, "dlib", 150, "linear"), "sface": (sface.SFACE_NAME, "arcface", 112,
                                                                            "insightface")}


def build_prior(name: str) -> tuple[FaceEmbeddingModel, tuple[str, int]]:
    """dlib's encoder (``prior``) or SFace (``sface``), zero-shot from the installed package, in eval mode, with
    the (chip, side) it reads; a CheckpointError naming the install when the package is missing."""
    backbone, chip, size, head = PRIORS[name]
    mean, std = default_normalisation(backbone)
    config = ModelConfig(backbone=backbone, embedding_size=128, image_size=size, head=head, mean=mean, std=std)
    return build_model(config, pretrained_path=installed_weights(backbone)).eval(), (chip, size)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read tensors from a local weight file without unpickling arbitrary objects.

    .safetensors files are read with safetensors; anything else with ``torch.load(weights_only=True)``;
    a dict nested under "state_dict", "model" or "model_state_dict" is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors / pickle errors have many types
        raise CheckpointError(f"cannot read weights from {path}: {one_line(exc)}") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a dict of tensors")
    return state


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load trunk weights from a local file into `backbone`; drops a classifier, strips a 'backbone.' prefix.
    Returns everything the file held (so a caller can take a projection the trunk did not)."""
    state = read_state_dict(path)
    everything = dict(state)
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    own = backbone.state_dict()
    state = {k: v for k, v in state.items() if k in own}  # drops classifier / head keys
    problems = check_state_dict(own, state)
    if problems:
        raise CheckpointError(f"{path} does not fit backbone: {problems}")
    backbone.load_state_dict(state, strict=True)
    return everything


def check_state_dict(own: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> str:
    """Describe how `other` fails to match `own` (missing/unexpected keys, shape mismatches); '' if it fits."""
    missing = [k for k in own if k not in other]
    unexpected = [k for k in other if k not in own]
    shapes = [f"{k} {tuple(other[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in other and tuple(other[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
    return "; ".join(parts)



def preprocess(faces: np.ndarray | list[np.ndarray], config: ModelConfig | None = None) -> torch.Tensor:
    """uint8 RGB faces [B,H,W,3] (or a list of HxWx3 / HxW arrays) -> float tensor [B,3,S,S].

    Faces whose size differs from ``config.image_size`` are resized (area when shrinking, linear
    when enlarging); pixels are scaled to [0, 1] and normalised with the config's mean/std.
    """
    from facemeta.models.face_batch import face_batch

    config = config or ModelConfig()
    batch = face_batch(faces, config.image_size)
    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _set_memory_format(model: nn.Module, fmt: torch.memory_format) -> None:
    """Convert the model's 4-D weights to `fmt` unless they already are (a no-op on repeated calls)."""
    conv = next((p for p in model.parameters() if p.dim() == 4), None)
    if conv is not None and not conv.is_contiguous(memory_format=fmt):
        model.to(memory_format=fmt)


def embed(model: FaceEmbeddingModel, faces: np.ndarray | list[np.ndarray] | torch.Tensor,
          batch_size: int = 64, flip: bool = False, channels_last: bool = True) -> np.ndarray:
    """Embed faces in batches under inference mode -> float32 [N, E] unit vectors.

    `faces` are uint8 RGB (see :func:`preprocess`) or an already normalised float tensor [N,3,S,S].
    With `flip`, each embedding is the renormalised sum of the face's and its mirror's embeddings
    (insightface's test-time augmentation). `channels_last` puts the model's weights (in place) and the
    inputs in NHWC memory layout, often faster for convolutions; False puts them back in NCHW. Values
    agree to float rounding (different kernels).
    The model is put in eval mode for the call and its previous mode restored.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    x_all = faces if isinstance(faces, torch.Tensor) else preprocess(faces, model.config)
    if x_all.ndim != 4 or x_all.shape[1] != 3:
        raise ValueError(f"expected a tensor [N,3,S,S], got {tuple(x_all.shape)}")
    device = _model_device(model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    _set_memory_format(model, fmt)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for i in range(0, x_all.shape[0], batch_size):
                x = x_all[i:i + batch_size].to(device).contiguous(memory_format=fmt)
                e = model(x)
                if flip:
                    e = F.normalize(e + model(torch.flip(x, dims=[3]).contiguous(memory_format=fmt)), dim=1)
                out.append(e.float().cpu())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, model.config.embedding_size), np.float32)
    return torch.cat(out).numpy().astype(np.float32, copy=False)
