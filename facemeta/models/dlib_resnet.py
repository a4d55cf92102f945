"""dlib's ResNet face encoder in PyTorch (``dlib_resnet29``), and its weights converted from the installed package.

The prior of DESIGN.md: the network of dlib's ``dlib_face_recognition_resnet_model_v1.dat`` (29 convolutions,
150x150 RGB chip in, 128-d out; trained by dlib's author on about 3 million faces and released into the public
domain, CC0 1.0). The file ships in the ``face-recognition-models`` package (``pip install 'facemeta[prior]'``);
it is parsed by :mod:`facemeta.models.dlib_format` into a safetensors file under
``cache_root()/prior/`` on first use and never committed.

Architecture, as the file describes it: conv 7x7/2 (no padding) + affine + relu, max-pool 3x3/2; residual
stages of 32 (3 blocks), 64 (1 down + 3), 128 (1 down + 2), 256 (1 down + 2) and 256 (1 down) channels. A block
is conv 3x3 + affine + relu + conv 3x3 + affine, added to its input, then relu; a down block's first conv has
stride 2 and no padding and its shortcut is a 2x2/2 average pool of the input. dlib adds tensors of different
shapes by zero-padding the smaller one (channels, and rows/columns at the bottom and right): the shortcut's
missing channels are zeros, and where the strided conv's map is one row and column smaller than the pooled
shortcut's (8 -> 3 vs 4) the conv's output is padded. Then a global average pool and a 128-d linear layer
without bias. ``affine`` is dlib's inference form of batch norm (a per-channel scale and shift, no running
statistics), which is also why the port needs no BatchNorm policy in meta-learning's inner steps.

Registered with timm, so ``timm.create_model("dlib_resnet29")`` and ``model.backbone: dlib_resnet29`` work like
any other backbone; the embedding head that matches it is ``head: linear`` (global average pool + linear,
no bias), which holds dlib's 128-d projection when the prior's weights are loaded.
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

PRIOR_NAME = "dlib_resnet29"
PRIOR_FILE = "dlib_face_recognition_resnet_model_v1.dat"
PRIOR_PACKAGE = "face_recognition_models"
PRIOR_CHIP_SIZE = 150
PRIOR_EMBEDDING_SIZE = 128
# dlib's input layer subtracts these channel means (R, G, B, in 0-255 units) and divides by 256; in facemeta's
# terms (pixels scaled to [0, 1], then (x - mean) / std):
PRIOR_MEAN = (122.782 / 255.0, 117.001 / 255.0, 104.298 / 255.0)
PRIOR_STD = (256.0 / 255.0,) * 3
INSTALL_HINT = "pip install 'facemeta[prior]' (brings face-recognition-models)"
CONVERTER_VERSION = 2  # in the cached file's name: bump when the conversion changes (2: affines folded)

# (channels, blocks, first block down-samples) per stage, from the input upwards.
STAGES = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))


class Affine(nn.Module):
    """dlib's ``affine_`` layer: y = gamma * x + beta per channel (batch norm folded, no running statistics)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev``: the sum of two maps, the smaller zero-padded (channels, bottom rows, right columns)."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return pad(a) + pad(b)


