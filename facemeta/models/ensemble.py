"""Ensembles: several face embedders used as one model (issue 29, part 2), e.g. dlib's prior and SFace.

Each member is a :class:`~facemeta.models.backbone.FaceEmbeddingModel` with the chip it reads (``arcface`` or
``dlib``, at its own size): the embedder warps every face once per member from the same five landmarks, each
member embeds its own chip, and the ensemble's vector is the concatenation of the members' unit vectors, member
i scaled by sqrt(w_i / sum w), so it is a unit vector again and the cosine of two faces is the weighted mean of
the members' cosines (equal weights by default; weights can be chosen on source data).

One checkpoint (:func:`save_ensemble`): one safetensors file holding every member's tensors under
``members.<i>.`` and the JSON document of facemeta's checkpoints whose config is
``{"kind": "ensemble", "members": [{"config", "chip", "align_size", "weight"[, "prior"]}, ...]}``; so it has one
fingerprint (the file's sha256, as galleries record) and one calibrated threshold in its meta. A loader that
knows only single models refuses it in one line (its config has unknown keys). :func:`load_model` loads
either kind.

Referenced members: a member whose tensors are exactly an installed prior's (dlib's encoder or SFace, converted
from their packages' files by facemeta.models.backbone.installed_weights) is stored as a reference, not as
tensors: its entry's ``prior`` names the converted file (``<backbone>-v<converter>-<sha16 of the package's
file>``), so the file never redistributes weights facemeta did not train, the fingerprint still pins the exact
source file, and loading rebuilds the member from the installed package (a one-line error naming the install
when it is missing or holds another file). A member that was trained or adapted is stored in full.

What the embedder does with an ensemble (``model.chips`` present): warp each face onto every ``(chip, size)`` of
``model.chips`` from the landmarks it found (``model.chip_batches([(image, landmarks), ...], warp_face)``), and
call ``model.embed(crops_per_member, flip=...)``; nothing else of the model differs (``embedding_size``, ``eval``,
``to``). This module imports no alignment code.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facemeta.errors import CheckpointError, one_line
from facemeta.models.backbone import FaceEmbeddingModel, ModelConfig, check_state_dict, embed
from facemeta.models.checkpoint import FORMAT, META_KEY, VERSION, load_checkpoint, read_checkpoint_info

KIND = "ensemble"
CHIP_NAMES = ("arcface", "dlib")  # facemeta.align.warp.CHIPS (not imported: models sit below align)


@dataclass(frozen=True)
class Member:
    """How one member reads faces: its chip, the chip's side in pixels, and its weight in the combination."""

    chip: str
    align_size: int
    weight: float = 1.0
    prior: str | None = None  # the installed prior's converted file (stem) this member's tensors equal, if any

    def __post_init__(self) -> None:
        if self.chip not in CHIP_NAMES:
            raise ValueError(f"chip must be one of {', '.join(CHIP_NAMES)}, not {self.chip!r}")
        if not 16 <= int(self.align_size) <= 1024:
            raise ValueError(f"align_size must be in 16..1024, not {self.align_size}")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"a member's weight must be positive, not {self.weight}")


