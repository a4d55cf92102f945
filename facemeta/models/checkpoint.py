"""Checkpoints: weights as safetensors plus a JSON sidecar (config + meta), both written atomically.

Layout for ``model.safetensors``:
- ``model.safetensors``: the state dict; its header metadata holds the same JSON under the key
  ``facemeta`` so a lone .safetensors file still loads;
- ``model.json``: ``{"format": "facemeta-checkpoint", "version": 1, "config": {...}, "meta": {...}}``,
  meta being free-form (training data, method, metrics, calibrated ``threshold``/``threshold_far``...).

:func:`update_meta` rewrites only the JSON sidecar, so the weights file (whose hash identifies the
model, e.g. for galleries) does not change when a threshold is recalibrated; the sidecar wins over
the embedded copy for meta. Nothing is ever unpickled: safetensors only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from facemeta.atomic import atomic_write
from facemeta.errors import CheckpointError, ConfigError, one_line

if TYPE_CHECKING:  # reading a checkpoint's JSON (read_checkpoint_info) needs no torch; loading the model does
    from facemeta.models.backbone import FaceEmbeddingModel, ModelConfig

FORMAT = "facemeta-checkpoint"
VERSION = 1
META_KEY = "facemeta"


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, sidecar) for a path given as the .safetensors file, the .json file, or a bare stem."""
    path = Path(path)
    if path.suffix == ".json":
        return path.with_suffix(".safetensors"), path
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    return path, path.with_suffix(".json")


def save_checkpoint(model: FaceEmbeddingModel, path: str | os.PathLike, meta: dict[str, Any] | None = None,
                    half: bool = False) -> Path:
    """Write `path` (.safetensors) and its .json sidecar atomically; returns the weights path.

    `meta` must be JSON-serialisable (numbers, strings, lists, dicts). `half` stores the floating
    tensors as float16 (half the file; :func:`load_checkpoint` casts them back to the model's float32).
    """
    from safetensors.torch import save

    weights, sidecar = _paths(path)
    meta = {**dict(meta or {}), **({"weights_dtype": "float16"} if half else {})}
    doc = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict(), "meta": meta}
    try:
        text = json.dumps(doc, indent=2, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint meta is not JSON-serialisable: {exc}") from exc
    # clone: safetensors refuses tensors that share storage; contiguous: channels_last weights.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    if half:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    blob = save(tensors, metadata={META_KEY: text})
    with atomic_write(weights, "wb") as fh:
        fh.write(blob)
    with atomic_write(sidecar) as fh:
        fh.write(text + "\n")
    return weights


def read_checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """Return the checkpoint's JSON document (config + meta) without building the model.

    The sidecar is preferred; without one the copy in the safetensors header is used.
    """
    weights, sidecar = _paths(path)
    if not weights.is_file():
        raise CheckpointError(f"checkpoint not found: {weights}")
    embedded = _embedded_doc(weights)
    if sidecar.is_file():
        try:
            doc = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint config {sidecar} is not valid JSON: {one_line(exc)}") from exc
        if (embedded is not None and isinstance(doc, dict)
                and embedded.get("config") != doc.get("config")):
            raise CheckpointError(f"{sidecar.name} describes another model than {weights.name} "
                                  "(configs differ); keep the two files of one checkpoint together")
    elif embedded is not None:
        doc = embedded
    else:
        raise CheckpointError(f"{weights} has no facemeta config (no {sidecar.name} and none embedded)")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("config"), dict):
        raise CheckpointError(f"{sidecar if sidecar.is_file() else weights} is not a facemeta checkpoint config")
    if int(doc.get("version", 0)) > VERSION:
        raise CheckpointError(f"checkpoint version {doc.get('version')} is newer than this facemeta ({VERSION})")
    doc.setdefault("meta", {})
    return doc


def _embedded_doc(weights: Path) -> dict[str, Any] | None:
    """The JSON stored in the safetensors header, or None; a corrupt header is a CheckpointError."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="numpy") as fh:  # the header only: no torch
            text = (fh.metadata() or {}).get(META_KEY)
    except Exception as exc:  # SafetensorError, OSError...
        raise CheckpointError(f"corrupt checkpoint {weights}: {one_line(exc)}") from exc
    if text is None:
        return None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"corrupt config inside {weights}: {one_line(exc)}") from exc
    return doc if isinstance(doc, dict) else None


def _describe(c: ModelConfig) -> str:
    return f"{c.backbone} {c.embedding_size}-d {c.image_size}px"


def load_checkpoint(path: str | os.PathLike, expected: ModelConfig | None = None, map_location: str = "cpu"
                    ) -> tuple[FaceEmbeddingModel, dict[str, Any]]:
    """Load a checkpoint -> (model in eval mode, meta dict).

    Raises CheckpointError (one line) when the file is missing or corrupt, when its config differs
    from `expected` in architecture (backbone, embedding size, image size) or normalisation, or when
    the stored tensors do not fit the architecture the config describes.
    """
    import torch
    from safetensors.torch import load as load_bytes

    from facemeta.models.backbone import FaceEmbeddingModel, ModelConfig, check_state_dict

    weights, _ = _paths(path)
    doc = read_checkpoint_info(weights)
    try:
        config = ModelConfig.from_dict(doc["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"bad model config in checkpoint {weights}: {one_line(exc)}") from exc
    if expected is not None:
        if config.architecture() != expected.architecture():
            raise CheckpointError(f"checkpoint {weights.name} is {_describe(config)}, "
                                  f"expected {_describe(expected)}")
        if config.mean != expected.mean or config.std != expected.std:
            raise CheckpointError(f"checkpoint {weights.name} normalises with mean {config.mean} std "
                                  f"{config.std}, expected mean {expected.mean} std {expected.std}")
    try:
        state = load_bytes(weights.read_bytes())
    except Exception as exc:
        raise CheckpointError(f"corrupt checkpoint {weights}: {one_line(exc)}") from exc
    try:
        model = FaceEmbeddingModel(config)
    except (ConfigError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot build {_describe(config)} from {weights.name}: {one_line(exc)}") from exc
    problems = check_state_dict(model.state_dict(), state)
    if problems:
        raise CheckpointError(f"checkpoint {weights.name} does not match its architecture "
                              f"{_describe(config)}: {problems}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"cannot load {weights.name}: {one_line(exc)}") from exc
    model.to(torch.device(map_location)).eval()
    return model, dict(doc.get("meta") or {})


def update_meta(path: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into the checkpoint's meta (JSON sidecar only, atomically); returns the new meta."""
    weights, sidecar = _paths(path)
    doc = read_checkpoint_info(weights)
    doc["meta"] = {**(doc.get("meta") or {}), **fields}
    try:
        text = json.dumps(doc, indent=2, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint meta is not JSON-serialisable: {exc}") from exc
    with atomic_write(sidecar) as fh:
        fh.write(text + "\n")
    return doc["meta"]
