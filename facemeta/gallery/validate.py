"""Checks on what a caller hands a gallery: identity names, embeddings, the stored threshold.

Each returns the checked value or raises a one-line GalleryError. Names are stripped and
NFC-normalised, and may not hold control, format (bidi overrides, zero-width), line or paragraph
separator, surrogate, private-use or unassigned characters (:func:`check_name`).
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np

from facemeta.checks import check_threshold
from facemeta.errors import FacemetaError, GalleryError

UNKNOWN = "unknown"
MAX_NAME = 256
_BAD_NAME_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def stored_threshold(value: str | None, db: Path) -> float | None:
    """The threshold kept in a gallery's meta table (None when unset), checked as any threshold is
    (facemeta.checks.check_threshold); a bad one means the database is damaged (GalleryError)."""
    if value in (None, "", "null"):
        return None
    try:
        return check_threshold(value, "its stored threshold")
    except FacemetaError as exc:
        raise GalleryError(f"{db} is damaged: {exc}") from None


def normal_name(name: str) -> str:
    """A name as stored and looked up: stripped and NFC-normalised."""
    if not isinstance(name, str):
        raise GalleryError(f"an identity name must be a string, got {type(name).__name__}")
    return unicodedata.normalize("NFC", name.strip())


def check_name(name: str) -> str:
    """The stored form of a new identity name (stripped, NFC-normalised), or a one-line GalleryError that
    shows it escaped: empty, longer than MAX_NAME, the reserved "unknown", or holding a control, format
    (bidi override, zero-width), line/paragraph separator, surrogate, private-use or unassigned character."""
    name = normal_name(name)
    rule = f"1 to {MAX_NAME} printable characters"
    if not name:
        raise GalleryError(f"bad identity name {name!r}: {rule}")
    for c in name:
        if unicodedata.category(c) in _BAD_NAME_CATEGORIES:
            label = unicodedata.name(c, "")
            raise GalleryError(f"bad identity name {name[:80]!r}: U+{ord(c):04X}{f' {label}' if label else ''} "
                               f"is a control, format or separator character; use {rule}")
    if len(name) > MAX_NAME:
        raise GalleryError(f"bad identity name {name[:40]!r}... ({len(name)} characters): {rule}")
    if name.lower() == UNKNOWN:
        raise GalleryError(f"{UNKNOWN!r} is reserved for faces that match nobody")
    return name


UNIT_TOLERANCE = 4 * float(np.finfo(np.float32).eps)  # |norm - 1| of a row taken as unit already


def check_vectors(vectors: np.ndarray, dim: int, fingerprint: str, given: str | None) -> np.ndarray:
    """Embeddings for a gallery of ``dim``-d vectors of model ``fingerprint`` as unit float32 rows [n, dim]
    (one vector becomes one row); ``given``, the model that made them when the caller says, must match."""
    if given is not None and given != fingerprint:
        raise GalleryError(f"embeddings of model {given!r} cannot be used with this gallery, "
                           f"which holds model {fingerprint!r}")
    try:
        x = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError):
        raise GalleryError("embeddings must be a numeric array") from None
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != dim:
        raise GalleryError(f"embeddings of shape {tuple(np.shape(vectors))} do not fit this gallery "
                           f"of {dim}-d vectors")
    if not np.all(np.isfinite(x)):
        raise GalleryError("embeddings contain NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms < 1e-12):
        raise GalleryError("an embedding is all zeros")
    # Rows already of unit length (to float32 rounding) are kept as given, so a stored vector enrolled
    # again (an import, a copy between backends) stays bit for bit; dividing it by its norm would move
    # about a third of its rows by one ulp.
    unit = np.abs(norms - 1.0) <= UNIT_TOLERANCE
    return np.ascontiguousarray(np.where(unit, x, x / norms), dtype=np.float32)

