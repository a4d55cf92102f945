"""The JSON contract of an exported ONNX graph (``OUT.json`` beside ``OUT.onnx``): written, read and checked here.

A contract says everything a consumer needs to feed the graph and read its output: input name and shape, image
size, mean/std, channel order, pixel scale, flip TTA, the aligned chip (``align_size``, ``align_chip``),
embedding size, calibrated ``threshold``/``threshold_far``, the source checkpoint's fingerprint, the opset, the
facemeta version, and the sha256[:16] of the .onnx file it describes (so a swapped or damaged graph is caught
before it is run). Version 2 binds its numbers too: ``numbers_sha256`` covers the input (size, mean, std,
order), output, flip TTA, aligned chip, thresholds and checkpoint fingerprint, so an edited number is refused
like an edited graph. Every number is range-checked before anything is allocated from it.

Two kinds. A single model (versions 1 and 2, unchanged: written at version 2, so an older facemeta reads it):
one input ``input``. An ensemble (facemeta.models.ensemble; version 3, ``"kind": "ensemble"``): one input per
member (``input_0``, ``input_1``...), each on that member's own chip, size and normalisation, described in
``members`` (with the member's weight, its ``scale`` = sqrt(weight / sum of weights) and its ``offset`` in the
output); the output ``embedding`` is the ensemble's unit vector, the members' scaled unit vectors concatenated,
so ``embedding[:, offset:offset + embedding_size] / scale`` is member i's own. Flip TTA for an ensemble is per
member, as torch computes it: L2-normalise each member's slice of (output + mirrored output), scale, concatenate,
L2-normalise. An older facemeta refuses a version 3 contract as newer than itself, in one line.

Torch-free: the ONNX Runtime path (facemeta.models.onnx_export.OnnxEmbeddingModel) reads contracts with numpy
alone; building one takes a model's config (the caller's torch objects, read but not imported here).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from facemeta.errors import CheckpointError, one_line

if TYPE_CHECKING:
    from facemeta.models.backbone import ModelConfig

CONTRACT_FORMAT = "facemeta-onnx"
SINGLE_VERSION = 2  # what a single model's contract is written at (2: numbers_sha256 binds the numbers; 1 loads)
ENSEMBLE_VERSION = 3  # 3: "kind": "ensemble", one input per member
CONTRACT_VERSION = 3  # the newest this facemeta reads
ENSEMBLE = "ensemble"
MAX_MEMBERS = 16
MAX_IMAGE_SIZE = 1024  # input side of any face model (a 100000 side would ask for 30 GB per face)
MAX_EMBEDDING = 65536
MEAN_RANGE, STD_RANGE = (-1.0, 2.0), (0.01, 10.0)  # in units of pixel / 255: inputs stay within a few hundred
MAX_CONTRACT_BYTES = 1 << 20
_BOUND = ("input", "output", "image_size", "embedding_size", "flip_tta", "align_size", "align_chip", "threshold",
          "threshold_far")
_BOUND_ENSEMBLE = ("kind", "members", "output", "embedding_size", "flip_tta", "threshold", "threshold_far")
INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
FLIP_HOW = ("run the batch and its horizontal mirror (last axis reversed); embedding = "
            "L2-normalise(output + mirrored output)")
FLIP_HOW_ENSEMBLE = ("run every input and its horizontal mirror (last axis reversed); per member: L2-normalise its "
                     "slice of (output + mirrored output), times its scale; embedding = L2-normalise(the members' "
                     "parts concatenated in order)")
RESIZE = ("aligned chips of another size than image_size are resized (area when shrinking, linear when "
          "enlarging) before normalising")
SIMILARITY = "cosine (dot product of the unit embeddings); same person when >= threshold"


def contract_path(onnx_path: str | os.PathLike) -> Path:
    """The JSON contract that goes with an .onnx file: same name, .json suffix."""
    return Path(onnx_path).with_suffix(".json")


def sha16(data: bytes) -> str:
    """First 16 hex digits of the sha256 of some bytes (the .onnx file's fingerprint in its contract)."""
    return hashlib.sha256(data).hexdigest()[:16]


def _numbers(values: Any, what: str, bounds: tuple[float, float]) -> tuple[float, ...]:
    """Three finite RGB numbers within ``bounds`` (ValueError otherwise): a contract's mean or std."""
    if not isinstance(values, list | tuple) or len(values) != 3:
        raise ValueError(f"{what} needs three values (RGB), got {values!r}"[:200])
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in values):
        raise ValueError(f"{what} values must be numbers, got {values!r}"[:200])
    out = tuple(float(v) for v in values)
    lo, hi = bounds
    if not all(math.isfinite(v) and lo <= v <= hi for v in out):
        raise ValueError(f"{what} values must be finite and in [{lo:g}, {hi:g}] (pixel / 255 units), got {values!r}"
                         [:200])
    return out