class EnsembleModel(nn.Module):
    """Members' unit vectors, each scaled by sqrt(w_i / sum w) and concatenated: a unit vector [B, sum E_i]."""

    def __init__(self, members: Sequence[FaceEmbeddingModel], specs: Sequence[Member]):
        super().__init__()
        if len(members) < 2 or len(members) != len(specs):
            raise ValueError(f"an ensemble needs at least two members, each with its chip ({len(members)} models, "
                             f"{len(specs)} specs)")
        self.members = nn.ModuleList(members)
        self.specs = list(specs)
        total = sum(s.weight for s in self.specs)
        self.scales = [math.sqrt(s.weight / total) for s in self.specs]

    @property
    def chips(self) -> list[tuple[str, int]]:
        """(chip, side in pixels) each member reads, in member order."""
        return [(s.chip, int(s.align_size)) for s in self.specs]

    @property
    def embedding_size(self) -> int:
        """Length of the combined vector (the sum of the members')."""
        return sum(m.config.embedding_size for m in self.members)

    def config_dict(self) -> dict[str, Any]:
        """The checkpoint's config: kind and, per member, its model config, chip, chip size and weight."""
        entries = []
        for m, s in zip(self.members, self.specs, strict=True):
            entry = {"config": m.config.to_dict(), "chip": s.chip, "align_size": int(s.align_size),
                     "weight": float(s.weight)}
            if s.prior:
                entry["prior"] = s.prior
            entries.append(entry)
        return {"kind": KIND, "members": entries}

    def combine(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Members' unit vectors [B, E_i] -> the ensemble's [B, sum E_i] (a unit vector when each part is)."""
        return torch.cat([p * s for p, s in zip(parts, self.scales, strict=True)], dim=1)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """One normalised input tensor per member (its own chip, its own normalisation) -> unit vectors."""
        if len(inputs) != len(self.members):
            raise ValueError(f"the ensemble takes {len(self.members)} inputs (one per member), got {len(inputs)}")
        return F.normalize(self.combine([m(x) for m, x in zip(self.members, inputs, strict=True)]), dim=1)

    def chip_batches(self, faces: Sequence[tuple[np.ndarray, np.ndarray]], warp) -> list[np.ndarray]:
        """(RGB image, its 5 landmarks) per face -> one uint8 batch per member, each face warped onto that member's
        chip by `warp` (facemeta.align.warp.warp_face, passed in: models sit below align)."""
        return [np.stack([warp(image, points, size, chip) for image, points in faces]) for chip, size in self.chips]

    def embed(self, crops: Sequence[np.ndarray | list[np.ndarray]], flip: bool = True, batch_size: int = 64,
              channels_last: bool = True) -> np.ndarray:
        """Aligned uint8 RGB faces, one batch per member on that member's chip (the same faces in the same order)
        -> float32 unit vectors [N, sum E_i]; each member embeds as :func:`~facemeta.models.backbone.embed`."""
        if len(crops) != len(self.members):
            raise ValueError(f"the ensemble needs {len(self.members)} batches of crops (one per chip), got {len(crops)}")
        counts = {len(c) for c in crops}
        if len(counts) != 1:
            raise ValueError(f"every member needs the same faces; got batches of sizes {sorted(counts)}")
        parts = [torch.from_numpy(embed(m, c, batch_size=batch_size, flip=flip, channels_last=channels_last))
                 for m, c in zip(self.members, crops, strict=True)]
        return F.normalize(self.combine(parts), dim=1).numpy().astype(np.float32, copy=False)


def ensemble_of(models: Sequence[FaceEmbeddingModel], chips: Sequence[tuple[str, int]],
                weights: Sequence[float] | None = None) -> EnsembleModel:
    """An ensemble of `models`, member i reading chip ``chips[i] = (name, size)``; equal weights by default."""
    weights = list(weights) if weights is not None else [1.0] * len(models)
    if len(weights) != len(models) or len(chips) != len(models):
        raise ValueError("one chip and one weight per member")
    return EnsembleModel(list(models), [Member(c, int(s), float(w)) for (c, s), w in zip(chips, weights, strict=True)])


def ensemble_of_checkpoints(paths: Sequence[str | os.PathLike], weights: Sequence[float] | None = None
                            ) -> EnsembleModel:
    """An ensemble of facemeta checkpoints, each member reading the chip its checkpoint's meta names."""
    models, chips = [], []
    for path in paths:
        model, meta = load_checkpoint(path)
        models.append(model)
        chips.append((str(meta.get("align_chip", "arcface")), int(meta.get("align_size", 112))))
    return ensemble_of(models, chips, weights)


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix == ".json":
        return path.with_suffix(".safetensors"), path
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    return path, path.with_suffix(".json")


def prior_state(config: ModelConfig) -> tuple[str, dict[str, torch.Tensor]] | None:
    """(stem of the installed prior's converted file, the state of a model of `config` built from it) when
    `config`'s backbone has an installed prior (dlib's encoder, SFace); None otherwise or when it is not installed."""
    from facemeta.models.backbone import installed_weights

    try:
        path = installed_weights(config.backbone)
    except CheckpointError:  # the package is not installed: nothing to reference
        return None
    if path is None:
        return None
    return path.stem, FaceEmbeddingModel(config, pretrained_path=path).state_dict()


def _equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].detach().cpu(), b[k].detach().cpu()) for k in a)


def reference_priors(model: EnsembleModel) -> EnsembleModel:
    """Mark every member whose tensors equal its installed prior's, bit for bit, as a reference to it (their
    ``prior``; see the module's docstring); other members' marks are cleared. Returns `model`."""
    for i, member in enumerate(model.members):
        found = prior_state(member.config)
        same = found is not None and _equal_states(member.state_dict(), found[1])
        spec = model.specs[i]
        model.specs[i] = Member(spec.chip, spec.align_size, spec.weight, found[0] if same else None)
    return model


