"""The model files facemeta reads: where the shipped model is found, a checkpoint's inference settings checked,
its fingerprint, and where the ONNX Runtime export of it is cached. Used by the embedder and by the commands
and tools that name a model without loading it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from facemeta.errors import CheckpointError

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
MODEL_ENV = "FACEMETA_MODEL"


def default_model_path() -> Path:
    """$FACEMETA_MODEL, else the shipped model: the package's own copy (facemeta/weights, in a wheel) before the
    repository's weights/ (default.safetensors, or the only model there)."""
    from facemeta.paths import packaged_weights_dir

    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV]).expanduser()
    for folder in (packaged_weights_dir(), WEIGHTS_DIR):
        if folder is not None and (folder / "default.safetensors").is_file():
            return folder / "default.safetensors"
    candidates = sorted(WEIGHTS_DIR.glob("*.safetensors")) if WEIGHTS_DIR.is_dir() else []
    if len(candidates) == 1:
        return candidates[0]
    where = f"{WEIGHTS_DIR} holds {len(candidates)} models" if candidates else f"no model in {WEIGHTS_DIR}"
    raise CheckpointError(f"{where}; pass --model PATH (a .safetensors checkpoint) or set ${MODEL_ENV}")


ALIGN_SIZES = (16, 1024)  # the aligned chip sides a checkpoint may ask for (as data.align_size allows, and more)


def check_model_meta(meta: dict, where: str | os.PathLike) -> dict:
    """The inference settings of a checkpoint's meta, checked: ``align_size`` (an integer in 16..1024),
    ``align_chip`` (a known template; ``align_template``, when recorded, must be this code's digest of it),
    ``threshold`` (a finite cosine in [-1, 1]) and ``threshold_far``
    (in (0, 1]); absent ones take their defaults. A bad value is a one-line CheckpointError naming
    the file, before anything is allocated from it."""
    import math

    from facemeta.align.warp import CHIPS

    def bad(key: str, want: str) -> CheckpointError:
        return CheckpointError(f"{where}: meta {key!r} must be {want}, got {meta.get(key)!r}")

    size = meta.get("align_size", 112)
    if isinstance(size, bool) or not isinstance(size, int) or not ALIGN_SIZES[0] <= size <= ALIGN_SIZES[1]:
        raise bad("align_size", f"an integer in {ALIGN_SIZES[0]}..{ALIGN_SIZES[1]}")
    chip = meta.get("align_chip", "arcface")
    if chip not in CHIPS:
        raise bad("align_chip", "one of " + ", ".join(CHIPS))
    from facemeta.align.warp import template_digest

    digest = meta.get("align_template")
    if digest is not None and digest != template_digest(chip):
        raise CheckpointError(f"{where}: the model was trained on faces aligned onto another {chip} template "
                              f"(digest {digest}, this facemeta's is {template_digest(chip)}); use the facemeta "
                              "version it was trained with, or train it again")
    out = {"align_size": size, "align_chip": chip}
    for key, low, high, want in (("threshold", -1.0, 1.0, "a finite cosine in [-1, 1] or null"),
                                 ("threshold_far", 0.0, 1.0, "a rate in (0, 1] or null")):
        value = meta.get(key)
        if value is not None:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or not low <= value <= high or (key == "threshold_far" and value == 0):
                raise bad(key, want)
            value = float(value)
        out[key] = value
    return out


def file_fingerprint(path: str | os.PathLike) -> str:
    """First 16 hex digits of the sha256 of a file (identifies a model's weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def checkpoint_path(model_path: str | os.PathLike | None) -> Path:
    """The .safetensors file a model argument names (the file, its .json sidecar or a bare stem; None: default)."""
    path = Path(model_path) if model_path is not None else default_model_path()
    if path.suffix == ".json":  # the sidecar names the same checkpoint
        return path.with_suffix(".safetensors")
    if path.suffix != ".safetensors":  # a bare stem, as load_checkpoint accepts
        return path.with_name(path.name + ".safetensors")
    return path


def onnx_cache_path(fingerprint: str) -> Path:
    """Where ``runtime="onnx"`` keeps the graph it exports on first use: cache_root()/onnx/<fingerprint>.onnx."""
    from facemeta.paths import cache_root

    return cache_root() / "onnx" / f"{fingerprint}.onnx"
