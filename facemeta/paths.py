"""Where facemeta looks for the shared face data and keeps its caches."""

from __future__ import annotations

import os
from pathlib import Path

from facemeta.errors import FacemetaError

DATA_ENV = "FACEMETA_DATA"
CACHE_ENV = "FACEMETA_CACHE"


class DataNotFoundError(FileNotFoundError, FacemetaError):
    """The face data folder (or one set inside it) is missing."""


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """Return the data folder: `explicit`, else $FACEMETA_DATA, else ../shared/data.

    ../shared/data is tried relative to the working directory first, then relative to
    the repository that holds this package (so tests and tools work from any folder).
    """
    if explicit:
        root = Path(explicit).expanduser()
    elif os.environ.get(DATA_ENV):
        root = Path(os.environ[DATA_ENV]).expanduser()
    else:
        candidates = [Path.cwd() / ".." / "shared" / "data",
                      Path(__file__).resolve().parents[1] / ".." / "shared" / "data"]
        root = next((c for c in candidates if c.is_dir()), candidates[0])
    if not root.is_dir():
        raise DataNotFoundError(
            f"face data folder not found: {root} (pass --data or set ${DATA_ENV})")
    return root.resolve()


def set_dir(name: str, explicit: str | os.PathLike | None = None) -> Path:
    """Return the folder of one shared set (lfw, yaleb, mfr2, orl) under the data root."""
    path = data_root(explicit) / name
    if not path.is_dir():
        raise DataNotFoundError(f"set '{name}' not found under {path.parent}")
    return path


def cache_root(explicit: str | os.PathLike | None = None) -> Path:
    """Return the cache folder (aligned faces, trained runs): `explicit`, $FACEMETA_CACHE or ~/.cache/facemeta."""
    if explicit:
        root = Path(explicit)
    elif os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV])
    else:
        root = Path.home() / ".cache" / "facemeta"
    root.mkdir(parents=True, exist_ok=True)
    return root


def packaged_weights_dir() -> Path | None:
    """The shipped model's folder inside the installed package (facemeta/weights, put there by setup.py's build
    step in a wheel or an install from the sdist), or None where the package has none (a source checkout, whose
    model is in the repository's weights/). Looked for before weights/."""
    from importlib import resources

    try:
        folder = resources.files("facemeta") / "weights"
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - facemeta is always importable here
        return None
    if not isinstance(folder, Path):  # a zip import: no file path to hand to safetensors
        return None
    return folder if (folder / "default.safetensors").is_file() else None