def save_ensemble(model: EnsembleModel, path: str | os.PathLike, meta: dict[str, Any] | None = None,
                  reference: bool = True, half: bool = False) -> Path:
    """Write the ensemble as one checkpoint (`path` .safetensors + .json sidecar, both atomic); returns the
    weights path. `meta` (JSON-ready) carries the calibrated ``threshold`` and ``threshold_far``. With
    `reference`, members equal to an installed prior are stored as references to it (:func:`reference_priors`),
    not as tensors; `half` stores the other members' floating tensors as float16 (loading casts them back)."""
    from safetensors.torch import save

    from facemeta.atomic import atomic_write

    if reference:
        reference_priors(model)
    else:
        model.specs = [Member(s.chip, s.align_size, s.weight) for s in model.specs]
    weights, sidecar = _paths(path)
    meta = {**dict(meta or {}), **({"weights_dtype": "float16"} if half else {})}
    doc = {"format": FORMAT, "version": VERSION, "config": model.config_dict(), "meta": meta}
    try:
        text = json.dumps(doc, indent=2, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"ensemble meta is not JSON-serialisable: {exc}") from exc
    skipped = tuple(f"members.{i}." for i, s in enumerate(model.specs) if s.prior)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()
               if not k.startswith(skipped)}
    if half:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    blob = save(tensors, metadata={META_KEY: text})
    with atomic_write(weights, "wb") as fh:
        fh.write(blob)
    with atomic_write(sidecar) as fh:
        fh.write(text + "\n")
    return weights


def is_ensemble(doc: dict[str, Any]) -> bool:
    """Whether a checkpoint document (:func:`~facemeta.models.checkpoint.read_checkpoint_info`) is an ensemble."""
    return isinstance(doc.get("config"), dict) and doc["config"].get("kind") == KIND


def load_ensemble(path: str | os.PathLike, map_location: str = "cpu") -> tuple[EnsembleModel, dict[str, Any]]:
    """Load an ensemble checkpoint -> (model in eval mode, meta); a one-line CheckpointError when the file is
    missing, corrupt, not an ensemble, or holds tensors that do not fit the members its config describes."""
    from safetensors.torch import load as load_bytes

    weights, _ = _paths(path)
    doc = read_checkpoint_info(weights)
    if not is_ensemble(doc):
        raise CheckpointError(f"{weights.name} is a single model, not an ensemble")
    try:
        entries = list(doc["config"]["members"])
        specs = [Member(str(e["chip"]), int(e["align_size"]), float(e.get("weight", 1.0)),
                        str(e["prior"]) if e.get("prior") else None) for e in entries]
        configs = [ModelConfig.from_dict(e["config"]) for e in entries]
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"bad ensemble config in {weights}: {one_line(exc)}") from exc
    from facemeta.models.backbone import installed_weights

    members = []
    for i, (spec, config) in enumerate(zip(specs, configs, strict=True)):
        try:
            if not spec.prior:
                members.append(FaceEmbeddingModel(config))
                continue
            # built from the installed package: it must be the very file the ensemble was made with
            try:
                source = installed_weights(config.backbone)
            except CheckpointError:
                source = None
            if source is None:
                raise CheckpointError(f"{weights.name} uses the installed {config.backbone} prior, which is not "
                                      "installed: pip install 'facemeta[prior]'")
            if source.stem != spec.prior:
                raise CheckpointError(f"{weights.name} was made with {spec.prior}, but the installed "
                                      f"{config.backbone} prior converts to {source.stem}: install the package "
                                      "version it was made with")
            members.append(FaceEmbeddingModel(config, pretrained_path=source))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"bad ensemble member {i} in {weights}: {one_line(exc)}") from exc
    model = EnsembleModel(members, specs)
    try:
        state = load_bytes(weights.read_bytes())
    except Exception as exc:  # safetensors errors have many types
        raise CheckpointError(f"corrupt checkpoint {weights}: {one_line(exc)}") from exc
    referenced = tuple(f"members.{i}." for i, s in enumerate(specs) if s.prior)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(referenced)}
    problems = check_state_dict(own, state)
    if problems:
        raise CheckpointError(f"ensemble {weights.name} does not match its members: {problems}")
    model.load_state_dict(state, strict=False)  # the referenced members' keys came from their packages
    model.to(torch.device(map_location)).eval()
    return model, dict(doc.get("meta") or {})


def load_model(path: str | os.PathLike, map_location: str = "cpu"
               ) -> tuple[FaceEmbeddingModel | EnsembleModel, dict[str, Any]]:
    """Load a checkpoint of either kind -> (model in eval mode, meta): what an embedder calls instead of
    :func:`~facemeta.models.checkpoint.load_checkpoint` to accept ensembles too."""
    if is_ensemble(read_checkpoint_info(path)):
        return load_ensemble(path, map_location)
    return load_checkpoint(path, map_location=map_location)
