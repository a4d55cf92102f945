"""Checks on what a caller hands a gallery: identity names, embeddings, the stored threshold.

Each returns the checked value or raises a one-line GalleryError. Names are stripped and
NFC-normalised, and may not hold control, format (bidi overrides, zero-width), line or paragraph
separator, surrogate, private-use or unassigned characters, Unicode default-ignorable code points
(variation selectors, U+034F, Hangul fillers), blank "filler" characters (U+2800), more than a few
combining marks on one letter, or nothing visible at all (:func:`check_name`). Two names that print
alike are one person: :func:`name_key` folds a name (NFKC, case-folded, spaces collapsed) and
:func:`check_unlike` refuses a new name whose key is that of another person, naming that person.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from facemeta.checks import check_threshold
from facemeta.errors import FacemetaError, GalleryError

UNKNOWN = "unknown"
MAX_NAME = 256
MAX_MARKS = 4  # combining marks stacked on one letter (Vietnamese needs 2, "Zalgo" text dozens)
_BAD_NAME_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_MARKS = frozenset({"Mn", "Mc", "Me"})
# Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt, Unicode 15): drawn as nothing. Most are
# format (Cf) characters, refused anyway; the others (U+034F, the Hangul fillers, the variation selectors,
# U+180B-180F, U+FFF0-FFF8) are marks, letters or unassigned and would pass a category check.
_IGNORABLE = ((0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5),
              (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x3164, 0x3164),
              (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3),
              (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF))
# Blank characters that are neither ignorable nor spaces: drawn as an empty cell.
_FILLERS = frozenset({0x2800, 0x3164, 0xFFA0, 0x115F, 0x1160, 0x2062, 0x1D159})


def invisible(c: str) -> bool:
    """True for a character drawn as nothing: a default-ignorable code point or a blank filler."""
    o = ord(c)
    return o in _FILLERS or any(lo <= o <= hi for lo, hi in _IGNORABLE)


def shown_name(name: str, limit: int = 80) -> str:
    """A name for a message: repr() of its first ``limit`` characters with invisible characters escaped too
    (repr leaves U+034F, the Hangul fillers or U+2800 raw, so a message would hide them), the combining
    marks a name starts with, and runs of more than MAX_MARKS marks."""
    text = repr(name[:limit])
    hide, run = [invisible(c) for c in text], []
    for i, c in enumerate(text + "."):  # runs of marks that would sit on the quote or pile up: escaped
        if unicodedata.category(c) in _MARKS:
            run.append(i)
            continue
        if run and (run[0] == 1 or len(run) > MAX_MARKS):
            for j in run:
                hide[j] = True
        run = []
    return "".join(f"\\u{ord(c):04x}" if h else c for c, h in zip(text, hide, strict=True))


def name_key(name: str) -> str:
    """The form two names are compared in: NFKC (compatibility: full-width, ligatures, no-break spaces),
    case-folded, invisible characters dropped and runs of spaces made one. Names with the same key print
    alike (or differ only in case) and are taken for one person."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())
    return " ".join("".join(c for c in folded if not invisible(c)).split())


def check_unlike(new: Iterable[str], existing: Iterable[str], exempt: str | None = None) -> None:
    """Refuse new names (stored form) when one folds (:func:`name_key`) to the key of an existing name other
    than itself and ``exempt`` (a person being renamed), or of another new name given before it, with a
    one-line GalleryError naming the person it resembles."""
    keys: dict[str, str] = {}
    for other in existing:
        if other != exempt:
            keys.setdefault(name_key(other), other)
    for name in new:
        key = name_key(name)
        other = keys.setdefault(key, name)
        if other != name:
            raise GalleryError(f"identity name {shown_name(name)} looks like {shown_name(other)}, who is already "
                               "in the gallery: names that differ only in case, width, spacing or invisible "
                               "characters are one person (use that name, or one that reads differently)")


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
    shows it escaped: empty, longer than MAX_NAME, the reserved "unknown" (in any case or width), holding a
    control, format (bidi override, zero-width), line/paragraph separator, surrogate, private-use,
    unassigned, default-ignorable or filler character or more than MAX_MARKS stacked combining marks,
    starting with a combining mark, or showing nothing."""
    name = normal_name(name)
    rule = f"1 to {MAX_NAME} printable characters"
    if not name:
        raise GalleryError(f"bad identity name {name!r}: {rule}")
    if len(name) > MAX_NAME:
        raise GalleryError(f"bad identity name {shown_name(name, 40)}... ({len(name)} characters): {rule}")
    marks = 0
    for c in name:
        label = unicodedata.name(c, "")
        what = f"U+{ord(c):04X}{f' {label}' if label else ''}"
        if unicodedata.category(c) in _BAD_NAME_CATEGORIES:
            raise GalleryError(f"bad identity name {shown_name(name)}: {what} "
                               f"is a control, format or separator character; use {rule}")
        if invisible(c):
            raise GalleryError(f"bad identity name {shown_name(name)}: {what} is an invisible (default-ignorable "
                               f"or filler) character; use {rule}")
        marks = marks + 1 if unicodedata.category(c) in _MARKS else 0
        if marks > MAX_MARKS:
            raise GalleryError(f"bad identity name {shown_name(name)}: more than {MAX_MARKS} combining marks on one "
                               f"letter; use {rule}")
    if not name_key(name) or unicodedata.category(name[0]) in _MARKS:
        raise GalleryError(f"bad identity name {shown_name(name)}: it starts with a combining mark or shows nothing; "
                           f"use {rule}")
    if name_key(name) == UNKNOWN:
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

