"""MTCNN without torch: the three networks run by ONNX Runtime, the cascade of facemeta.align.cascade in numpy.

:class:`OnnxFaceDetector` is a :class:`facemeta.align.detect.FaceDetector` (same methods, same Face objects)
for machines where torch is too heavy (``--runtime onnx``). Its P-, R- and O-Net are facenet-pytorch's
(MIT licence, weights in its wheel), exported once to ONNX into ``cache_root()/onnx/mtcnn-{pnet,rnet,onet}.onnx``
with a manifest ``mtcnn.json`` (sha256 of each graph and of the weights it came from) by
:func:`export_mtcnn_onnx`, the only function here that imports torch; later runs load the graphs without it.

The cascade is facemeta.align.cascade's step for step: the same pyramid (factor 0.709, OpenCV INTER_AREA on
float32 pixels), thresholds, box regression, square boxes, landmarks, torchvision's NMS (IoU > 0.5 / 0.7
suppressed, per image) and facenet-pytorch's final 'Min' NMS, rewritten with numpy. Boxes and landmarks agree
with the torch detector to float rounding (tests/test_mtcnn_onnx.py checks it on real photos).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from facemeta.align.detect import FaceDetector
from facemeta.errors import CheckpointError, one_line
from facemeta.models.onnx_export import default_threads

FACTOR = 0.709  # MTCNN's pyramid step (as facemeta.align.cascade)
NETS = ("pnet", "rnet", "onet")
OUTPUTS = {"pnet": ("reg", "prob"), "rnet": ("reg", "prob"), "onet": ("reg", "landmarks", "prob")}
EXAMPLES = {"pnet": (1, 3, 60, 80), "rnet": (2, 3, 24, 24), "onet": (2, 3, 48, 48)}
MANIFEST = "mtcnn.json"
FORMAT, VERSION = "facemeta-mtcnn-onnx", 1
OPSET = 18
CHUNK = 128  # candidate boxes per R-/O-Net call (bounds the runtime's memory, not the answer)
PARITY_MAX_DIFF = 1e-4  # largest |ONNX Runtime - torch| allowed on any output at export


def onnx_folder(cache: str | os.PathLike | None = None) -> Path:
    """Where the exported detector lives: cache_root()/onnx (beside the embedding graphs)."""
    from facemeta.paths import cache_root

    return cache_root(cache) / "onnx"


def _sha16(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def source_weights() -> dict[str, Path] | None:
    """facenet-pytorch's weight files {net: path} (found without importing it), or None when not installed."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    files = {net: data / f"{net}.pt" for net in NETS}
    return files if all(f.is_file() for f in files.values()) else None


def export_mtcnn_onnx(folder: str | os.PathLike | None = None, opset: int = OPSET) -> dict:
    """Export facenet-pytorch's P-, R- and O-Net to `folder` (default :func:`onnx_folder`) as
    mtcnn-<net>.onnx plus the manifest, each graph checked against torch first; needs torch. -> the manifest."""
    from facemeta.atomic import atomic_write

    try:
        import torch
        from facenet_pytorch.models.mtcnn import ONet, PNet, RNet
    except ImportError as exc:
        raise CheckpointError("the ONNX detector is exported once from facenet-pytorch's networks, which need "
                              f"torch and facenet-pytorch: {one_line(exc)}") from exc
    import onnxruntime as ort

    folder = Path(folder) if folder is not None else onnx_folder()
    sources = source_weights() or {}
    manifest = {"format": FORMAT, "version": VERSION, "opset": opset, "graphs": {}, "sources": {},
                "from": "facenet-pytorch (MIT licence)"}
    graphs = {}
    for net, cls in zip(NETS, (PNet, RNet, ONet), strict=True):
        model = cls(pretrained=True).eval()
        try:
            data, manifest["opset"] = _export_net(torch, model, net, opset)
        except Exception as exc:  # the exporters raise many types
            raise CheckpointError(f"cannot export MTCNN's {net} to ONNX: {one_line(exc)}") from exc
        shape = (3, *EXAMPLES[net][1:]) if net != "pnet" else (2, 3, 57, 75)
        x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        with torch.inference_mode():
            theirs = [t.numpy() for t in model(torch.from_numpy(x))]
        worst = max(float(np.abs(a - b).max()) for a, b in zip(session.run(None, {"input": x}), theirs, strict=True))
        if not worst <= PARITY_MAX_DIFF:
            raise CheckpointError(f"ONNX Runtime disagrees with torch on MTCNN's {net} (max difference {worst:.2e})")
        graphs[net] = data
        manifest["graphs"][net] = _sha16(data)
        if net in sources:
            manifest["sources"][net] = _sha16(sources[net].read_bytes())
    try:
        for net, data in graphs.items():
            with atomic_write(folder / f"mtcnn-{net}.onnx", "wb") as fh:
                fh.write(data)
        with atomic_write(folder / MANIFEST) as fh:  # last: a manifest means the three graphs are there
            fh.write(json.dumps(manifest, indent=2) + "\n")
    except OSError as exc:
        raise CheckpointError(f"cannot write the ONNX detector into {folder}: {one_line(exc)}") from exc
    return manifest


