"""Readers of the shared sets and their pair lists, checked against the real files in ../shared/data."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from facemeta.data.sets import (
    SETS,
    DataFormatError,
    SetNotFoundError,
    read_pairs,
    read_people,
    read_set,
    yaleb_angles,
)
from facemeta.errors import FacemetaError
from facemeta.paths import DataNotFoundError


@pytest.fixture(scope="module")
def lfw_rows(data_dir):
    return read_set("lfw", data_dir)


def test_lfw_counts_and_folds(lfw_rows, data_dir):
    # README: 13,232 images; people.txt lists 5,749 people, but Betsy_Coffin (1 image) is absent here.
    assert len(lfw_rows) == 13232
    people = read_people(data_dir / "lfw" / "people.txt")
    assert len(people) == 5749
    identities = Counter(r.identity for r in lfw_rows)
    assert len(identities) == 5748
    assert set(people) - set(identities) == {"Betsy_Coffin"}
    # people.txt's per-person image counts match the files, and every row carries its fold
    assert all(people[name][1] == n for name, n in identities.items())
    assert all(r.extra["people_fold"] == str(people[r.identity][0]) for r in lfw_rows)
    per_fold = Counter(people[name][0] for name in identities)
    assert sorted(per_fold) == list(range(1, 11))
    assert per_fold[1] == 601  # the first fold header of people.txt says 601 people
    george = [r for r in lfw_rows if r.identity == "George_W_Bush"]
    assert len(george) == 530
    assert george[9].path.endswith("lfw/images/George_W_Bush/George_W_Bush_0010.jpg")
    assert george[9].extra["image_index"] == "10"
    assert {r.domain for r in lfw_rows} == {"lfw"}
    assert all(Path(r.path).is_absolute() for r in lfw_rows[:50])


def test_yaleb_counts_angles_and_ambient(data_dir):
    rows = read_set("yaleb", data_dir)
    assert len(rows) == 2452 and len({r.identity for r in rows}) == 38
    ambient = [r for r in rows if r.extra["lighting"] == "ambient"]
    assert len(ambient) == 38 and all(yaleb_angles(r) is None for r in ambient)
    lit = read_set("yaleb", data_dir, include_ambient=False)
    assert len(lit) == 2414 and all(r.extra["lighting"] == "directional" for r in lit)
    angles = {yaleb_angles(r) for r in lit}
    assert len(angles) == 64  # the 64 lamp positions
    assert (0, 0) in angles and (-130, 20) in angles and (130, 20) in angles
    assert min(a for a, _ in angles) == -130 and max(e for _, e in angles) == 90
    row = next(r for r in lit if r.path.endswith("yaleB01_P00A-010E+00.png"))
    assert (row.identity, row.extra["azimuth"], row.extra["elevation"]) == ("yaleB01", "-10", "0")
    # subjects with missing lightings: yaleB11 has 60 lit images + 1 ambient
    assert Counter(r.identity for r in rows)["yaleB11"] == 61
    assert "yaleB14" not in {r.identity for r in rows}


def test_mfr2_counts_and_masks(data_dir):
    rows = read_set("mfr2", data_dir)
    assert len(rows) == 269 and len({r.identity for r in rows}) == 53
    masks = Counter(r.extra["mask"] for r in rows)
    assert "" not in masks and masks["no-mask"] == 98 and masks["cloth_textured"] == 50
    first = rows[0]
    assert first.identity == "AdrianDunbar" and first.extra == {"image_index": "1", "index": "1",
                                                                "mask": "surgical_blue"}


def test_orl_counts_and_order(data_dir):
    rows = read_set("orl", data_dir)
    assert len(rows) == 400
    counts = Counter(r.identity for r in rows)
    assert len(counts) == 40 and set(counts.values()) == {10}
    # natural order: s1 1..10, then s2 (not s10)
    assert [r.extra["index"] for r in rows[:10]] == [str(i) for i in range(1, 11)]
    assert rows[10].identity == "s2"
    # the set's own folder is accepted as root too
    assert [r.path for r in read_set("orl", data_dir / "orl")] == [r.path for r in rows]


def test_lfw_pairs_map_onto_rows(lfw_rows, data_dir):
    paths = {r.path: r.identity for r in lfw_rows}
    pairs = read_pairs("lfw", data_dir)
    assert len(pairs) == 6000
    assert Counter((p.fold, p.same) for p in pairs) == {(f, s): 300 for f in range(1, 11) for s in (True, False)}
    assert all(p.a in paths and p.b in paths for p in pairs)
    assert all((paths[p.a] == paths[p.b]) == p.same for p in pairs)
    assert pairs[0].a.endswith("Abel_Pacheco/Abel_Pacheco_0001.jpg") and pairs[0].b.endswith("_0004.jpg")
    dev_train = read_pairs("lfw", data_dir, file="pairsDevTrain.txt")
    assert len(dev_train) == 2200 and sum(p.same for p in dev_train) == 1100
    assert Counter(p.fold for p in dev_train) == {f: 220 for f in range(1, 11)}
    # pairsDevTest names Betsy_Coffin_0001.jpg, which this copy lacks
    with pytest.warns(UserWarning, match="dropped 1 pair"):
        dev_test = read_pairs("lfw", data_dir, file="pairsDevTest.txt")
    assert len(dev_test) == 999 and all(p.a in paths and p.b in paths for p in dev_test)
    assert len(read_pairs("lfw", data_dir, file="pairsDevTest.txt", missing="keep")) == 1000
    with pytest.raises(SetNotFoundError, match="Betsy_Coffin"):
        read_pairs("lfw", data_dir, file="pairsDevTest.txt", missing="error")


def test_mfr2_pairs(data_dir):
    rows = {r.path: r.identity for r in read_set("mfr2", data_dir)}
    pairs = read_pairs("mfr2", data_dir)
    assert len(pairs) == 848 and sum(p.same for p in pairs) == 424
    assert all((rows[p.a] == rows[p.b]) == p.same for p in pairs)
    folds = Counter(p.fold for p in pairs)
    assert sorted(folds) == list(range(1, 11)) and set(folds.values()) == {84, 85}
    assert pairs[0].same and pairs[0].a.endswith("MitchMcConnell/MitchMcConnell_0003.png")


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(SetNotFoundError, match="set 'lfw' not found") as err:
        read_set("lfw", tmp_path)
    assert isinstance(err.value, FacemetaError) and isinstance(err.value, DataNotFoundError)
    with pytest.raises(SetNotFoundError, match="not found"):
        read_set("orl", tmp_path / "nowhere")
    with pytest.raises(FacemetaError, match="unknown set"):
        read_set("casia", tmp_path)
    with pytest.raises(FacemetaError, match="no pair list"):
        read_pairs("orl", tmp_path)
    (tmp_path / "yaleb").mkdir()
    with pytest.raises(SetNotFoundError, match="holds no images"):
        read_set("yaleb", tmp_path)
    assert set(SETS) == {"lfw", "yaleb", "mfr2", "orl", "ar", "thermal"}


def _mini_lfw(src: Path, dst: Path) -> Path:
    """A user's own small LFW copy: two people, real images, with its own protocol files."""
    for name, n in (("Aaron_Peirsol", 4), ("Zico", 3)):
        (dst / "lfw" / "images" / name).mkdir(parents=True)
        for i in range(1, n + 1):
            shutil.copy(src / "lfw" / "images" / name / f"{name}_{i:04d}.jpg", dst / "lfw" / "images" / name)
    (dst / "lfw" / "people.txt").write_text("2\n1\nAaron_Peirsol\t4\n1\nZico\t3\n")
    return dst / "lfw"