class DlibBlock(nn.Module):
    """One residual block (``ares`` / ``ares_down`` in dlib's example network)."""

    def __init__(self, in_channels: int, channels: int, down: bool):
        super().__init__()
        stride, pad = (2, 0) if down else (1, 1)
        self.down = down
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=pad)
        self.affine1 = Affine(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1)
        self.affine2 = Affine(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(add_zero_padded(y, shortcut))


class DlibResNet29(nn.Module):
    """The encoder's trunk in timm's shape: ``forward_features`` -> [B, 256, h, w] (2x2 at 150 px),
    ``forward_head`` -> pooled features, or logits when ``num_classes`` > 0 (a plain linear classifier)."""

    def __init__(self, num_classes: int = 0, global_pool: str = "avg", in_chans: int = 3, **_: object):
        super().__init__()
        if in_chans != 3:
            raise ValueError("dlib_resnet29 takes RGB input (in_chans=3)")
        self.num_features = self.head_hidden_size = STAGES[-1][0]
        self.global_pool = global_pool
        self.stem_conv = nn.Conv2d(3, 32, 7, stride=2, padding=0)
        self.stem_affine = Affine(32)
        blocks, prev = [], 32
        for channels, count, down in STAGES:
            for i in range(count):
                blocks.append(DlibBlock(prev, channels, down and i == 0))
                prev = channels
        self.blocks = nn.Sequential(*blocks)
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes, bias=False) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.stem_affine(self.stem_conv(x))), 3, 2)
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool:
            x = x.mean(dim=(2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def dlib_resnet29(pretrained: bool = False, **kwargs) -> DlibResNet29:
    """dlib's ResNet face encoder trunk (timm entry); ``pretrained=True`` loads the prior converted from the
    installed package (:func:`prior_weights_path`), its 128-d projection too when ``num_classes=128``."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    model = DlibResNet29(**kwargs)
    if pretrained:
        state = load_prior_state()
        if not model.num_classes:
            state.pop("fc.weight", None)
        elif model.num_classes != PRIOR_EMBEDDING_SIZE:
            raise ValueError(f"the prior's projection has {PRIOR_EMBEDDING_SIZE} outputs, not {model.num_classes}")
        model.load_state_dict(state, strict=True)
    return model


# ---------------------------------------------------------------- conversion from dlib's file
def find_prior_file() -> Path:
    """Where the installed ``face-recognition-models`` keeps dlib's encoder (without importing the package,
    whose ``__init__`` needs setuptools' pkg_resources); a CheckpointError saying what to install if absent."""
    spec = importlib.util.find_spec(PRIOR_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / "models" / PRIOR_FILE
        if path.is_file():
            return path
    raise CheckpointError(f"the face prior needs dlib's encoder ({PRIOR_FILE}), which is not installed: {INSTALL_HINT}")


def network_to_state_dict(network) -> dict[str, torch.Tensor]:
    """Map a parsed :class:`~facemeta.models.dlib_format.DlibNetwork` onto :class:`DlibResNet29`'s state dict.

    The network must be exactly dlib's encoder: layer counts, every convolution's stride and padding, and every
    tensor's shape are checked against :class:`DlibResNet29`; a different network is a DlibFormatError naming
    where it differs.
    """
    from facemeta.models.dlib_format import DlibFormatError

    layers = network.layers
    convs = [x for x in layers if x.kind == "con_4"]
    affines = [x for x in layers if x.kind == "affine_"]
    fcs = [x for x in layers if x.kind == "fc_2"]
    expected_convs = 1 + 2 * sum(count for _, count, _ in STAGES)
    if len(convs) != expected_convs or len(affines) != expected_convs or len(fcs) != 1:
        raise DlibFormatError(f"network has {len(convs)} convolutions, {len(affines)} affine and {len(fcs)} "
                              f"fully connected layers; dlib's encoder has {expected_convs}, {expected_convs} and 1")
    if (network.chip_rows, network.chip_cols) != (PRIOR_CHIP_SIZE, PRIOR_CHIP_SIZE):
        raise DlibFormatError(f"input chip {network.chip_rows}x{network.chip_cols}, expected 150x150")
    target = DlibResNet29(num_classes=PRIOR_EMBEDDING_SIZE)
    keys = [("stem_conv", "stem_affine")] + [(f"blocks.{b}.conv{i}", f"blocks.{b}.affine{i}")
                                              for b in range(len(target.blocks)) for i in (1, 2)]
    state: dict[str, torch.Tensor] = {}
    for (conv_key, affine_key), conv, affine in zip(keys, convs, affines, strict=True):
        module = target.get_submodule(conv_key)
        stored = (conv.settings["stride_y"], conv.settings["stride_x"], conv.settings["pad_y"], conv.settings["pad_x"])
        if stored != (*module.stride, *module.padding):
            raise DlibFormatError(f"layer {conv_key}: stride and padding {stored} in the file, dlib's encoder has "
                                  f"{(*module.stride, *module.padding)}")
        # Fold each affine into the convolution before it: gamma * (W x + b) + beta = (gamma W) x + (gamma b + beta),
        # leaving the affine at identity (still a trainable per-channel scale and shift). The same function, but
        # dlib's batch norm left the convolutions' weights tiny (|w| ~ 4e-4 under scales gamma up to 23): trained
        # as stored, an SGD step moves the output gamma^2 times further than the folded form, and fine-tuning
        # at any usable learning rate wrecked the prior.
        gamma = np.asarray(affine.arrays["gamma"], dtype=np.float64)
        weight = conv.arrays["weight"] * gamma[:, None, None, None]
        bias = conv.arrays["bias"] * gamma + affine.arrays["beta"]
        state[f"{conv_key}.weight"] = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
        state[f"{conv_key}.bias"] = torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))
        state[f"{affine_key}.weight"] = torch.ones(len(gamma))
        state[f"{affine_key}.bias"] = torch.zeros(len(gamma))
    state["fc.weight"] = torch.from_numpy(np.ascontiguousarray(fcs[0].arrays["weight"].T))
    for key, value in target.state_dict().items():
        if key not in state or tuple(state[key].shape) != tuple(value.shape):
            got = tuple(state[key].shape) if key in state else "nothing"
            raise DlibFormatError(f"layer {key}: file gives {got}, dlib's encoder needs {tuple(value.shape)}")
    return state


def convert_prior(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Parse dlib's ``.dat`` at `src` and write the port's weights to `dst` (safetensors, written atomically)."""
    from safetensors.torch import save

    from facemeta.atomic import atomic_write
    from facemeta.models.dlib_format import parse_network

    src = Path(src)
    try:
        data = src.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read dlib model {src}: {exc.strerror or exc}") from exc
    state = network_to_state_dict(parse_network(data, name=str(src)))
    blob = save(state, metadata={"source": src.name, "sha256": hashlib.sha256(data).hexdigest(),
                                 "license": "CC0 1.0 (dlib's face recognition model, public domain)"})
    with atomic_write(dst, "wb") as fh:
        fh.write(blob)
    return Path(dst)


def prior_weights_path(cache: str | os.PathLike | None = None) -> Path:
    """The port's weights in the cache (``<cache>/prior/dlib_resnet29-v<converter>-<sha of the .dat>.safetensors``),
    converted from the installed package on first use."""
    from facemeta.models.prior_cache import converted_weights

    return converted_weights(find_prior_file(), PRIOR_NAME, CONVERTER_VERSION, convert_prior, cache)


def load_prior_state(cache: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The prior's state dict for :class:`DlibResNet29` (trunk + ``fc.weight``), converting on first use."""
    from safetensors.torch import load_file

    return load_file(str(prior_weights_path(cache)))