def _export_net(torch, model, net: str, opset: int) -> tuple[bytes, int]:
    """One network as serialised ONNX (batch axis dynamic; P-Net's height and width too) and its opset: torch's
    TorchScript exporter (seconds; opset 17 at most) where this torch still has it, else the dynamo exporter."""
    import io
    import warnings

    example = torch.zeros(*EXAMPLES[net])
    axes = {0: "n", 2: "h", 3: "w"} if net == "pnet" else {0: "n"}
    try:
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), buffer, input_names=["input"], output_names=list(OUTPUTS[net]),
                              dynamic_axes={"input": axes, **{o: {0: "n"} for o in OUTPUTS[net]}},
                              opset_version=min(opset, 17), dynamo=False)
        return buffer.getvalue(), min(opset, 17)
    except Exception:  # no TorchScript exporter in this torch
        dims = {k: torch.export.Dim(v, min=12) if k else torch.export.Dim(v) for k, v in axes.items()}
        program = torch.onnx.export(model, (example,), None, input_names=["input"], output_names=list(OUTPUTS[net]),
                                    dynamic_shapes=(dims,), opset_version=opset, dynamo=True, verbose=False)
        return program.model_proto.SerializeToString(), opset


def _cached_graphs(folder: Path) -> dict[str, bytes] | None:
    """The three graphs in `folder` when the manifest vouches for them (and for the installed weights, where
    facenet-pytorch is installed); None when missing, damaged or stale."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            return None
        graphs = {net: (folder / f"mtcnn-{net}.onnx").read_bytes() for net in NETS}
        named, made_from = dict(manifest["graphs"]), dict(manifest["sources"])
    except (OSError, ValueError, AttributeError, KeyError, TypeError):  # missing, unreadable or not a manifest
        return None
    if any(_sha16(data) != named.get(net) for net, data in graphs.items()):
        return None
    sources = source_weights()
    if sources and any(_sha16(sources[net].read_bytes()) != made_from.get(net) for net in NETS):
        return None  # another facenet-pytorch release: export its weights again
    return graphs


def load_graphs(folder: str | os.PathLike | None = None) -> dict[str, bytes]:
    """The serialised P-, R- and O-Net: from the cache, or exported into it first (that once needs torch)."""
    folder = Path(folder) if folder is not None else onnx_folder()
    graphs = _cached_graphs(folder)
    if graphs is None:
        export_mtcnn_onnx(folder)
        graphs = _cached_graphs(folder)
        if graphs is None:
            raise CheckpointError(f"the ONNX detector exported into {folder} cannot be read back")
    return graphs


class _Net:
    """One MTCNN network in an ONNX Runtime session: float32 NCHW input -> its outputs as numpy arrays."""

    def __init__(self, data: bytes, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # no busy-waiting between the many small calls of a cascade: on a shared CPU it only burns the cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        """Outputs for a batch, run CHUNK at a time: R- and O-Net see thousands of candidate boxes in a batch of
        photos, and the runtime's memory arena would grow to hold all their activations at once."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) <= CHUNK:
            return self.session.run(None, {"input": x})
        parts = [self.session.run(None, {"input": x[i:i + CHUNK]}) for i in range(0, len(x), CHUNK)]
        return [np.concatenate(outs) for outs in zip(*parts, strict=True)]


