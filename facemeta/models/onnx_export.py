"""ONNX export of a face model (a single FaceEmbeddingModel or an ensemble) and an ONNX Runtime twin of its
``embed``.

The graph is the embedding network only: a single model's input ``input`` float32 [N, 3, S, S] (RGB, pixels /
255, then (x - mean) / std, as :func:`facemeta.models.backbone.preprocess` gives); an ensemble's (facemeta.models.
ensemble) one such input per member, ``input_0``, ``input_1``..., each at that member's size and normalisation,
fed the same faces warped onto that member's chip. Output ``embedding`` float32 [N, E], L2-normalised (an
ensemble's: the members' scaled unit vectors concatenated); the batch axis is dynamic. Flip test-time
augmentation is NOT in the graph: it is part of the contract (``flip_tta``), and :class:`OnnxEmbeddingModel`
runs the mirrored batch too and combines them exactly as ``backbone.embed(..., flip=True)`` (or the ensemble's
``embed``) does. Detection and alignment stay outside.

The contract beside the graph (``OUT.json``; written, read and checked by facemeta.models.onnx_contract, whose
names this module re-exports) says how to feed it and what it returns, names the checkpoint's fingerprint and
binds the graph's bytes and its numbers. The graph's own input and output shapes must be the contract's. This
module knows models and files, not faces: the caller (facemeta.embedder) supplies the fingerprint, the settings
and the faces of the parity check.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from facemeta.atomic import atomic_write
from facemeta.errors import CheckpointError, one_line
from facemeta.models.onnx_contract import (  # noqa: F401 - part of this module's API (callers import them here)
    CONTRACT_FORMAT,
    CONTRACT_VERSION,
    ENSEMBLE,
    ENSEMBLE_VERSION,
    INPUT_NAME,
    MAX_CONTRACT_BYTES,
    MAX_EMBEDDING,
    MAX_IMAGE_SIZE,
    MEAN_RANGE,
    OUTPUT_NAME,
    SINGLE_VERSION,
    STD_RANGE,
    GraphInput,
    Preprocessing,
    build_contract,
    build_ensemble_contract,
    contract_config,
    contract_path,
    graph_inputs,
    is_contract,
    model_contract,
    numbers_digest,
    read_contract,
    sha16,
)

if TYPE_CHECKING:  # torch loads only to export: running a graph (OnnxEmbeddingModel) needs none
    import torch

    from facemeta.models.backbone import FaceEmbeddingModel

DEFAULT_OPSET = 18
MIN_OPSET = 17  # torch's exporter targets 18 and converts down; older opsets lose ops the backbones use
MAX_OPSET = 23
PARITY_MIN_COSINE = 0.9999
INSTALL_HINT = "pip install 'facemeta[onnx]'"


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


def check_opset(opset: int) -> int:
    """The opset if facemeta can export to it (17..23), else a one-line CheckpointError."""
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise CheckpointError(f"opset must be an integer in {MIN_OPSET}..{MAX_OPSET}, got {opset!r}")
    return opset


def export_graph(model: FaceEmbeddingModel, opset: int = DEFAULT_OPSET) -> bytes:
    """The model's forward pass (normalised images -> unit embeddings) as serialised ONNX, batch axis dynamic. An
    ensemble (a model with ``chips``) takes one input per member, ``input_<i>``, at that member's image size."""
    try:
        import onnx  # noqa: F401  (torch's exporter needs it, and onnxscript)
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise CheckpointError(f"ONNX export needs onnx and onnxscript, which are not installed: {INSTALL_HINT}") \
            from exc
    import torch

    check_opset(opset)
    ensemble = hasattr(model, "chips")
    configs = [m.config for m in model.members] if ensemble else [model.config]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        examples = tuple(torch.zeros(2, 3, c.image_size, c.image_size, device=device) for c in configs)
        batch = torch.export.Dim("batch")
        if ensemble:  # forward(*inputs): the varargs are one argument holding a tuple, every input the same batch
            names = [f"{INPUT_NAME}_{i}" for i in range(len(configs))]
            dynamic = (tuple({0: batch} for _ in configs),)
        else:
            names, dynamic = [INPUT_NAME], ({0: batch},)
        with warnings.catch_warnings():  # the inputs' shared batch axis is one axis: torch says so for each
            warnings.filterwarnings("ignore", message="# The axis name: batch will not be used")
            program = torch.onnx.export(
                model, examples, None, input_names=names, output_names=[OUTPUT_NAME],
                dynamic_shapes=dynamic, opset_version=opset, dynamo=True, verbose=False,
                external_data=False)
        return program.model_proto.SerializeToString()
    except CheckpointError:
        raise
    except Exception as exc:  # the exporter raises many types (torch.export, onnxscript, onnx)
        what = "an ensemble of " + " and ".join(c.backbone for c in configs) if ensemble else configs[0].backbone
        raise CheckpointError(f"cannot export {what} to ONNX: {one_line(exc)}") from exc
    finally:
        model.train(was_training)


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
        self.inputs: list[GraphInput] = graph_inputs(self.contract)  # one per member of an ensemble
        want_in, want_out = [g.name for g in self.inputs], self.contract["output"]["name"]
        if [i.name for i in inputs] != want_in or want_out not in [o.name for o in outputs]:
            said = want_in if self.ensemble else want_in[0]
            raise CheckpointError(f"{self.path.name} has inputs {[i.name for i in inputs]} and outputs "
                                  f"{[o.name for o in outputs]}; its contract names {said!r} -> {want_out!r}")
        self.config = self.inputs[0].preprocessing  # a single model's (an ensemble's first member's)
        self._check_shapes([i.shape for i in inputs], next(o.shape for o in outputs if o.name == want_out), config)
        self.fingerprint = named

    @property
    def ensemble(self) -> bool:
        """Whether the graph is an ensemble's (one input per member, facemeta.models.ensemble)."""
        return self.contract.get("kind") == ENSEMBLE

    @property
    def chips(self) -> list[tuple[Any, Any]]:
        """(align_chip, align_size) the faces of each input are warped onto, in input order."""
        return [(g.align_chip, g.align_size) for g in self.inputs]

    def _check_shapes(self, shapes_in: list, shape_out: list, config: dict[str, Any] | None) -> None:
        """The graph's own inputs [N,3,S,S] and output [N,E] (where they are fixed), and the checkpoint's config
        when the caller gives it, must say what the contract says: a contract that lies is refused here."""
        checks = [("output", shape_out, [self.embedding_size])]
        for k, (g, shape) in enumerate(zip(self.inputs, shapes_in, strict=True)):
            size = g.preprocessing.image_size
            checks.insert(k, (f"input {g.name!r}" if self.ensemble else "input", shape, [3, size, size]))
        for what, shape, want in checks:
            fixed = list(shape[1:]) if isinstance(shape, list | tuple) else []
            if len(fixed) != len(want) or any(isinstance(a, int) and a != b for a, b in zip(fixed, want, strict=True)):
                raise CheckpointError(f"{self.path.name}: the graph's {what} is {list(shape)}, its contract says "
                                      f"[N, {', '.join(map(str, want))}]: export it again")
        if not config:
            return
        if self.ensemble:
            entries = config.get("members") if config.get("kind") == ENSEMBLE else None
            if not isinstance(entries, list) or len(entries) != len(self.inputs):
                raise CheckpointError(f"{self.path.name} is an ensemble of {len(self.inputs)} members' graph, the "
                                      "checkpoint is not: export it again")
            for k, (g, entry) in enumerate(zip(self.inputs, entries, strict=True)):
                said = {"chip": g.align_chip, "align_size": g.align_size, "weight": self.contract["members"][k]["weight"]}
                for key, value in said.items():
                    if isinstance(entry, dict) and key in entry and entry[key] != value:
                        raise CheckpointError(f"{self.path.name}: its contract says member {k}'s {key} is {value}, "
                                              f"the checkpoint {entry[key]!r}: export it again")
                self._check_config(g.preprocessing, (entry or {}).get("config") or {}, f"member {k}'s ")
        else:
            self._check_config(self.config, config, "")

    def _check_config(self, c: Preprocessing, config: dict[str, Any], who: str) -> None:
        mine = {"image_size": c.image_size, "embedding_size": c.embedding_size, "mean": c.mean, "std": c.std}
        for key, value in mine.items():
            theirs = config.get(key) if isinstance(config, dict) else None
            if theirs is not None and (tuple(theirs) if isinstance(theirs, list) else theirs) != value:
                raise CheckpointError(f"{self.path.name}: its contract says {who}{key} {value}, the checkpoint "
                                      f"{theirs}: export it again")

    @property
    def embedding_size(self) -> int:
        """Length of the embedding vectors."""
        return int(self.contract["embedding_size"])

    def run(self, x: np.ndarray | list[np.ndarray]) -> np.ndarray:
        """One pass of the graph: normalised float32 [N,3,S,S] (an ensemble: one per input, in a list) -> unit
        embeddings [N,E]."""
        xs = list(x) if self.ensemble else [x]
        feed = {g.name: np.ascontiguousarray(v, np.float32) for g, v in zip(self.inputs, xs, strict=True)}
        return self.session.run([self.contract["output"]["name"]], feed)[0]

    def _inputs(self, faces: Any, pre: Preprocessing) -> np.ndarray:
        """Faces for one input -> normalised float32 [N,3,S,S] (uint8 RGB faces are preprocessed)."""
        torch = sys.modules.get("torch")  # a tensor can only come from a process that loaded torch
        if torch is not None and isinstance(faces, torch.Tensor):
            x_all = faces.detach().cpu().float().numpy()
        elif isinstance(faces, np.ndarray) and faces.dtype == np.float32 and faces.ndim == 4 \
                and faces.shape[1] == 3:
            x_all = faces
        else:
            x_all = pre.preprocess(faces)
        if x_all.ndim != 4 or x_all.shape[1] != 3:
            raise ValueError(f"expected an array [N,3,S,S], got {tuple(x_all.shape)}")
        return x_all

    def flip_combine(self, e: np.ndarray, mirrored: np.ndarray) -> np.ndarray:
        """Outputs of a batch and of its mirror -> the flip-TTA embedding: L2-normalise(e + mirrored); for an
        ensemble, per member (its slice, renormalised, times its scale), then the whole L2-normalised."""
        if not self.ensemble:
            e = e + mirrored
            return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        parts = []
        for g in self.inputs:
            p = e[:, g.width] + mirrored[:, g.width]
            parts.append(p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12) * np.float32(g.scale))
        joined = np.concatenate(parts, axis=1)
        return joined / np.maximum(np.linalg.norm(joined, axis=1, keepdims=True), 1e-12)

    def embed(self, faces: np.ndarray | list[np.ndarray] | torch.Tensor, batch_size: int = 64,
              flip: bool = False) -> np.ndarray:
        """uint8 RGB faces (or a normalised float tensor/array [N,3,S,S]) -> float32 [N,E] unit vectors, in
        batches; `flip` adds the mirror's embedding and renormalises, as backbone.embed does. An ensemble takes
        one batch per member (the same faces on that member's chip, :attr:`chips`), as EnsembleModel.embed."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.ensemble:
            if not isinstance(faces, list | tuple) or len(faces) != len(self.inputs):
                raise ValueError(f"the ensemble needs a list of {len(self.inputs)} batches of faces (one per chip), "
                                 f"got {type(faces).__name__} of {len(faces)}")
            xs = [self._inputs(f, g.preprocessing) for f, g in zip(faces, self.inputs, strict=True)]
            if len({len(x) for x in xs}) != 1:
                raise ValueError(f"every member needs the same faces; got batches of sizes {[len(x) for x in xs]}")
        else:
            xs = [self._inputs(faces, self.config)]
        out = []
        for i in range(0, xs[0].shape[0], batch_size):
            x = [v[i:i + batch_size] for v in xs]
            e = self.run(x if self.ensemble else x[0])
            if flip:
                mirrored = [v[:, :, :, ::-1] for v in x]
                e = self.flip_combine(e, self.run(mirrored if self.ensemble else mirrored[0]))
            out.append(e.astype(np.float32, copy=False))
        if not out:
            return np.zeros((0, self.embedding_size), np.float32)
        return np.concatenate(out)


def export_onnx(model: FaceEmbeddingModel, out: str | os.PathLike, contract: dict[str, Any],
                check_faces: np.ndarray | torch.Tensor, opset: int = DEFAULT_OPSET,
                min_cosine: float = PARITY_MIN_COSINE) -> dict[str, Any]:
    """Export `model` to `out` (.onnx) with `contract` beside it (.json), after checking ONNX Runtime against
    torch on `check_faces` (uint8 RGB aligned faces, or a normalised tensor) with the contract's flip TTA. An
    ensemble (`contract` from :func:`build_ensemble_contract`) takes one batch per member in `check_faces`, the
    same faces on each member's chip.

    Nothing is written when the check fails (a one-line CheckpointError with the worst cosine); both files are
    written atomically, graph first. Returns the contract as written (with ``onnx_sha256`` and ``parity``)."""
    import tempfile

    from facemeta.models.backbone import embed

    out = Path(out)
    if out.suffix != ".onnx":
        raise CheckpointError(f"the ONNX file must end in .onnx, got {out}")
    side = contract_path(out)
    if side.exists() and not is_contract(side):  # e.g. m.onnx beside m.safetensors: m.json is its config
        raise CheckpointError(f"cannot write {out}: its contract would replace {side}, which is not an ONNX "
                              "contract (a checkpoint's settings?); give the .onnx file another name")
    ensemble = contract.get("kind") == ENSEMBLE
    if ensemble != hasattr(model, "chips"):
        raise CheckpointError("an ensemble's contract goes with an ensemble, a single model's with a single model")
    graph = export_graph(model, opset)
    doc = {**contract, "version": ENSEMBLE_VERSION if ensemble else SINGLE_VERSION, "opset": opset,
           "onnx_sha256": sha16(graph)}
    doc["numbers_sha256"] = numbers_digest(doc)
    with tempfile.TemporaryDirectory(prefix="facemeta-onnx-") as tmp:  # the runtime reads the graph from a file
        probe = Path(tmp) / "check.onnx"
        probe.write_bytes(graph)
        contract_path(probe).write_text(json.dumps(doc), encoding="utf-8")
        runtime = OnnxEmbeddingModel(probe)
        flip = bool(doc["flip_tta"])
        ours = runtime.embed(check_faces, batch_size=8, flip=flip)
        theirs = model.embed(list(check_faces), batch_size=8, flip=flip) if ensemble else \
            embed(model, check_faces, batch_size=8, flip=flip)
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
