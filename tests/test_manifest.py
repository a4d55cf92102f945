"""Manifest CSV round trip and row helpers, on the real ORL file list."""

from __future__ import annotations

import pytest

from facemeta.data.folder import image_folder
from facemeta.data.manifest import (
    ManifestError,
    first_per_identity,
    format_landmarks,
    parse_landmarks,
    read_manifest,
    write_manifest,
)


def test_round_trip_keeps_extras_and_resolves_paths(data_dir, tmp_path):
    rows = image_folder(data_dir / "orl")
    assert len(rows) == 400 and len({r.identity for r in rows}) == 40
    rows[0].extra["landmarks"] = format_landmarks([(1, 2), (3, 4), (5, 6), (7, 8), (9, 10.5)])
    path = write_manifest(rows, tmp_path / "m.csv")
    back = read_manifest(path)
    assert [(r.path, r.identity, r.domain) for r in back] == [(r.path, r.identity, r.domain) for r in rows]
    assert parse_landmarks(back[0].get("landmarks"))[4] == (9.0, 10.5)
    assert back[1].get("landmarks") == "" and back[1].get("relpath") == rows[1].extra["relpath"]
    (tmp_path / "bad.csv").write_text("file,who\nx,y\n")
    with pytest.raises(ManifestError, match="missing column"):
        read_manifest(tmp_path / "bad.csv")


def test_first_per_identity(data_dir):
    rows = image_folder(data_dir / "orl")
    two = first_per_identity(rows, 2)
    assert len(two) == 80
    assert all(sum(r.identity == i for r in two) == 2 for i in {r.identity for r in rows})
    assert [r.path for r in two if r.identity == "s1"] == [r.path for r in rows if r.identity == "s1"][:2]
    assert len(first_per_identity(rows, None)) == 400