def numbers_digest(contract: dict[str, Any]) -> str:
    """sha256[:16] of the numbers a contract's consumer trusts (input, output, sizes, flip TTA, chip, thresholds,
    the checkpoint's fingerprint; an ensemble's members), canonical JSON: written as ``numbers_sha256``."""
    keys = _BOUND_ENSEMBLE if contract.get("kind") == ENSEMBLE else _BOUND
    bound = {k: contract.get(k) for k in keys}
    bound["checkpoint"] = (contract.get("checkpoint") or {}).get("fingerprint")
    return sha16(json.dumps(bound, sort_keys=True, separators=(",", ":")).encode())


@dataclass(frozen=True)
class Preprocessing:
    """What a graph's contract says about its input and output, checked as ModelConfig checks them (without
    torch): aligned chips -> the graph's input, as :func:`facemeta.models.backbone.preprocess` makes it."""

    embedding_size: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        for key in ("embedding_size", "image_size"):
            if isinstance(getattr(self, key), bool) or not isinstance(getattr(self, key), int):
                raise ValueError(f"{key} must be an integer, got {getattr(self, key)!r}")
        if not 16 <= self.image_size <= MAX_IMAGE_SIZE or not 1 <= self.embedding_size <= MAX_EMBEDDING:
            raise ValueError(f"image_size must be in 16..{MAX_IMAGE_SIZE} and embedding_size in 1..{MAX_EMBEDDING}, "
                             f"got {self.image_size} and {self.embedding_size}")
        object.__setattr__(self, "mean", _numbers(self.mean, "mean", MEAN_RANGE))
        object.__setattr__(self, "std", _numbers(self.std, "std", STD_RANGE))

    def preprocess(self, faces: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """uint8 RGB faces [B,H,W,3] (or a list of HxWx3 / HxW arrays) -> float32 [B,3,S,S]: backbone.preprocess
        in numpy (same resize, same float32 arithmetic, so the same numbers)."""
        from facemeta.models.face_batch import face_batch

        batch = face_batch(faces, self.image_size)
        x = batch.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
        mean = np.asarray(self.mean, np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(1, 3, 1, 1)
        return np.ascontiguousarray((x - mean) / std)


@dataclass(frozen=True)
class GraphInput:
    """One input of an exported graph as its contract describes it: name, preprocessing, the aligned chip it
    reads, and (an ensemble's member) its scale and offset in the output; a single model: scale 1, offset 0."""

    name: str
    preprocessing: Preprocessing
    align_chip: Any
    align_size: Any
    scale: float = 1.0
    offset: int = 0

    @property
    def width(self) -> slice:
        """The columns of the output this input's member fills."""
        return slice(self.offset, self.offset + self.preprocessing.embedding_size)


def _input_doc(name: str, config: ModelConfig) -> dict[str, Any]:
    """How to feed one input of the graph: name, shape, dtype, layout, channel order, pixel scale, mean, std."""
    s = config.image_size
    return {"name": name, "shape": ["N", 3, s, s], "dtype": "float32", "layout": "NCHW",
            "channel_order": "RGB", "pixel_scale": "x / 255", "mean": list(config.mean),
            "std": list(config.std), "normalise": "(x / 255 - mean) / std per channel"}


def build_contract(config: ModelConfig, settings: dict[str, Any], fingerprint: str, opset: int, flip: bool,
                   checkpoint: str = "") -> dict[str, Any]:
    """The contract of a graph exported from a single model's checkpoint: how to feed it, what it returns, where
    it came from.

    `settings` are the checkpoint's checked inference settings (facemeta.embedder.check_model_meta):
    align_size, align_chip, threshold, threshold_far. `flip` says whether the threshold assumes flip TTA."""
    from facemeta.version import __version__

    s = config.image_size
    return {
        "format": CONTRACT_FORMAT, "version": SINGLE_VERSION, "facemeta_version": __version__, "opset": opset,
        "input": _input_doc(INPUT_NAME, config),
        "output": {"name": OUTPUT_NAME, "shape": ["N", config.embedding_size], "dtype": "float32",
                   "l2_normalised": True},
        "image_size": s, "embedding_size": config.embedding_size,
        "flip_tta": bool(flip),
        "flip_tta_how": FLIP_HOW,
        "align_size": settings["align_size"], "align_chip": settings["align_chip"],
        "resize": RESIZE,
        "threshold": settings.get("threshold"), "threshold_far": settings.get("threshold_far"),
        "similarity": SIMILARITY,
        "checkpoint": {"fingerprint": fingerprint, "file": checkpoint, "backbone": config.backbone},
    }


def build_ensemble_contract(model: Any, settings: dict[str, Any], fingerprint: str, opset: int, flip: bool,
                            checkpoint: str = "") -> dict[str, Any]:
    """The contract of a graph exported from an ensemble (facemeta.models.ensemble.EnsembleModel: ``members``,
    ``specs`` with chip, align_size and weight, ``scales``): one input per member, ``input_<i>``, each with its
    chip, size, normalisation, weight, scale and offset in the output. `settings`: the checkpoint's threshold and
    threshold_far (check_model_meta)."""
    from facemeta.version import __version__

    members, offset = [], 0
    for i, (member, spec, scale) in enumerate(zip(model.members, model.specs, model.scales, strict=True)):
        c = member.config
        members.append({"input": _input_doc(f"{INPUT_NAME}_{i}", c), "image_size": c.image_size,
                        "embedding_size": c.embedding_size, "align_size": int(spec.align_size),
                        "align_chip": spec.chip, "weight": float(spec.weight), "scale": float(scale),
                        "offset": offset, "backbone": c.backbone})
        offset += c.embedding_size
    return {
        "format": CONTRACT_FORMAT, "version": ENSEMBLE_VERSION, "facemeta_version": __version__, "opset": opset,
        "kind": ENSEMBLE,
        "members": members,
        "output": {"name": OUTPUT_NAME, "shape": ["N", offset], "dtype": "float32", "l2_normalised": True},
        "embedding_size": offset,
        "combine": "member i's unit vector times its scale (sqrt(weight / sum of weights)), concatenated in input "
                   "order: output[:, offset:offset + embedding_size] / scale is member i's unit vector",
        "flip_tta": bool(flip),
        "flip_tta_how": FLIP_HOW_ENSEMBLE,
        "align": "each face is warped from the same five landmarks onto every member's chip (align_chip, "
                 "align_size) and fed to that member's input",
        "resize": RESIZE,
        "threshold": settings.get("threshold"), "threshold_far": settings.get("threshold_far"),
        "similarity": SIMILARITY,
        "checkpoint": {"fingerprint": fingerprint, "file": checkpoint, "kind": ENSEMBLE,
                       "backbones": [m["backbone"] for m in members]},
    }


def model_contract(model: Any, settings: dict[str, Any], fingerprint: str, opset: int, flip: bool,
                   checkpoint: str = "") -> dict[str, Any]:
    """:func:`build_ensemble_contract` for an ensemble (a model with ``chips``), else :func:`build_contract`."""
    if hasattr(model, "chips"):
        return build_ensemble_contract(model, settings, fingerprint, opset, flip, checkpoint)
    return build_contract(model.config, settings, fingerprint, opset, flip, checkpoint)


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 200:
        raise ValueError(f"an input or output name must be a short string, got {value!r}"[:200])
    return value


def _ensemble_inputs(doc: dict[str, Any]) -> list[GraphInput]:
    """The members of an ensemble contract, checked (ValueError/KeyError/TypeError otherwise)."""
    members = doc["members"]
    if not isinstance(members, list) or not 2 <= len(members) <= MAX_MEMBERS:
        raise ValueError(f"an ensemble needs 2..{MAX_MEMBERS} members")
    weights = []
    for m in members:
        w = m["weight"]
        if isinstance(w, bool) or not isinstance(w, int | float) or not (math.isfinite(w) and 0 < w <= 1e6):
            raise ValueError(f"a member's weight must be a positive number, got {w!r}"[:200])
        weights.append(float(w))
    out, offset = [], 0
    for i, (m, w) in enumerate(zip(members, weights, strict=True)):
        inp = m["input"]
        pre = Preprocessing(embedding_size=m["embedding_size"], image_size=m["image_size"],
                            mean=tuple(inp["mean"]), std=tuple(inp["std"]))
        size = m["align_size"]
        if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= MAX_IMAGE_SIZE:
            raise ValueError(f"member {i}: align_size must be an integer in 16..{MAX_IMAGE_SIZE}, got {size!r}"[:200])
        scale = math.sqrt(w / sum(weights))
        if not isinstance(m["scale"], int | float) or abs(m["scale"] - scale) > 1e-6:
            raise ValueError(f"member {i}: scale {m['scale']!r} is not sqrt(weight / sum of weights) = {scale:.6f}")
        if m["offset"] != offset or inp.get("channel_order", "RGB") != "RGB":
            raise ValueError(f"member {i}: offset must be {offset} and channel_order RGB")
        out.append(GraphInput(_name(inp["name"]), pre, _name(m["align_chip"]), size, scale, offset))
        offset += pre.embedding_size
    if len({g.name for g in out}) != len(out) or offset != doc["embedding_size"]:
        raise ValueError(f"members need distinct input names and embedding sizes summing to embedding_size "
                         f"({offset} != {doc['embedding_size']!r})"[:200])
    return out


def graph_inputs(doc: dict[str, Any]) -> list[GraphInput]:
    """The inputs a (read) contract describes, in the graph's order: one for a single model, one per member for
    an ensemble. ValueError, KeyError or TypeError for a contract that does not hold together."""
    if doc.get("kind", None) is not None and doc.get("kind") != ENSEMBLE:
        raise ValueError(f"unknown kind {doc.get('kind')!r}"[:200])
    if doc.get("kind") == ENSEMBLE:
        if doc["version"] < ENSEMBLE_VERSION:
            raise ValueError(f"an ensemble's contract is version {ENSEMBLE_VERSION}")
        return _ensemble_inputs(doc)
    inp = doc["input"]
    pre = Preprocessing(embedding_size=doc["embedding_size"], image_size=doc["image_size"],
                        mean=tuple(inp["mean"]), std=tuple(inp["std"]))
    return [GraphInput(inp["name"], pre, doc.get("align_chip"), doc.get("align_size"))]


def read_contract(onnx_path: str | os.PathLike) -> dict[str, Any]:
    """The checked contract beside an .onnx file; a missing, corrupt or foreign one is a one-line CheckpointError."""
    path = contract_path(onnx_path)
    if not path.is_file():
        raise CheckpointError(f"{Path(onnx_path).name} has no contract {path.name} beside it "
                              "(export with `facemeta export MODEL --onnx OUT.onnx`)")
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONTRACT_BYTES + 1)
        if len(data) > MAX_CONTRACT_BYTES:
            raise CheckpointError(f"ONNX contract {path} is over {MAX_CONTRACT_BYTES} bytes; it is not a contract")
        doc = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise CheckpointError(f"ONNX contract {path} is not valid JSON: nested too deep") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"ONNX contract {path} is not valid JSON: {one_line(exc)}") from exc
    if not isinstance(doc, dict) or doc.get("format") != CONTRACT_FORMAT:
        raise CheckpointError(f"{path} is not a facemeta ONNX contract")
    if not isinstance(doc.get("version"), int) or doc["version"] > CONTRACT_VERSION:
        raise CheckpointError(f"{path}: contract version {doc.get('version')!r} is newer than this facemeta "
                              f"({CONTRACT_VERSION})")
    try:
        inputs = graph_inputs(doc)
        single = doc.get("kind") != ENSEMBLE
        ok = (all(g.name for g in inputs) and doc["output"]["name"] and isinstance(doc["flip_tta"], bool)
              and (not single or doc["input"].get("channel_order", "RGB") == "RGB")
              and isinstance(doc["checkpoint"]["fingerprint"], str) and isinstance(doc["onnx_sha256"], str)
              and all(math.isfinite(v) for g in inputs for v in g.preprocessing.mean))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: incomplete or out-of-range ONNX contract ({one_line(exc)})") from exc
    if not ok:
        raise CheckpointError(f"{path}: incomplete ONNX contract")
    if doc["version"] >= 2 and doc.get("numbers_sha256") != numbers_digest(doc):
        raise CheckpointError(f"{path}: its numbers (input size, mean, std, thresholds...) are not those it was "
                              "exported with (numbers_sha256 does not match): export it again")
    return doc


def contract_config(contract: dict[str, Any]) -> ModelConfig:
    """The preprocessing settings of a single model's contract as a ModelConfig (image size, mean, std, embedding
    size)."""
    from facemeta.models.backbone import ModelConfig

    return ModelConfig(embedding_size=contract["embedding_size"], image_size=contract["image_size"],
                       mean=tuple(contract["input"]["mean"]), std=tuple(contract["input"]["std"]))


def is_contract(path: Path) -> bool:
    """Whether an existing file reads as a facemeta ONNX contract (which an export may replace)."""
    try:
        with open(path, "rb") as fh:
            doc = json.loads(fh.read(MAX_CONTRACT_BYTES).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and doc.get("format") == CONTRACT_FORMAT
