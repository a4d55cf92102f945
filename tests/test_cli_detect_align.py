"""`facemeta detect` and `facemeta align` end to end on real images and on the issue's bad inputs."""

from __future__ import annotations

import json

import cv2
import pytest

from facemeta.cli import main
from facemeta.data.manifest import read_manifest

pytestmark = pytest.mark.usefixtures("module_on_one_torch_thread")


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_is_fast_and_complete(capsys):
    for cmd in ("detect", "align"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "usage: facemeta " + cmd in out


def test_detect_json_and_annotated(data_dir, tmp_path, capsys):
    img = data_dir / "lfw" / "images" / "Colin_Powell" / "Colin_Powell_0001.jpg"
    save = tmp_path / "out" / "annotated.jpg"
    code, out, err = run_cli(capsys, "detect", img, "--json", "--save", save)
    assert code == 0, err
    res = json.loads(out)
    assert res["width"] == 150 and len(res["faces"]) >= 1
    face = res["faces"][0]
    assert face["score"] > 0.95 and len(face["box"]) == 4 and len(face["landmarks"]) == 5
    drawn = cv2.imread(str(save))
    assert drawn.shape == (150, 150, 3)
    assert (cv2.absdiff(drawn, cv2.imread(str(img))) > 60).any()  # boxes and points were drawn
    code, out, _ = run_cli(capsys, "detect", img)
    assert code == 0 and "face" in out.splitlines()[0] and "score" in out


def test_detect_tight_crop_uses_padding(data_dir, capsys):
    code, out, err = run_cli(capsys, "detect", data_dir / "yaleb" / "yaleB01" / "yaleB01_P00A+000E+00.png", "--json")
    assert code == 0, err
    lm = json.loads(out)["faces"][0]["landmarks"]
    assert all(0 <= x <= 168 and 0 <= y <= 192 for x, y in lm)


def test_detect_bad_inputs_one_line_errors(data_dir, tmp_path, capsys):
    import numpy as np

    from tests.test_images import bad_files

    files = bad_files(tmp_path, data_dir / "lfw" / "images" / "Aaron_Sorkin" / "Aaron_Sorkin_0001.jpg")
    noface = tmp_path / "wall.png"
    lfw = cv2.imread(str(data_dir / "lfw" / "images" / "Tony_Blair" / "Tony_Blair_0002.jpg"))
    cv2.imwrite(str(noface), cv2.resize(lfw[:40, :40], (160, 160)))  # background corner of a news photo
    flat = tmp_path / "flat.png"
    cv2.imwrite(str(flat), np.full((120, 120, 3), 200, np.uint8))
    cases = {**files, "noface": noface, "flat": flat, "missing": tmp_path / "missing.jpg"}
    for kind, path in cases.items():
        code, out, err = run_cli(capsys, "detect", path)
        assert code == 1, kind
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("facemeta detect: error:") and str(path) in lines[0], kind
        assert "Traceback" not in err and out == ""
    _, _, err = run_cli(capsys, "detect", noface)
    assert "no face" in err


def test_align_folder_then_resume(data_dir, tmp_path, capsys):
    from tests.test_align_pipeline import _bad_tree

    src = _bad_tree(tmp_path / "src", data_dir)
    dst = tmp_path / "dst"
    code, out, err = run_cli(capsys, "align", src, dst, "--workers", "2", "--size", "96")
    assert code == 0, err
    assert "aligned 3 of 8 images" in out and "failed 5" in out and "unreadable 4" in out and "no face 1" in out
    rows = read_manifest(dst / "manifest.csv")
    assert len(rows) == 3 and cv2.imread(rows[0].path).shape == (96, 96, 3)
    assert {"score", "landmarks", "route", "source"} <= set(rows[0].extra)
    code, out, err = run_cli(capsys, "align", src, dst, "--workers", "2", "--size", "96", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["skipped"] == 8 and summary["aligned"] == 3 and summary["reasons"] == {"unreadable": 4, "no face": 1}


def test_align_shared_set_name_with_data_option(data_dir, tmp_path, capsys):
    """`facemeta align orl DST --data ROOT` on a two-subject copy of ORL (pre-cropped by default)."""
    root = tmp_path / "data"
    for s in ("s1", "s2"):
        (root / "orl" / s).mkdir(parents=True)
        for i in (1, 2, 3):
            (root / "orl" / s / f"{i}.pgm").write_bytes((data_dir / "orl" / s / f"{i}.pgm").read_bytes())
    code, out, err = run_cli(capsys, "align", "orl", tmp_path / "out", "--data", root, "--workers", "1", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["images"] == 6 and summary["aligned"] == 6 and summary["pre_cropped"] is True
    rows = read_manifest(tmp_path / "out" / "manifest.csv")
    assert {r.identity for r in rows} == {"s1", "s2"} and all(r.domain == "orl" for r in rows)


def test_align_bad_source(tmp_path, capsys):
    code, _, err = run_cli(capsys, "align", tmp_path / "nowhere", tmp_path / "dst")
    assert code == 1 and "not a folder nor a shared set name" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "align", tmp_path / "empty", tmp_path / "dst")
    assert code == 1 and "no images found" in err
