"""Reader of SFace's ONNX file (OpenCV Zoo's ``face_recognition_sface_2021dec``, 8-bit block-quantised build).

Our own reader over the ``onnx`` library's protobuf classes (no ONNX Runtime, no OpenCV): it evaluates the
graph's constant part (``DequantizeLinear`` of the int8 weights with their per-block scales and zero points,
``Reshape`` to the convolution shapes, ``Constant``) with numpy, then walks the compute nodes in order and
checks that they are exactly SFace's network:

``Sub`` (127.5), ``Mul`` (1/128) on the BGR input; 27 times ``Conv`` (no bias) + ``BatchNormalization`` +
``PRelu`` (one full 3x3 convolution, then 13 depthwise 3x3 + pointwise 1x1 pairs); ``BatchNormalization``
over the 1024x7x7 map; ``Dropout``; ``Flatten``; ``Gemm`` (50176 -> 128, transB); ``BatchNormalization`` of
the 128-d output. Anything else (a truncated file, another network such as the YuNet detector beside it in
the package) is an :class:`SFaceFormatError` saying where it differs.

The file lists its weights as graph inputs too (with initializers of the same names): this reader takes the
initializers, which is why it needs no change to the file (ONNX Runtime refuses it as it is).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from facemeta.errors import CheckpointError, one_line


class SFaceFormatError(CheckpointError):
    """The file is not SFace's ONNX network in the form this reader understands (truncated, foreign)."""


@dataclass
class ConvLayer:
    """One convolution with the batch norm and PReLU after it, as stored (float32 arrays, dequantised)."""

    name: str
    weight: np.ndarray  # [out, in / groups, k, k]
    stride: int
    padding: int
    groups: int
    bn: dict[str, np.ndarray]  # gamma, beta, mean, var
    bn_eps: float
    prelu: np.ndarray  # [out]


@dataclass
class SFaceGraph:
    """SFace's parameters in network order: input scaling, the 27 convolutions and the embedding head."""

    input_shift: float
    input_scale: float
    convs: list[ConvLayer]
    features_bn: dict[str, np.ndarray]
    features_bn_eps: float
    fc_weight: np.ndarray  # [128, 50176]
    fc_bias: np.ndarray  # [128]
    output_bn: dict[str, np.ndarray]
    output_bn_eps: float
    extra: dict[str, object] = field(default_factory=dict)


def dequantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int = 1,
               block_size: int = 0) -> np.ndarray:
    """ONNX ``DequantizeLinear``: (x - zero_point) * scale, per tensor, per axis, or per block of `block_size`
    along `axis` (opset 21: scale's size on that axis is ceil(n / block_size))."""
    x = x.astype(np.float64)
    zp = np.zeros_like(scale, dtype=np.float64) if zero_point is None else zero_point.astype(np.float64)
    scale = scale.astype(np.float64)
    if scale.ndim == 0 or scale.size == 1:
        return ((x - zp.reshape(())) * scale.reshape(())).astype(np.float32)
    axis = axis % x.ndim
    if block_size:
        if scale.shape[axis] != -(-x.shape[axis] // block_size):
            raise SFaceFormatError(f"block scales of shape {scale.shape} do not tile a tensor of shape {x.shape} "
                                   f"in blocks of {block_size}")
        scale = np.repeat(scale, block_size, axis=axis).take(range(x.shape[axis]), axis=axis)
        zp = np.repeat(zp, block_size, axis=axis).take(range(x.shape[axis]), axis=axis)
    else:  # per axis: a 1-D scale along `axis`
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((x - zp) * scale).astype(np.float32)


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _constants(model, name: str) -> tuple[dict[str, np.ndarray], list]:
    """Evaluate the graph's constant part; returns (values by name, the remaining compute nodes in order)."""
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    rest = []
    for node in model.graph.node:
        known = all(i in values for i in node.input if i)
        if node.op_type == "Constant":
            a = _attrs(node)
            if "value" not in a:
                raise SFaceFormatError(f"{name}: Constant node {node.name!r} without a tensor value")
            values[node.output[0]] = numpy_helper.to_array(a["value"])
        elif node.op_type == "DequantizeLinear" and known:
            a = _attrs(node)
            ins = [values[i] if i else None for i in node.input] + [None] * 3
            values[node.output[0]] = dequantize(ins[0], ins[1], ins[2], a.get("axis", 1), a.get("block_size", 0))
        elif node.op_type == "Reshape" and known:
            shape = values[node.input[1]].astype(np.int64)
            try:
                values[node.output[0]] = values[node.input[0]].reshape(tuple(int(s) for s in shape))
            except ValueError as exc:
                raise SFaceFormatError(f"{name}: cannot reshape weight {node.input[0]}: {one_line(exc)}") from exc
        else:
            rest.append(node)
    return values, rest


class _Walker:
    """Consumes the compute nodes one by one, checking each is the operation SFace has at that place."""

    def __init__(self, nodes: list, values: dict[str, np.ndarray], name: str):
        self.nodes, self.values, self.name, self.pos = nodes, values, name, 0
        self.current = "data"

    def take(self, op: str):
        if self.pos >= len(self.nodes):
            raise SFaceFormatError(f"{self.name}: graph ends after {self.pos} operations; SFace expects {op} next")
        node = self.nodes[self.pos]
        if node.op_type != op:
            raise SFaceFormatError(f"{self.name}: operation {self.pos} is {node.op_type}, SFace has {op} there")
        if self.current not in node.input:
            raise SFaceFormatError(f"{self.name}: operation {self.pos} ({op}) does not take the previous output")
        self.pos += 1
        self.current = node.output[0]
        return node

    def const(self, node, index: int) -> np.ndarray:
        if index >= len(node.input) or node.input[index] not in self.values:
            raise SFaceFormatError(f"{self.name}: {node.op_type} {node.name!r} lacks constant input {index}")
        return self.values[node.input[index]]

    def batch_norm(self) -> tuple[dict[str, np.ndarray], float]:
        node = self.take("BatchNormalization")
        bn = {k: self.const(node, i).astype(np.float32).reshape(-1)
              for i, k in enumerate(("gamma", "beta", "mean", "var"), start=1)}
        if len({v.size for v in bn.values()}) != 1 or (bn["var"] < 0).any():
            raise SFaceFormatError(f"{self.name}: batch norm {node.name!r} has inconsistent statistics")
        return bn, float(_attrs(node).get("epsilon", 1e-5))


def parse_sface(data: bytes, name: str = "SFace model") -> SFaceGraph:
    """Parse the bytes of ``face_recognition_sface_2021dec*.onnx`` into SFace's float32 parameters (no torch)."""
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError as exc:
        raise CheckpointError("reading SFace needs the onnx package: pip install 'facemeta[prior]'") from exc
    if len(data) < 1024:
        raise SFaceFormatError(f"{name}: {len(data)} bytes is no ONNX network (truncated or empty)")
    try:
        model = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise SFaceFormatError(f"{name}: truncated or not an ONNX file ({one_line(exc)})") from exc
    if not model.graph.node:
        raise SFaceFormatError(f"{name}: truncated or not an ONNX file (no graph)")
    values, nodes = _constants(model, name)
    w = _Walker(nodes, values, name)
    sub, mul = w.take("Sub"), w.take("Mul")
    shift, scale = float(w.const(sub, 1).reshape(-1)[0]), float(w.const(mul, 1).reshape(-1)[0])
    convs = []
    for i in range(27):
        conv = w.take("Conv")
        weight = w.const(conv, 1).astype(np.float32)
        if len(conv.input) > 2 and conv.input[2]:
            raise SFaceFormatError(f"{name}: convolution {i} has a bias; SFace's convolutions have none")
        a = _attrs(conv)
        strides, pads = list(a.get("strides", [1, 1])), list(a.get("pads", [0, 0, 0, 0]))
        if weight.ndim != 4 or len(set(strides)) != 1 or len(set(pads)) != 1 or list(a.get("dilations", [1, 1])) != [1, 1]:
            raise SFaceFormatError(f"{name}: convolution {i} ({conv.name!r}) is not a square, undilated convolution")
        bn, eps = w.batch_norm()
        prelu = w.const(w.take("PRelu"), 1).astype(np.float32).reshape(-1)
        if bn["gamma"].size != weight.shape[0] or prelu.size != weight.shape[0]:
            raise SFaceFormatError(f"{name}: convolution {i} has {weight.shape[0]} filters but batch norm or PReLU "
                                   "of another size")
        convs.append(ConvLayer(conv.name or f"conv{i}", weight, strides[0], pads[0], int(a.get("group", 1)),
                               bn, eps, prelu))
    features_bn, features_eps = w.batch_norm()
    dropout = w.take("Dropout")
    w.take("Flatten")
    gemm = w.take("Gemm")
    ga = _attrs(gemm)
    if (ga.get("transA", 0), ga.get("transB", 0), ga.get("alpha", 1.0), ga.get("beta", 1.0)) != (0, 1, 1.0, 1.0):
        raise SFaceFormatError(f"{name}: the embedding layer (Gemm) is not y = x W^T + b")
    fc_weight, fc_bias = w.const(gemm, 1).astype(np.float32), w.const(gemm, 2).astype(np.float32).reshape(-1)
    output_bn, output_eps = w.batch_norm()
    if w.pos != len(nodes):
        raise SFaceFormatError(f"{name}: {len(nodes) - w.pos} operations after SFace's output")
    if [o.name for o in model.graph.output] != [w.current]:
        raise SFaceFormatError(f"{name}: graph output is not the last batch norm's")
    ratio = dropout.input[1] if len(dropout.input) > 1 else ""
    return SFaceGraph(shift, scale, convs, features_bn, features_eps, fc_weight, fc_bias, output_bn, output_eps,
                      extra={"dropout": float(values[ratio]) if ratio in values else None,
                             "opset": [(o.domain, o.version) for o in model.opset_import]})
