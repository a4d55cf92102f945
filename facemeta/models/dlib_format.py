"""Reader of dlib's serialisation format for its ResNet face encoder (``dlib_face_recognition_resnet_model_v1.dat``).

Written from the format's public description (dlib's ``serialize.h`` and the ``dnn`` layer sources), not
from its code. What the file holds, as read here:

* integers in dlib's compact form: one control byte (its low bits the number of bytes that follow, its top
  bit the sign), then that many little-endian bytes of magnitude;
* strings: a compact integer length, then the bytes; booleans: one ASCII character, ``'0'`` or ``'1'``;
* scalars of type float/double: two compact integers, mantissa and exponent (value = m * 2**e);
* tensors: version 2, num_samples, k, nr, nc, then raw little-endian float32 values;
* a network, from the loss layer down: ``add_loss_layer`` (version 1, the loss's name and settings), then
  one version integer per nested layer (2 for ``add_layer``, 1 for tag/skip layers, 3 for the layer sitting
  on the input), the input layer (name, three channel means, chip rows and columns), and then each layer
  from the input upwards: its own fields, then three booleans and three (empty) tensors of the
  ``add_layer`` that holds it (the one on the input adds its sample expansion factor, 1).

Only the layer types of that network are understood (``con_4``, ``affine_``, ``relu_``, ``max_pool_2``,
``avg_pool_2``, ``add_prev_``, ``fc_2``); anything else is a :class:`DlibFormatError` naming what was found.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from facemeta.errors import CheckpointError


class DlibFormatError(CheckpointError):
    """The file is not dlib's face encoder in the format this reader understands (truncated, foreign)."""


@dataclass
class DlibLayer:
    """One layer of the network as stored: its type name, integer settings and float32 arrays."""

    kind: str
    settings: dict[str, int] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class DlibNetwork:
    """The parsed encoder: input chip size and channel means, and the layers from the input upwards."""

    loss: str
    input_kind: str
    channel_means: tuple[float, float, float]
    chip_rows: int
    chip_cols: int
    layers: list[DlibLayer]


class _Reader:
    """Sequential reader over the file's bytes; every read past the end is a DlibFormatError."""

    def __init__(self, data: bytes, name: str):
        self.data, self.pos, self.name = data, 0, name

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise DlibFormatError(f"{self.name}: truncated dlib file (needed {n} bytes at offset {self.pos}, "
                                  f"file has {len(self.data)})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def integer(self) -> int:
        control = self.take(1)[0]
        size, negative = control & 0x0F, bool(control & 0x80)
        if size > 8 or control & 0x70:
            raise DlibFormatError(f"{self.name}: bad integer control byte 0x{control:02x} at offset {self.pos - 1}")
        value = int.from_bytes(self.take(size), "little") if size else 0
        return -value if negative else value

    def string(self, limit: int = 256) -> str:
        n = self.integer()
        if not 0 <= n <= limit:
            raise DlibFormatError(f"{self.name}: implausible string length {n} at offset {self.pos}")
        raw = self.take(n)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError as exc:
            raise DlibFormatError(f"{self.name}: non-text layer name at offset {self.pos - n}") from exc

    def boolean(self) -> bool:
        c = self.take(1)
        if c not in (b"0", b"1"):
            raise DlibFormatError(f"{self.name}: expected a boolean ('0' or '1') at offset {self.pos - 1}, got {c!r}")
        return c == b"1"

    def real(self) -> float:
        mantissa, exponent = self.integer(), self.integer()
        return float(mantissa) * 2.0 ** exponent

    def tensor(self) -> np.ndarray:
        version = self.integer()
        if version != 2:
            raise DlibFormatError(f"{self.name}: tensor version {version} at offset {self.pos}, expected 2")
        shape = tuple(self.integer() for _ in range(4))
        if any(d < 0 for d in shape):
            raise DlibFormatError(f"{self.name}: negative tensor size {shape} at offset {self.pos}")
        count = int(np.prod(shape))
        raw = self.take(4 * count)
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)

    def alias(self) -> tuple[int, int, int, int]:
        version = self.integer()
        if version != 1:
            raise DlibFormatError(f"{self.name}: alias_tensor version {version} at offset {self.pos}, expected 1")
        return tuple(self.integer() for _ in range(4))  # type: ignore[return-value]