class OnnxFaceDetector(FaceDetector):
    """MTCNN on ONNX Runtime: FaceDetector's interface and answers, without torch.

    min_face_size, thresholds, max_side and batch_size as FaceDetector's; `device` must be the CPU. threads:
    ONNX Runtime's intra-op threads (default :func:`default_threads`); cache: the cache root holding onnx/.
    """

    def __init__(self, device: str = "cpu", min_face_size: int = 20,
                 thresholds: Sequence[float] = (0.6, 0.7, 0.7), max_side: int = 1600, batch_size: int = 32,
                 threads: int | None = None, cache: str | os.PathLike | None = None):
        if str(device) != "cpu":
            raise ValueError(f"the ONNX detector runs on the CPU, not {device!r}")
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise CheckpointError("the ONNX runtime needs onnxruntime, which is not installed: "
                                  "pip install 'facemeta[onnx]'") from exc
        self.device = "cpu"
        self.min_face_size = int(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.max_side = int(max_side)
        self.batch_size = int(batch_size)
        graphs = load_graphs(onnx_folder(cache))
        n = max(1, int(threads or default_threads()))
        self.nets = tuple(_Net(graphs[net], n) for net in NETS)

    def _cascade(self, batch: np.ndarray, min_size: int, thresholds: tuple) -> list:
        """MTCNN's three stages on ONNX Runtime (the batching, scaling and ordering are FaceDetector's)."""
        return detect_faces(batch, self.nets, min_size, thresholds)


# -- the cascade (facemeta.align.cascade in numpy)

def _normalise(pixels: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] float32 pixels -> MTCNN's input [N, 3, H, W] in about [-1, 1]."""
    return (pixels.transpose(0, 3, 1, 2) - np.float32(127.5)) * np.float32(0.0078125)


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """torchvision.ops.nms: indices kept, highest score first; a box whose IoU with a kept one exceeds
    `threshold` is dropped."""
    x1, y1, x2, y2 = (boxes[:, k] for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= threshold]
    return np.asarray(keep, dtype=np.int64)


def _batched_nms(boxes: np.ndarray, scores: np.ndarray, inds: np.ndarray, threshold: float) -> np.ndarray:
    """NMS within each image (torchvision's batched_nms): kept indices, highest score first."""
    if not len(boxes):
        return np.zeros(0, dtype=np.int64)
    keep = np.concatenate([np.flatnonzero(inds == i)[_nms(boxes[inds == i], scores[inds == i], threshold)]
                           for i in sorted(set(inds.tolist()))])  # not np.unique: its first call imports numpy.ma
    return keep[np.argsort(-scores[keep], kind="stable")]


def _nms_min(boxes: np.ndarray, scores: np.ndarray, inds: np.ndarray, threshold: float) -> np.ndarray:
    """facenet-pytorch's batched_nms_numpy(..., 'Min'): overlap over the smaller box, per image."""
    if not len(boxes):
        return np.zeros(0, dtype=np.int64)
    shifted = boxes + (inds.astype(boxes.dtype) * (boxes.max() + 1))[:, None]
    x1, y1, x2, y2 = (shifted[:, k].copy() for k in range(4))
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(scores)
    pick = []
    while order.size > 0:
        i, idx = order[-1], order[:-1]
        pick.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[idx]) - np.maximum(x1[i], x1[idx]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[idx]) - np.maximum(y1[i], y1[idx]) + 1)
        order = order[np.where(w * h / np.minimum(area[i], area[idx]) <= threshold)]
    return np.asarray(pick, dtype=np.int64)


def _rerec(b: np.ndarray) -> np.ndarray:
    """Boxes made square around their centre (side: the longer side)."""
    b = b.copy()
    h, w = b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]
    side = np.maximum(w, h)
    b[:, 0] = b[:, 0] + w * 0.5 - side * 0.5
    b[:, 1] = b[:, 1] + h * 0.5 - side * 0.5
    b[:, 2:4] = b[:, :2] + side[:, None]
    return b