def test_user_copy_and_malformed_protocol_files(data_dir, tmp_path):
    folder = _mini_lfw(data_dir, tmp_path)
    rows = read_set("lfw", tmp_path)
    assert [(r.identity, r.extra["people_fold"]) for r in rows] == [("Aaron_Peirsol", "1")] * 4 + [("Zico", "2")] * 3
    (folder / "pairs.txt").write_text("1\t1\nAaron_Peirsol\t1\t2\nAaron_Peirsol\t1\tZico\t3\n")
    pairs = read_pairs("lfw", tmp_path)
    assert [(p.same, p.fold) for p in pairs] == [(True, 1), (False, 1)]
    assert pairs[1].b == next(r.path for r in rows if r.path.endswith("Zico_0003.jpg"))
    (folder / "pairs.txt").write_text("1\t1\nAaron_Peirsol\t1\tZico\t3\nAaron_Peirsol\t1\t2\n")
    with pytest.raises(DataFormatError, match="other kind"):
        read_pairs("lfw", tmp_path)
    (folder / "pairs.txt").write_text("1\t1\nAaron_Peirsol\tone\t2\nAaron_Peirsol\t1\tZico\t3\n")
    with pytest.raises(DataFormatError, match="expected a number"):
        read_pairs("lfw", tmp_path)
    (folder / "pairs.txt").write_text("1\t2\nAaron_Peirsol\t1\t2\n")
    with pytest.raises(DataFormatError, match="header says"):
        read_pairs("lfw", tmp_path)
    (folder / "people.txt").write_text("2\n1\nAaron_Peirsol\t4\n5\nZico\t3\n")
    with pytest.raises(DataFormatError, match="ends early"):
        read_set("lfw", tmp_path)
    with pytest.raises(SetNotFoundError, match="pairsDevTrain"):
        read_pairs("lfw", tmp_path, file="pairsDevTrain.txt")