def _split(params: np.ndarray, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    """Cut a flat parameter tensor into consecutive arrays of the given shapes (all of it, exactly)."""
    flat = params.reshape(-1)
    out, start = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        out.append(flat[start:start + n].reshape(shape))
        start += n
    if start != flat.size:
        raise DlibFormatError(f"parameter tensor holds {flat.size} values, the layer's shapes need {start}")
    return out


def _read_layer(r: _Reader, kind: str) -> DlibLayer:
    """The fields of one layer of type `kind` (its name already read)."""
    if kind == "con_4":
        params = r.tensor()
        s = {k: r.integer() for k in ("filters", "rows", "cols", "stride_y", "stride_x", "pad_y", "pad_x")}
        w_shape, b_shape = r.alias(), r.alias()
        for _ in range(4):  # learning-rate and weight-decay multipliers (training settings)
            r.real()
        weight, bias = _split(params, w_shape, (b_shape[1],))
        return DlibLayer(kind, s, {"weight": weight, "bias": bias})
    if kind == "affine_":
        params = r.tensor()
        g_shape, b_shape = r.alias(), r.alias()
        mode = r.integer()
        gamma, beta = _split(params, (int(np.prod(g_shape)),), (int(np.prod(b_shape)),))
        return DlibLayer(kind, {"mode": mode}, {"gamma": gamma, "beta": beta})
    if kind in ("max_pool_2", "avg_pool_2"):
        s = {k: r.integer() for k in ("rows", "cols", "stride_y", "stride_x", "pad_y", "pad_x")}
        return DlibLayer(kind, s)
    if kind in ("relu_", "add_prev_"):
        return DlibLayer(kind)
    if kind == "fc_2":
        outputs, inputs = r.integer(), r.integer()
        params = r.tensor()
        w_shape, b_shape = r.alias(), r.alias()
        bias_mode = r.integer()
        for _ in range(4):
            r.real()
        if bias_mode != 1 or params.size != inputs * outputs:  # FC_NO_BIAS
            raise DlibFormatError(f"{r.name}: fully connected layer with a bias (mode {bias_mode}) is not dlib's encoder")
        (weight,) = _split(params, (inputs, outputs))
        return DlibLayer(kind, {"outputs": outputs, "inputs": inputs}, {"weight": weight})
    raise DlibFormatError(f"{r.name}: layer type '{kind}' at offset {r.pos} is not part of dlib's face encoder")


def parse_network(data: bytes, name: str = "dlib model") -> DlibNetwork:
    """Parse the bytes of ``dlib_face_recognition_resnet_model_v1.dat`` into its layers (no torch involved)."""
    r = _Reader(data, name)
    if r.integer() != 1:
        raise DlibFormatError(f"{name}: not a dlib network file (no loss layer header)")
    loss = r.string()
    if loss != "loss_metric_2":
        raise DlibFormatError(f"{name}: loss layer '{loss}', expected dlib's face encoder ('loss_metric_2')")
    r.real()  # margin
    r.real()  # distance threshold
    depth = 0
    while True:  # the version integers of the nested layers, down to the input
        version = r.integer()
        depth += 1
        if version == 3:
            break
        if version not in (1, 2) or depth > 1000:
            raise DlibFormatError(f"{name}: unexpected layer version {version} at offset {r.pos}")
    input_kind = r.string()
    if input_kind != "input_rgb_image_sized":
        raise DlibFormatError(f"{name}: input layer '{input_kind}', expected 'input_rgb_image_sized'")
    means = (r.real(), r.real(), r.real())
    rows, cols = r.integer(), r.integer()
    layers = []
    while r.pos < len(data):
        kind = r.string()
        layers.append(_read_layer(r, kind))
        for _ in range(3):  # add_layer flags: setup called, gradient stale, output/gradient disabled
            r.boolean()
        for _ in range(3):  # x_grad, cached output, params_grad: empty in a saved model
            r.tensor()
        if len(layers) == 1 and r.integer() != 1:  # the layer on the input also stores its sample expansion
            raise DlibFormatError(f"{name}: sample expansion factor other than 1 at offset {r.pos}")
    return DlibNetwork(loss, input_kind, means, rows, cols, layers)
