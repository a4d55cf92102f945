"""ONNX export of a FaceEmbeddingModel, its JSON contract, and an ONNX Runtime twin of ``backbone.embed``.

The graph is the embedding network only: input ``input`` float32 [N, 3, S, S] (RGB, pixels / 255, then
(x - mean) / std, as :func:`facemeta.models.backbone.preprocess` gives), output ``embedding`` float32 [N, E],
L2-normalised; the batch axis is dynamic. Flip test-time augmentation is NOT in the graph: it is part of the
contract (``flip_tta``), and :class:`OnnxEmbeddingModel` runs the mirrored batch too and renormalises the
sum, exactly as ``backbone.embed(..., flip=True)`` does. Detection and alignment stay outside.

The contract (``OUT.json`` beside ``OUT.onnx``) says everything a consumer needs to feed the graph and read
its output: input name and shape, image size, mean/std, channel order, pixel scale, flip TTA, the aligned chip
(``align_size``, ``align_chip``), embedding size, calibrated ``threshold``/``threshold_far``, the source
checkpoint's fingerprint, the opset, the facemeta version, and the sha256[:16] of the .onnx file it describes
(so a swapped or damaged graph is caught before it is run). Version 2 binds its numbers too: ``numbers_sha256``
covers the input (size, mean, std, order), output, flip TTA, aligned chip, thresholds and checkpoint
fingerprint, so an edited number is refused like an edited graph. Every number is range-checked before
anything is allocated from it, and the graph's own input and output shapes must be the contract's. This
module knows models and files, not faces: the caller (facemeta.embedder) supplies the fingerprint, the settings and the faces of the parity check.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from facemeta.atomic import atomic_write
from facemeta.errors import CheckpointError, one_line

if TYPE_CHECKING:  # torch loads only to export: running a graph (OnnxEmbeddingModel) needs none
    import torch

    from facemeta.models.backbone import FaceEmbeddingModel, ModelConfig

CONTRACT_FORMAT = "facemeta-onnx"
CONTRACT_VERSION = 2  # 2: numbers_sha256 binds the preprocessing numbers (version 1 contracts still load)
MAX_IMAGE_SIZE = 1024  # input side of any face model (a 100000 side would ask for 30 GB per face)
MAX_EMBEDDING = 65536
MEAN_RANGE, STD_RANGE = (-1.0, 2.0), (0.01, 10.0)  # in units of pixel / 255: inputs stay within a few hundred
MAX_CONTRACT_BYTES = 1 << 20
_BOUND = ("input", "output", "image_size", "embedding_size", "flip_tta", "align_size", "align_chip", "threshold",
          "threshold_far")
INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
DEFAULT_OPSET = 18
MIN_OPSET = 17  # torch's exporter targets 18 and converts down; older opsets lose ops the backbones use
MAX_OPSET = 23
PARITY_MIN_COSINE = 0.9999
INSTALL_HINT = "pip install 'facemeta[onnx]'"


def contract_path(onnx_path: str | os.PathLike) -> Path:
    """The JSON contract that goes with an .onnx file: same name, .json suffix."""
    return Path(onnx_path).with_suffix(".json")


def sha16(data: bytes) -> str:
    """First 16 hex digits of the sha256 of some bytes (the .onnx file's fingerprint in its contract)."""
    return hashlib.sha256(data).hexdigest()[:16]


def require_onnxruntime():
    """Import onnxruntime, or a one-line CheckpointError naming the extra that brings it."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise CheckpointError(f"the ONNX runtime needs onnxruntime, which is not installed: {INSTALL_HINT}") \
            from exc
    return onnxruntime


def default_threads() -> int:
    """ONNX Runtime's intra-op threads: torch's setting when torch is loaded (both runtimes alike), else
    $OMP_NUM_THREADS, else every core."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return max(1, int(torch.get_num_threads()))
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return max(1, os.cpu_count() or 1)


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
    the checkpoint's fingerprint), canonical JSON: written as ``numbers_sha256`` (contract version 2)."""
    bound = {k: contract.get(k) for k in _BOUND}
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


def check_opset(opset: int) -> int:
    """The opset if facemeta can export to it (17..23), else a one-line CheckpointError."""
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise CheckpointError(f"opset must be an integer in {MIN_OPSET}..{MAX_OPSET}, got {opset!r}")
    return opset


def export_graph(model: FaceEmbeddingModel, opset: int = DEFAULT_OPSET) -> bytes:
    """The model's forward pass (normalised images -> unit embeddings) as serialised ONNX, batch axis dynamic."""
    try:
        import onnx  # noqa: F401  (torch's exporter needs it, and onnxscript)
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise CheckpointError(f"ONNX export needs onnx and onnxscript, which are not installed: {INSTALL_HINT}") \
            from exc
    import torch

    check_opset(opset)
    size = model.config.image_size
    was_training = model.training
    model.eval()
    try:
        example = torch.zeros(2, 3, size, size, device=next(model.parameters()).device)
        program = torch.onnx.export(
            model, (example,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset, dynamo=True, verbose=False,
            external_data=False)
        return program.model_proto.SerializeToString()
    except CheckpointError:
        raise
    except Exception as exc:  # the exporter raises many types (torch.export, onnxscript, onnx)
        raise CheckpointError(f"cannot export {model.config.backbone} to ONNX: {one_line(exc)}") from exc
    finally:
        model.train(was_training)


def build_contract(config: ModelConfig, settings: dict[str, Any], fingerprint: str, opset: int, flip: bool,
                   checkpoint: str = "") -> dict[str, Any]:
    """The contract of a graph exported from a checkpoint: how to feed it, what it returns, where it came from.

    `settings` are the checkpoint's checked inference settings (facemeta.embedder.check_model_meta):
    align_size, align_chip, threshold, threshold_far. `flip` says whether the threshold assumes flip TTA."""
    from facemeta.version import __version__

    s = config.image_size
    return {
        "format": CONTRACT_FORMAT, "version": CONTRACT_VERSION, "facemeta_version": __version__, "opset": opset,
        "input": {"name": INPUT_NAME, "shape": ["N", 3, s, s], "dtype": "float32", "layout": "NCHW",
                  "channel_order": "RGB", "pixel_scale": "x / 255", "mean": list(config.mean),
                  "std": list(config.std), "normalise": "(x / 255 - mean) / std per channel"},
        "output": {"name": OUTPUT_NAME, "shape": ["N", config.embedding_size], "dtype": "float32",
                   "l2_normalised": True},
        "image_size": s, "embedding_size": config.embedding_size,
        "flip_tta": bool(flip),
        "flip_tta_how": "run the batch and its horizontal mirror (last axis reversed); embedding = "
                        "L2-normalise(output + mirrored output)",
        "align_size": settings["align_size"], "align_chip": settings["align_chip"],
        "resize": "aligned chips of another size than image_size are resized (area when shrinking, linear "
                  "when enlarging) before normalising",
        "threshold": settings.get("threshold"), "threshold_far": settings.get("threshold_far"),
        "similarity": "cosine (dot product of the unit embeddings); same person when >= threshold",
        "checkpoint": {"fingerprint": fingerprint, "file": checkpoint, "backbone": config.backbone},
    }


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
        inp = doc["input"]
        config = Preprocessing(embedding_size=doc["embedding_size"], image_size=doc["image_size"],
                               mean=tuple(inp["mean"]), std=tuple(inp["std"]))
        ok = (inp["name"] and doc["output"]["name"] and isinstance(doc["flip_tta"], bool)
              and isinstance(doc["checkpoint"]["fingerprint"], str) and isinstance(doc["onnx_sha256"], str)
              and inp.get("channel_order", "RGB") == "RGB" and all(math.isfinite(v) for v in config.mean))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: incomplete or out-of-range ONNX contract ({one_line(exc)})") from exc
    if not ok:
        raise CheckpointError(f"{path}: incomplete ONNX contract")
    if doc["version"] >= 2 and doc.get("numbers_sha256") != numbers_digest(doc):
        raise CheckpointError(f"{path}: its numbers (input size, mean, std, thresholds...) are not those it was "
                              "exported with (numbers_sha256 does not match): export it again")
    return doc


def contract_config(contract: dict[str, Any]) -> ModelConfig:
    """The preprocessing settings of a contract as a ModelConfig (image size, mean, std, embedding size)."""
    from facemeta.models.backbone import ModelConfig

    return ModelConfig(embedding_size=contract["embedding_size"], image_size=contract["image_size"],
                       mean=tuple(contract["input"]["mean"]), std=tuple(contract["input"]["std"]))


class OnnxEmbeddingModel:
    """An exported embedding network run by ONNX Runtime on the CPU: ``embed`` as :func:`backbone.embed`.

    path: the .onnx file, with its contract beside it. fingerprint: when given, the checkpoint fingerprint the
    contract must name (a graph of another model is a CheckpointError). threads: intra-op threads (default
    :func:`default_threads`: torch's when it is loaded, so both runtimes share one setting).
    """

    def __init__(self, path: str | os.PathLike, fingerprint: str | None = None, threads: int | None = None,
                 config: dict[str, Any] | None = None):
        ort = require_onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"ONNX file not found: {self.path}")
        self.contract = read_contract(self.path)
        named = self.contract["checkpoint"]["fingerprint"]
        if fingerprint is not None and named != fingerprint:
            raise CheckpointError(f"{self.path.name} was exported from another model (checkpoint fingerprint "
                                  f"{named}, this model's is {fingerprint}); export this one with `facemeta export`")
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"cannot read {self.path}: {one_line(exc)}") from exc
        if sha16(data) != self.contract["onnx_sha256"]:
            raise CheckpointError(f"{self.path.name} is not the graph its contract describes (sha256 "
                                  f"{sha16(data)}, contract says {self.contract['onnx_sha256']}); "
                                  "the file was changed or damaged: export it again")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(threads or default_threads()))
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # errors only: no warnings about unused initialisers on stderr
        # threads sleep between calls instead of spinning: 2 threads on a busy 2-core machine took 13.9 ms of CPU
        # per face spinning, 10.7 ms not (benchmarks/results/cli_speed.md)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's InvalidProtobuf, Fail, InvalidGraph...
            raise CheckpointError(f"ONNX Runtime cannot load {self.path}: {one_line(exc)}") from exc
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        want_in, want_out = self.contract["input"]["name"], self.contract["output"]["name"]
        if [i.name for i in inputs] != [want_in] or want_out not in [o.name for o in outputs]:
            raise CheckpointError(f"{self.path.name} has inputs {[i.name for i in inputs]} and outputs "
                                  f"{[o.name for o in outputs]}; its contract names {want_in!r} -> {want_out!r}")
        self.config = Preprocessing(self.contract["embedding_size"], self.contract["image_size"],
                                    tuple(self.contract["input"]["mean"]), tuple(self.contract["input"]["std"]))
        self._check_shapes(inputs[0].shape, next(o.shape for o in outputs if o.name == want_out), config)
        self.fingerprint = named

    def _check_shapes(self, shape_in: list, shape_out: list, config: dict[str, Any] | None) -> None:
        """The graph's own input [N,3,S,S] and output [N,E] (where they are fixed), and the checkpoint's config
        when the caller gives it, must say what the contract says: a contract that lies is refused here."""
        c = self.config
        said = {"input": [3, c.image_size, c.image_size], "output": [c.embedding_size]}
        for what, shape, want in (("input", shape_in, said["input"]), ("output", shape_out, said["output"])):
            fixed = list(shape[1:]) if isinstance(shape, list | tuple) else []
            if len(fixed) != len(want) or any(isinstance(a, int) and a != b for a, b in zip(fixed, want, strict=True)):
                raise CheckpointError(f"{self.path.name}: the graph's {what} is {list(shape)}, its contract says "
                                      f"[N, {', '.join(map(str, want))}]: export it again")
        if config:
            mine = {"image_size": c.image_size, "embedding_size": c.embedding_size, "mean": c.mean, "std": c.std}
            for key, value in mine.items():
                theirs = config.get(key)
                if theirs is not None and (tuple(theirs) if isinstance(theirs, list) else theirs) != value:
                    raise CheckpointError(f"{self.path.name}: its contract says {key} {value}, the checkpoint "
                                          f"{theirs}: export it again")

    @property
    def embedding_size(self) -> int:
        """Length of the embedding vectors."""
        return int(self.contract["embedding_size"])

    def run(self, x: np.ndarray) -> np.ndarray:
        """One pass of the graph: normalised float32 [N,3,S,S] -> unit embeddings [N,E]."""
        name = self.contract["input"]["name"]
        return self.session.run([self.contract["output"]["name"]], {name: np.ascontiguousarray(x, np.float32)})[0]

    def embed(self, faces: np.ndarray | list[np.ndarray] | torch.Tensor, batch_size: int = 64,
              flip: bool = False) -> np.ndarray:
        """uint8 RGB faces (or a normalised float tensor/array [N,3,S,S]) -> float32 [N,E] unit vectors, in
        batches; `flip` adds the mirror's embedding and renormalises, as backbone.embed does."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        torch = sys.modules.get("torch")  # a tensor can only come from a process that loaded torch
        if torch is not None and isinstance(faces, torch.Tensor):
            x_all = faces.detach().cpu().float().numpy()
        elif isinstance(faces, np.ndarray) and faces.dtype == np.float32 and faces.ndim == 4 \
                and faces.shape[1] == 3:
            x_all = faces
        else:
            x_all = self.config.preprocess(faces)
        if x_all.ndim != 4 or x_all.shape[1] != 3:
            raise ValueError(f"expected an array [N,3,S,S], got {tuple(x_all.shape)}")
        out = []
        for i in range(0, x_all.shape[0], batch_size):
            x = x_all[i:i + batch_size]
            e = self.run(x)
            if flip:
                e = e + self.run(x[:, :, :, ::-1])
                e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
            out.append(e.astype(np.float32, copy=False))
        if not out:
            return np.zeros((0, self.embedding_size), np.float32)
        return np.concatenate(out)


def _is_contract(path: Path) -> bool:
    """Whether an existing file reads as a facemeta ONNX contract (which an export may replace)."""
    try:
        with open(path, "rb") as fh:
            doc = json.loads(fh.read(MAX_CONTRACT_BYTES).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and doc.get("format") == CONTRACT_FORMAT


def export_onnx(model: FaceEmbeddingModel, out: str | os.PathLike, contract: dict[str, Any],
                check_faces: np.ndarray | torch.Tensor, opset: int = DEFAULT_OPSET,
                min_cosine: float = PARITY_MIN_COSINE) -> dict[str, Any]:
    """Export `model` to `out` (.onnx) with `contract` beside it (.json), after checking ONNX Runtime against
    torch on `check_faces` (uint8 RGB aligned faces, or a normalised tensor) with the contract's flip TTA.

    Nothing is written when the check fails (a one-line CheckpointError with the worst cosine); both files are
    written atomically, graph first. Returns the contract as written (with ``onnx_sha256`` and ``parity``)."""
    import tempfile

    from facemeta.models.backbone import embed

    out = Path(out)
    if out.suffix != ".onnx":
        raise CheckpointError(f"the ONNX file must end in .onnx, got {out}")
    side = contract_path(out)
    if side.exists() and not _is_contract(side):  # e.g. m.onnx beside m.safetensors: m.json is its config
        raise CheckpointError(f"cannot write {out}: its contract would replace {side}, which is not an ONNX "
                              "contract (a checkpoint's settings?); give the .onnx file another name")
    graph = export_graph(model, opset)
    doc = {**contract, "version": CONTRACT_VERSION, "opset": opset, "onnx_sha256": sha16(graph)}
    doc["numbers_sha256"] = numbers_digest(doc)
    with tempfile.TemporaryDirectory(prefix="facemeta-onnx-") as tmp:  # the runtime reads the graph from a file
        probe = Path(tmp) / "check.onnx"
        probe.write_bytes(graph)
        contract_path(probe).write_text(json.dumps(doc), encoding="utf-8")
        runtime = OnnxEmbeddingModel(probe)
        flip = bool(doc["flip_tta"])
        ours = runtime.embed(check_faces, batch_size=8, flip=flip)
        theirs = embed(model, check_faces, batch_size=8, flip=flip)
    if len(ours) == 0:
        raise CheckpointError("the ONNX parity check needs at least one face")
    cos = (ours * theirs).sum(axis=1)
    worst = float(cos.min())
    if not worst >= min_cosine:  # also catches NaN
        raise CheckpointError(f"ONNX Runtime disagrees with torch on {int((cos < min_cosine).sum())} of {len(cos)} "
                              f"check faces (worst cosine {worst:.6f} < {min_cosine}); nothing written")
    doc["parity"] = {**dict(doc.get("parity") or {}), "faces": int(len(cos)), "min_cosine": round(worst, 8),
                     "required": min_cosine}
    try:
        with atomic_write(out, "wb") as fh:
            fh.write(graph)
        try:
            with atomic_write(contract_path(out)) as fh:
                fh.write(json.dumps(doc, indent=2) + "\n")
        except BaseException:
            out.unlink(missing_ok=True)  # a graph without its contract is refused anyway: leave nothing
            raise
    except OSError as exc:
        raise CheckpointError(f"cannot write {out}: {one_line(exc)}") from exc
    return doc
