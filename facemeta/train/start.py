"""Where a run starts: its model config, its starting weights, the parameters it keeps fixed, and the
class weights of its margin head (random, or the identities' mean embeddings under the starting weights)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facemeta.data.manifest import ManifestRow
from facemeta.errors import ConfigError
from facemeta.train.config import TrainConfig


def model_config(cfg: TrainConfig):
    """The ModelConfig of a run: its model section, with the backbone's own normalisation where none is given."""
    from facemeta.models.backbone import ModelConfig, default_normalisation

    mean, std = default_normalisation(cfg.model.backbone)
    return ModelConfig(backbone=cfg.model.backbone, embedding_size=cfg.model.embedding_size,
                       image_size=cfg.model.image_size, dropout=cfg.model.dropout, head=cfg.model.head,
                       mean=tuple(cfg.model.mean or mean), std=tuple(cfg.model.std or std))


def pretrained_file(cfg: TrainConfig) -> str | None:
    """The weights a run starts from: model.pretrained_path, or with model.pretrained the backbone's installed
    weights (the prior for dlib_resnet29, SFace for sface, converted into the cache on first use); None for random
    weights."""
    from facemeta.models.backbone import installed_weights

    if cfg.model.pretrained_path:
        _refuse_ensemble(cfg.model.pretrained_path)
        return cfg.model.pretrained_path
    if not cfg.model.pretrained:
        return None
    path = installed_weights(cfg.model.backbone, cfg.data.cache)
    if path is None:
        raise ConfigError(f"model.pretrained: no installed weights for '{cfg.model.backbone}' (facemeta never "
                          "downloads); use backbone dlib_resnet29 or sface, or give model.pretrained_path")
    return str(path)


def _refuse_ensemble(path: str) -> None:
    """A one-line ConfigError when `path` is an ensemble checkpoint (facemeta.models.ensemble): a run trains one
    model, so it cannot start from several."""
    from facemeta.errors import CheckpointError
    from facemeta.models.checkpoint import read_checkpoint_info

    if not str(path).endswith(".safetensors"):
        return
    try:
        config = read_checkpoint_info(path).get("config") or {}
    except CheckpointError:  # not a facemeta checkpoint: read as plain weights
        return
    if config.get("kind") == "ensemble":
        raise ConfigError(f"model.pretrained_path {path} is an ensemble of {len(config.get('members') or ())} models; "
                          "a run trains one: start each member from its own weights (model.pretrained: true with "
                          "its backbone) and join them with tools/make_ensemble.py, or distil the ensemble into "
                          "one student (distill.teacher)")


def freeze(model: nn.Module, prefixes: list[str]) -> int:
    """Keep the parameters whose names start with one of `prefixes` fixed; returns how many were frozen.
    A prefix that names no parameter is a ConfigError (a typo would otherwise train everything)."""
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(n.startswith(prefix) for n in names):
            raise ConfigError(f"model.frozen: no parameter name starts with '{prefix}' (e.g. {names[0]})")
    count = 0
    for name, p in model.named_parameters():
        if any(name.startswith(prefix) for prefix in prefixes):
            p.requires_grad_(False)
            count += 1
    return count


def class_prototypes(model: nn.Module, rows: list[ManifestRow], identity_to_label: dict[str, int],
                     device: torch.device, chunk: int = 256, cache_key: str | None = None,
                     cache: str | None = None) -> torch.Tensor:
    """Normalised mean embedding of each identity's training faces under `model` (no augmentation) -> [C, E].

    With `cache_key` (naming the starting weights file: runs of every method and seed from the same weights on
    the same data share it), the result is kept in ``cache_root()/prototypes/``."""
    from facemeta.images import load_image
    from facemeta.models.backbone import embed
    from facemeta.paths import cache_root

    rows = list({(r.path, r.identity): r for r in rows}.values())  # a styled domain repeats its set's faces
    path = None
    if cache_key:
        text = "\n".join([cache_key, json.dumps(model.config.to_dict(), sort_keys=True),
                          *(f"{r.path}\t{identity_to_label[r.identity]}" for r in rows)])
        path = cache_root(cache) / "prototypes" / f"{hashlib.sha1(text.encode('utf-8')).hexdigest()[:20]}.npy"
        if path.is_file():
            return torch.from_numpy(np.load(path, allow_pickle=False))
    sums = torch.zeros(len(identity_to_label), model.config.embedding_size)
    model.to(device)
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        vectors = torch.from_numpy(embed(model, [load_image(r.path) for r in part], channels_last=False))
        labels = torch.tensor([identity_to_label[r.identity] for r in part])
        sums.index_add_(0, labels, vectors)
    prototypes = F.normalize(sums, dim=1)
    if path is not None:
        from facemeta.atomic import atomic_write

        with atomic_write(path, "wb") as fh:
            np.save(fh, prototypes.numpy(), allow_pickle=False)
    return prototypes


def weights_file_key(path: str) -> str:
    """Name, size and modification time of a weights file: enough to tell two starting points apart."""
    st = Path(path).stat()
    return f"{Path(path).name}:{st.st_size}:{st.st_mtime_ns}"


def init_class_weights(head: nn.Module, prototypes: torch.Tensor) -> int:
    """Copy `prototypes` [C, E] into every class-weight matrix of that shape in `head`; returns how many."""
    count = 0
    with torch.no_grad():
        for module in head.modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter) and tuple(weight.shape) == tuple(prototypes.shape):
                weight.copy_(prototypes.to(weight.device, weight.dtype))
                count += 1
    if not count:
        raise ConfigError("loss.init: prototypes found no class-weight matrix of the training classes' shape")
    return count