def _bbreg(b: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Boxes moved by the network's regression (a share of their width and height)."""
    b = b.copy()
    w, h = b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1
    b[:, :4] = np.stack([b[:, 0] + reg[:, 0] * w, b[:, 1] + reg[:, 1] * h,
                         b[:, 2] + reg[:, 2] * w, b[:, 3] + reg[:, 3] * h], axis=1)
    return b


def _crops(images: np.ndarray, boxes: np.ndarray, inds: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each box's pixels (clipped, 1-based as MTCNN's pad() gives them) resized to size x size ->
    (network input [K, 3, size, size], indices of the boxes with a non-empty crop)."""
    h, w = images.shape[1:3]
    b = np.trunc(boxes[:, :4]).astype(np.int32)
    x, y = np.maximum(b[:, 0], 1), np.maximum(b[:, 1], 1)
    ex, ey = np.minimum(b[:, 2], w), np.minimum(b[:, 3], h)
    out, kept = [], []
    for k in range(len(b)):
        if ey[k] > y[k] - 1 and ex[k] > x[k] - 1:
            crop = images[inds[k], y[k] - 1:ey[k], x[k] - 1:ex[k]]
            out.append(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA))
            kept.append(k)
    if not out:
        return np.zeros((0, 3, size, size), np.float32), np.asarray(kept, dtype=np.int64)
    return _normalise(np.stack(out)), np.asarray(kept, dtype=np.int64)


def _proposals(images: np.ndarray, pnet, min_size: float, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Stage 1: P-Net over the image pyramid -> candidate boxes [M, 5] and their image indices."""
    h, w = images.shape[1:3]
    scale = 12.0 / min_size
    side = min(h, w) * scale
    boxes, inds = [], []
    while side >= 12:
        size = (int(w * scale + 1), int(h * scale + 1))
        level = np.stack([cv2.resize(img, size, interpolation=cv2.INTER_AREA) for img in images])
        reg, probs = pnet(_normalise(level))
        n, yy, xx = np.nonzero(probs[:, 1] >= threshold)
        bb = np.stack([xx, yy], axis=1).astype(np.float32)
        found = np.concatenate([np.floor((2 * bb + 1) / scale), np.floor((2 * bb + 12 - 1 + 1) / scale),
                                probs[n, 1, yy, xx][:, None], reg[n, :, yy, xx]], axis=1).astype(np.float32)
        pick = _batched_nms(found[:, :4], found[:, 4], n, 0.5)
        boxes.append(found[pick])
        inds.append(n[pick])
        scale *= FACTOR
        side *= FACTOR
    if not boxes:
        return np.zeros((0, 5), np.float32), np.zeros(0, np.int64)
    b, i = np.concatenate(boxes), np.concatenate(inds)
    pick = _batched_nms(b[:, :4], b[:, 4], i, 0.7)
    b, i = b[pick], i[pick]
    bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    refined = np.stack([b[:, 0] + b[:, 5] * bw, b[:, 1] + b[:, 6] * bh, b[:, 2] + b[:, 7] * bw,
                        b[:, 3] + b[:, 8] * bh, b[:, 4]], axis=1)
    return _rerec(refined), i


def detect_faces(images: np.ndarray, nets: Sequence, min_size: float,
                 thresholds: Sequence[float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Faces in equal-sized RGB images [N, H, W, 3] through the P-, R- and O-Net callables `nets` (as
    facemeta.align.cascade.detect_faces) -> per image (boxes [F, 5] with probability, landmarks [F, 5, 2])."""
    pnet, rnet, onet = nets
    pixels = np.asarray(images, dtype=np.float32)
    boxes, inds = _proposals(pixels, pnet, min_size, thresholds[0])
    points = np.zeros((0, 5, 2), np.float32)
    x, kept = _crops(pixels, boxes, inds, 24)
    boxes, inds = boxes[kept], inds[kept]
    if len(boxes):  # stage 2: R-Net on 24x24 crops
        reg, probs = rnet(x)
        keep = probs[:, 1] > thresholds[1]
        boxes = np.concatenate([boxes[keep, :4], probs[keep, 1:2]], axis=1)
        inds, reg = inds[keep], reg[keep]
        pick = _batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7)
        boxes, inds = _rerec(_bbreg(boxes[pick], reg[pick])), inds[pick]
        x, kept = _crops(pixels, boxes, inds, 48)
        boxes, inds = boxes[kept], inds[kept]
    if len(boxes):  # stage 3: O-Net on 48x48 crops: final boxes and the five landmarks
        reg, marks, probs = onet(x)
        keep = probs[:, 1] > thresholds[2]
        boxes = np.concatenate([boxes[keep, :4], probs[keep, 1:2]], axis=1)
        inds, reg, marks = inds[keep], reg[keep], marks[keep]
        bw = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        bh = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        points = np.stack([bw * marks[:, :5] + boxes[:, 0:1] - 1, bh * marks[:, 5:] + boxes[:, 1:2] - 1], axis=2)
        boxes = _bbreg(boxes, reg)
        pick = _nms_min(boxes[:, :4], boxes[:, 4], inds, 0.7)
        boxes, inds, points = boxes[pick], inds[pick], points[pick]
    return [(boxes[inds == i], points[inds == i]) for i in range(len(pixels))]
