"""Readers of the four shared face sets (LFW, Extended Yale B, MFR2, ORL) and their pair lists.

Each set becomes a list of :class:`ManifestRow` whose domain is the set's name, whose identity
is the person (folder name) and whose extras carry what the set's own files say (LFW's
``people.txt`` fold, Yale B's lighting angles, MFR2's mask type). Every row has an
``image_index`` (the image's number within its identity). Pair lists (:func:`read_pairs`) name
images by the exact path strings of these rows, so an evaluation maps a pair to rows with a
dictionary lookup.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from facemeta.data.folder import is_image_name
from facemeta.data.manifest import ManifestRow
from facemeta.errors import FacemetaError
from facemeta.paths import DataNotFoundError, data_root
from facemeta.registry import Registry


class SetNotFoundError(DataNotFoundError, FacemetaError):
    """A face set (or a file it needs) is not where it was looked for."""


class DataFormatError(FacemetaError):
    """A data or protocol file does not follow its format (bad line, bad header, bad record)."""


@dataclass(frozen=True)
class Pair:
    """One verification pair: two image paths (as in the set's rows), same person or not, and its fold."""

    a: str
    b: str
    same: bool
    fold: int


# The shared sets: name -> reader of its folder (registered on each reader below, in the order the sets are listed).
SETS: Registry[Callable[..., list[ManifestRow]]] = Registry("set", error=FacemetaError)

# A file or folder inside a set's folder that tells the set apart (to accept the set folder itself as root).
_MARKERS = {"lfw": "images", "yaleb": "yaleB01", "mfr2": "mfr2_labels.txt", "orl": "s1", "ar": "001",
            "thermal": "subsets.txt"}


def set_folder(name: str, root: str | os.PathLike | None = None) -> Path:
    """Folder of set `name`: `root`/name, or `root` itself when it is that set's folder.

    `root` defaults to the data root (``--data``, $FACEMETA_DATA, ../shared/data). Raises
    SetNotFoundError (a FacemetaError and a FileNotFoundError) with the place looked at.
    """
    if name not in SETS:
        raise FacemetaError(f"unknown set '{name}' (known: {', '.join(SETS)})")
    if root is not None and Path(root).expanduser().is_dir():
        base = Path(root).expanduser()
        if not (base / name).is_dir() and (base / _MARKERS[name]).exists():
            return base.resolve()
    try:
        base = data_root(root)
    except DataNotFoundError as exc:
        raise SetNotFoundError(str(exc)) from None
    folder = base / name
    if not folder.is_dir():
        raise SetNotFoundError(f"set '{name}' not found: no folder {folder} (pass --data or set $FACEMETA_DATA)")
    return folder


def _natural_key(text: str) -> list:
    """Sort key that orders 's2' before 's10' and '2.pgm' before '10.pgm'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _subdirs(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return sorted((e for e in it if e.is_dir()), key=lambda e: _natural_key(e.name))


def _files(folder: str) -> list[str]:
    with os.scandir(folder) as it:
        return sorted((e.name for e in it if e.is_file() and is_image_name(e.name)), key=_natural_key)


def _read_lines(path: Path) -> list[str]:
    """Non-empty, stripped lines of a text file (any line ending, UTF-8 with BOM tolerated)."""
    if not path.is_file():
        raise SetNotFoundError(f"file not found: {path}")
    with open(path, encoding="utf-8-sig") as fh:
        return [line.strip() for line in fh if line.strip()]


def _int(text: str, path: Path, line: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataFormatError(f"{path}: expected a number, got {text!r} in line {line!r}") from None


# ----------------------------------------------------------------------------------------------- LFW

LFW_NAME = re.compile(r"^(?P<name>.+)_(?P<num>\d{4})\.jpe?g$", re.IGNORECASE)


def lfw_image_path(folder: Path, name: str, number: int) -> str:
    """Path string of LFW image `number` of person `name` (images/<Name>/<Name>_NNNN.jpg)."""
    return str(folder / "images" / name / f"{name}_{number:04d}.jpg")


def read_people(path: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """LFW people.txt: name -> (fold 1..n, image count). Format: number of folds, then per fold a
    count line followed by that many ``Name<TAB>count`` lines."""
    path = Path(path)
    lines = _read_lines(path)
    if not lines:
        raise DataFormatError(f"{path}: empty file")
    folds = _int(lines[0], path, lines[0])
    people: dict[str, tuple[int, int]] = {}
    pos = 1
    for fold in range(1, folds + 1):
        if pos >= len(lines):
            raise DataFormatError(f"{path}: ends before fold {fold} of {folds}")
        count = _int(lines[pos], path, lines[pos])
        pos += 1
        for line in lines[pos:pos + count]:
            parts = line.split()
            if len(parts) != 2:
                raise DataFormatError(f"{path}: expected 'Name<TAB>count', got {line!r}")
            people[parts[0]] = (fold, _int(parts[1], path, line))
        if pos + count > len(lines):
            raise DataFormatError(f"{path}: fold {fold} announces {count} people but the file ends early")
        pos += count
    if pos != len(lines):
        raise DataFormatError(f"{path}: {len(lines) - pos} line(s) after the last fold")
    return people


@SETS.register("lfw")
def _read_lfw(folder: Path) -> list[ManifestRow]:
    images = folder / "images"
    if not images.is_dir():
        raise SetNotFoundError(f"LFW images folder not found: {images}")
    people_file = folder / "people.txt"
    people = read_people(people_file) if people_file.is_file() else {}
    rows = []
    for person in _subdirs(images):
        fold = str(people[person.name][0]) if person.name in people else ""
        for fname in _files(person.path):
            m = LFW_NAME.match(fname)
            if not m or m["name"] != person.name:
                continue  # not an LFW image of this person (stray file)
            rows.append(ManifestRow(os.path.join(person.path, fname), person.name, "lfw",
                                    {"image_index": str(int(m["num"])), "people_fold": fold}))
    return rows


# ------------------------------------------------------------------------------------ Extended Yale B

YALEB_NAME = re.compile(r"^(?P<subject>yaleB\d+)_P(?P<pose>\d+)A(?P<az>[+-]\d+)E(?P<el>[+-]\d+)\.(png|pgm)$",
                        re.IGNORECASE)
YALEB_AMBIENT = re.compile(r"^(?P<subject>yaleB\d+)_P(?P<pose>\d+)_Ambient\.(png|pgm)$", re.IGNORECASE)


@SETS.register("yaleb")
def _read_yaleb(folder: Path, include_ambient: bool = True) -> list[ManifestRow]:
    rows = []
    for subject in _subdirs(folder):
        index = 0
        for fname in _files(subject.path):
            m = YALEB_NAME.match(fname)
            if m:
                extra = {"azimuth": str(int(m["az"])), "elevation": str(int(m["el"])), "lighting": "directional"}
            elif YALEB_AMBIENT.match(fname):
                if not include_ambient:
                    continue
                extra = {"azimuth": "", "elevation": "", "lighting": "ambient"}
            else:
                continue  # not a Yale B image name
            index += 1
            rows.append(ManifestRow(os.path.join(subject.path, fname), subject.name, "yaleb",
                                    {"image_index": str(index), **extra}))
    return rows


def yaleb_angles(row: ManifestRow) -> tuple[int, int] | None:
    """(azimuth, elevation) in degrees of a Yale B row, or None for an ambient (unlit) image."""
    az, el = row.extra.get("azimuth", ""), row.extra.get("elevation", "")
    return (int(az), int(el)) if az and el else None


# ----------------------------------------------------------------------------------------------- MFR2

MFR2_NAME = re.compile(r"^(?P<name>.+)_(?P<num>\d{4})\.png$", re.IGNORECASE)


def mfr2_image_path(folder: Path, name: str, number: int) -> str:
    """Path string of MFR2 image `number` of person `name` (<Name>/<Name>_NNNN.png)."""
    return str(folder / name / f"{name}_{number:04d}.png")


@SETS.register("mfr2")
def _read_mfr2(folder: Path) -> list[ManifestRow]:
    labels_file = folder / "mfr2_labels.txt"
    masks: dict[tuple[str, int], str] = {}
    if labels_file.is_file():
        for line in _read_lines(labels_file):
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 3:
                raise DataFormatError(f"{labels_file}: expected 'name, index, mask type', got {line!r}")
            masks[(parts[0], _int(parts[1], labels_file, line))] = parts[2]
    rows = []
    for person in _subdirs(folder):
        for fname in _files(person.path):
            m = MFR2_NAME.match(fname)
            if not m or m["name"] != person.name:
                continue
            num = int(m["num"])
            rows.append(ManifestRow(os.path.join(person.path, fname), person.name, "mfr2",
                                    {"image_index": str(num), "index": str(num),
                                     "mask": masks.get((person.name, num), "")}))
    return rows


# ------------------------------------------------------------------------------------------------ ORL

ORL_NAME = re.compile(r"^(?P<num>\d+)\.pgm$", re.IGNORECASE)


@SETS.register("orl")
def _read_orl(folder: Path) -> list[ManifestRow]:
    rows = []
    for subject in _subdirs(folder):
        if not re.fullmatch(r"s\d+", subject.name):
            continue
        for fname in _files(subject.path):
            m = ORL_NAME.match(fname)
            if m:
                num = str(int(m["num"]))
                rows.append(ManifestRow(os.path.join(subject.path, fname), subject.name, "orl",
                                        {"image_index": num, "index": num}))
    return rows


# ------------------------------------------------------------------------------------------------- AR

AR_NAME = re.compile(r"^face_(?P<subject>\d+)_(?P<num>\d{2})\.png$", re.IGNORECASE)
# AR's 13 conditions per session, in its own order (../shared/data/README.md): image yy of session 1 is
# condition yy, of session 2 condition yy - 13. Each condition also has a group (the benchmark's probe domains).
AR_CONDITIONS = ("neutral", "smile", "anger", "scream", "left light", "right light", "both lights", "sunglasses",
                 "sunglasses + left light", "sunglasses + right light", "scarf", "scarf + left light",
                 "scarf + right light")
AR_GROUPS = ("neutral", "expression", "expression", "expression", "light", "light", "light", "sunglasses",
             "sunglasses", "sunglasses", "scarf", "scarf", "scarf")


def ar_condition(number: int) -> tuple[int, str, str]:
    """AR image number 1..26 -> (session 1 or 2, condition, group)."""
    if not 1 <= number <= 26:
        raise DataFormatError(f"AR image numbers run from 01 to 26, not {number:02d}")
    k = (number - 1) % 13
    return (1 if number <= 13 else 2), AR_CONDITIONS[k], AR_GROUPS[k]


@SETS.register("ar")
def _read_ar(folder: Path) -> list[ManifestRow]:
    rows = []
    for subject in _subdirs(folder):
        for fname in _files(subject.path):
            m = AR_NAME.match(fname)
            if not m or m["subject"] != subject.name or not 1 <= int(m["num"]) <= 26:
                continue  # not an AR image of this subject
            num = int(m["num"])
            session, condition, group = ar_condition(num)
            rows.append(ManifestRow(os.path.join(subject.path, fname), subject.name, "ar",
                                    {"image_index": str(num), "session": str(session), "condition": condition,
                                     "group": group}))
    return rows


# -------------------------------------------------------------------------------------------- thermal

THERMAL_SUBSETS = ("GalleryPristine", "ProbePristine", "ProbeNPristine", "PristineProbeCW")


@SETS.register("thermal")
def _read_thermal(folder: Path) -> list[ManifestRow]:
    """Every image named in subsets.txt (``<subset> <id>/<file>``); an image named by several subsets is one row
    whose ``subsets`` extra lists them (``;``-separated, in the file's order)."""
    listing = folder / "subsets.txt"
    subsets: dict[str, list[str]] = {}
    for line in _read_lines(listing):
        parts = line.split()
        if len(parts) != 2 or "/" not in parts[1]:
            raise DataFormatError(f"{listing}: expected '<subset> <id>/<file>', got {line!r}")
        subsets.setdefault(parts[1], [])
        if parts[0] not in subsets[parts[1]]:
            subsets[parts[1]].append(parts[0])
    by_id: dict[str, list[str]] = {}
    for rel in subsets:
        by_id.setdefault(rel.split("/", 1)[0], []).append(rel)
    rows = []
    for identity in sorted(by_id, key=_natural_key):
        for index, rel in enumerate(sorted(by_id[identity], key=_natural_key), start=1):
            path = folder / rel
            if not path.is_file():
                raise SetNotFoundError(f"{listing} names {rel}, which is not on disk")
            rows.append(ManifestRow(str(path), identity, "thermal",
                                    {"image_index": str(index), "subsets": ";".join(subsets[rel])}))
    return rows


SET_NAMES = tuple(SETS)  # the one list of the shared sets: configs, commands and the aligner read it
# tight face crops, or faces cut out and registered (thermal): alignment may fall back to a template crop
PRE_CROPPED_SETS = ("yaleb", "orl", "ar", "thermal")
PAIR_SETS = ("lfw", "mfr2")  # sets with a verification pairs protocol of their own


def read_set(name: str, root: str | os.PathLike | None = None, include_ambient: bool = True) -> list[ManifestRow]:
    """Rows of one shared set ("lfw", "yaleb", "mfr2", "orl", "ar", "thermal"), sorted by identity then image number.

    root: the data folder holding the sets (default: --data / $FACEMETA_DATA / ../shared/data), or
    the set's own folder. include_ambient: keep Yale B's 38 ``*_Ambient`` images (no lamp lit;
    empty azimuth/elevation, ``lighting=ambient``); the README's 2,452 Yale B images count them.
    """
    folder = set_folder(name, root)
    rows = _read_yaleb(folder, include_ambient) if name == "yaleb" else SETS[name](folder)
    if not rows:
        raise SetNotFoundError(f"set '{name}' at {folder} holds no images in its expected layout")
    return rows


# ---------------------------------------------------------------------------------------------- pairs

def _pair_paths(name: str, folder: Path, parts: list[str], path: Path, line: str) -> tuple[str, str, bool]:
    image = lfw_image_path if name == "lfw" else mfr2_image_path
    if len(parts) == 3:
        return (image(folder, parts[0], _int(parts[1], path, line)),
                image(folder, parts[0], _int(parts[2], path, line)), True)
    if len(parts) == 4:
        return (image(folder, parts[0], _int(parts[1], path, line)),
                image(folder, parts[2], _int(parts[3], path, line)), False)
    raise DataFormatError(f"{path}: expected 'name i j' or 'name1 i name2 j', got {line!r}")


def read_pairs(name: str, root: str | os.PathLike | None = None, file: str = "pairs.txt",
               missing: str = "skip") -> list[Pair]:
    """Verification pairs of LFW (pairs.txt, pairsDevTrain.txt, pairsDevTest.txt) or MFR2 (pairs.txt).

    Folds: LFW pairs.txt's header "10 300" gives 10 folds of 300 same then 300 different pairs
    (fold 1..10). A header with one count N (the View 1 files: N same then N different) gets 10
    folds by position within each kind. A file without header (MFR2) gets fold = position * 10 //
    len + 1. missing: "skip" drops (with a warning) pairs naming an image that is not on disk (LFW's
    pairsDevTest.txt names Betsy_Coffin_0001, absent from this copy), "error" raises, "keep" keeps them.
    """
    if name not in ("lfw", "mfr2"):
        raise FacemetaError(f"set '{name}' has no pair list (lfw and mfr2 do; use all pairs of its rows)")
    if missing not in ("skip", "error", "keep"):
        raise ValueError(f"missing must be skip, error or keep, not {missing!r}")
    folder = set_folder(name, root)
    path = folder / file
    lines = _read_lines(path)
    if not lines:
        raise DataFormatError(f"{path}: empty pair list")
    head = lines[0].split()
    pairs: list[Pair] = []
    if all(t.isdigit() for t in head) and len(head) in (1, 2):
        body = lines[1:]
        if len(head) == 2:
            folds, per = int(head[0]), int(head[1])
            if len(body) != 2 * folds * per:
                raise DataFormatError(f"{path}: header says {folds} folds of 2x{per} pairs, "
                                      f"found {len(body)} lines")
            for i, line in enumerate(body):
                a, b, same = _pair_paths(name, folder, line.split(), path, line)
                if same != (i % (2 * per) < per):
                    raise DataFormatError(f"{path}: line {i + 2} is a {'same' if same else 'different'} pair "
                                          f"where the fold layout expects the other kind: {line!r}")
                pairs.append(Pair(a, b, same, i // (2 * per) + 1))
        else:
            count = int(head[0])
            if len(body) != 2 * count:
                raise DataFormatError(f"{path}: header says {count} same + {count} different pairs, "
                                      f"found {len(body)} lines")
            for i, line in enumerate(body):
                a, b, same = _pair_paths(name, folder, line.split(), path, line)
                if same != (i < count):
                    raise DataFormatError(f"{path}: line {i + 2}: expected the first {count} pairs same "
                                          f"and the rest different: {line!r}")
                pairs.append(Pair(a, b, same, (i % count) * 10 // count + 1))
    else:
        for i, line in enumerate(lines):
            a, b, same = _pair_paths(name, folder, line.split(), path, line)
            pairs.append(Pair(a, b, same, i * 10 // len(lines) + 1))
    if missing == "keep":
        return pairs
    exists: dict[str, bool] = {}
    kept = []
    for p in pairs:
        absent = [x for x in (p.a, p.b) if not exists.setdefault(x, os.path.isfile(x))]
        if not absent:
            kept.append(p)
        elif missing == "error":
            raise SetNotFoundError(f"{path}: pair names a missing image: {absent[0]}")
    if len(kept) < len(pairs):
        warnings.warn(f"{path}: dropped {len(pairs) - len(kept)} pair(s) naming images not on disk",
                      stacklevel=2)
    return kept
