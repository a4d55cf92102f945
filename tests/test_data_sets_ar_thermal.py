"""The AR and thermal shared sets (issue 25): readers, conditions, subsets, and their refusals."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest

from facemeta.data.sets import DataFormatError, SetNotFoundError, ar_condition, read_set


def test_ar_rows_conditions_and_sessions(data_dir):
    rows = read_set("ar", data_dir)
    assert len(rows) == 2600
    per_person = Counter(r.identity for r in rows)
    assert len(per_person) == 100 and set(per_person.values()) == {26}
    by_name = {r.path.rsplit("/", 1)[1]: r for r in rows}
    assert by_name["face_001_01.png"].extra["condition"] == "neutral"
    assert by_name["face_001_11.png"].extra == {"image_index": "11", "session": "1", "condition": "scarf",
                                               "group": "scarf"}
    assert by_name["face_001_21.png"].extra["condition"] == "sunglasses"  # 21 - 13 = 8
    assert by_name["face_001_21.png"].extra["session"] == "2"
    assert Counter(r.extra["group"] for r in rows) == {"neutral": 200, "expression": 600, "light": 600,
                                                       "sunglasses": 600, "scarf": 600}
    assert all(r.domain == "ar" for r in rows)


def test_ar_condition_refuses_numbers_outside_1_to_26():
    assert ar_condition(14) == (2, "neutral", "neutral")
    for bad in (0, 27):
        with pytest.raises(DataFormatError, match="01 to 26"):
            ar_condition(bad)


def test_thermal_subsets_and_open_set_people(data_dir):
    rows = read_set("thermal", data_dir)
    assert len(rows) == 410 and len({r.identity for r in rows}) == 82
    subsets = Counter(s for r in rows for s in r.extra["subsets"].split(";"))
    assert subsets == {"GalleryPristine": 164, "ProbePristine": 123, "ProbeNPristine": 123, "PristineProbeCW": 246}
    enrolled = {r.identity for r in rows if "GalleryPristine" in r.extra["subsets"]}
    strangers = {r.identity for r in rows if "ProbeNPristine" in r.extra["subsets"]}
    assert len(enrolled) == 41 and len(strangers) == 41 and not enrolled & strangers


def test_set_folder_itself_as_root(data_dir):
    assert len(read_set("thermal", data_dir / "thermal")) == 410
    assert len(read_set("ar", data_dir / "ar")) == 2600


def test_thermal_bad_subsets_file_and_missing_image(data_dir, tmp_path):
    copy = tmp_path / "thermal"
    shutil.copytree(data_dir / "thermal" / "02463", copy / "02463")
    listing = [line for line in (data_dir / "thermal" / "subsets.txt").read_text().splitlines()
               if "02463/" in line]
    (copy / "subsets.txt").write_text("\n".join(listing) + "\n")
    assert len(read_set("thermal", tmp_path)) == 7
    (copy / "subsets.txt").write_text("\n".join(listing) + "\nGalleryPristine 02463/nothere.tiff\n")
    with pytest.raises(SetNotFoundError, match="nothere.tiff"):
        read_set("thermal", tmp_path)
    (copy / "subsets.txt").write_text("GalleryPristine\n")
    with pytest.raises(DataFormatError, match="subsets.txt"):
        read_set("thermal", tmp_path)
