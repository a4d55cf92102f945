"""Errors that the command line reports as one clear line and a non-zero exit code."""

import re


class FacemetaError(Exception):
    """Base of every user-facing error (bad input, missing file, wrong checkpoint)."""


class ImageReadError(FacemetaError):
    """An image file is missing, empty, truncated, not an image, or too large to decode safely."""


class NoFaceError(FacemetaError):
    """No face was found where one was required."""


class ManyFacesError(FacemetaError):
    """Several faces were found where exactly one was required."""


class CheckpointError(FacemetaError):
    """A model checkpoint is missing, corrupt, or of another architecture."""


class ConfigError(FacemetaError):
    """A preset or config file has an unknown key or a bad value."""


class GalleryError(FacemetaError):
    """A gallery is corrupt, locked, or holds embeddings of another model."""


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def one_line(exc: BaseException | str, limit: int = 200) -> str:
    """The first line of an exception's message, or of a text (terminal colour codes removed; at most
    `limit` characters), for a one-line error.

    PyTorch's refusal to unpickle code (``torch.load(weights_only=True)``) opens with advice on how
    to load the file unsafely; it becomes a plain statement of what the file holds instead.
    """
    text = _ANSI.sub("", str(exc))
    if text.startswith("Weights only load failed"):
        found = _REFUSED_GLOBAL.search(text)
        what = f" ({found[1]})" if found else ""
        return f"the file holds pickled Python objects{what}, not only tensors; facemeta never unpickles code"
    lines = text.strip().splitlines()
    return (lines[0].strip() if lines else "" if isinstance(exc, str) else type(exc).__name__)[:limit]
