"""Alignment pipeline on real samples of every shared set: success rates, landmark error, routes,
failure records, resumability and the aligned-set cache."""

from __future__ import annotations

import csv
import json
import random
import re

import cv2
import numpy as np
import pytest

from facemeta.align.cache import aligned_set
from facemeta.align.detect import FaceDetector
from facemeta.align.pipeline import JOURNAL, ROUTES, align_image, align_rows, fit_error
from facemeta.align.warp import alignment_matrix, template, transform_points
from facemeta.data.manifest import ManifestRow, parse_landmarks, read_manifest
from facemeta.images import load_image


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """In-process detection on one torch thread (workers use one each anyway): on a busy 2-core
    machine two OpenMP threads per process slow MTCNN down several-fold."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _landmark_error(row) -> float:
    """Mean distance (112-px) of the detected landmarks, moved by the fitted warp, to the template;
    recomputed here from the manifest rather than trusting the stored fit_error."""
    pts = np.array(parse_landmarks(row.extra["landmarks"]), dtype=np.float64)
    moved = transform_points(pts, alignment_matrix(pts, 112))
    return float(np.linalg.norm(moved - template(112), axis=1).mean())


@pytest.mark.parametrize("name", ["lfw", "mfr2", "orl"])
def test_sample_success_and_landmark_error(aligned_sample, name):
    rows, aligned, failures = aligned_sample(name, 40)
    assert len(aligned) + len(failures) == len(rows) == 40
    assert len(aligned) / len(rows) >= 0.99, failures
    detected = [r for r in aligned if r.extra["route"] != "template-crop"]
    assert len(detected) >= 0.95 * len(rows)
    errors = [_landmark_error(r) for r in detected]
    assert float(np.mean(errors)) < 3.0
    assert np.allclose(errors, [float(r.extra["fit_error"]) for r in detected], atol=0.01)
    for r in aligned[:5]:
        face = cv2.imread(r.path)
        assert face.shape == (112, 112, 3)
        assert r.extra["source"] in {x.path for x in rows}
        assert r.extra["route"] in ROUTES and float(r.extra["score"]) > 0.5
        assert r.extra["image_index"]  # the source row's extras are kept


def _yaleb_check(rows, aligned, failures, landmark_rate: float, usable_rate: float):
    assert len(aligned) + len(failures) == len(rows)
    with_landmarks = [r for r in aligned if r.extra["route"] != "template-crop"]
    assert len(with_landmarks) >= landmark_rate * len(rows)
    assert len(aligned) >= usable_rate * len(rows)
    assert np.mean([_landmark_error(r) for r in with_landmarks]) < 3.0
    # the aligned faces of one subject overlap: eyes where the template wants them
    routes = {r.extra["route"] for r in aligned}
    assert routes & {"padded", "equalised", "relaxed"}  # the fallbacks did the work
    for r in with_landmarks:
        pts = np.array(parse_landmarks(r.extra["landmarks"]))
        iod = np.linalg.norm(pts[1] - pts[0]) / 168
        assert 0.4 < iod < 0.75, (r.path, iod)  # a whole face, not a nose or an eye, and not oversized


def test_yaleb_tight_dark_crops_small(aligned_sample):
    rows, aligned, failures = aligned_sample("yaleb", 40, frontal_yaleb=True)
    _yaleb_check(rows, aligned, failures, landmark_rate=0.9, usable_rate=0.99)


def test_yaleb_tight_dark_crops_200(data_dir, tmp_path):
    """The issue's acceptance: 200 Yale B images lit within 60/45 deg, >= 90% with detector
    landmarks (aim 95%) and >= 99% usable."""
    pat = re.compile(r"_P00A([+-]\d+)E([+-]\d+)\.png$")
    files = [p for p in sorted((data_dir / "yaleb").rglob("*.png"))
             if (m := pat.search(p.name)) and abs(int(m[1])) <= 60 and abs(int(m[2])) <= 45]
    sample = random.Random(0).sample(files, 200)
    rows = [ManifestRow(str(p), p.parent.name, "yaleb", {}) for p in sample]
    aligned, failures = align_rows(rows, tmp_path / "yb", workers=2, pre_cropped=True, progress=False)
    _yaleb_check(rows, aligned, failures, landmark_rate=0.95, usable_rate=0.99)


def test_align_image_routes(data_dir):
    det = FaceDetector()
    lfw = load_image(data_dir / "lfw" / "images" / "Colin_Powell" / "Colin_Powell_0001.jpg")
    res = align_image(lfw, det, size=96)
    assert res.route == "direct" and res.error is None and res.face.shape == (96, 96, 3)
    assert res.fit_error == pytest.approx(fit_error(res.landmarks))
    # a Yale B crop: MTCNN's direct box overflows the frame, the padded canvas finds the face
    yb = load_image(data_dir / "yaleb" / "yaleB01" / "yaleB01_P00A+000E+00.png")
    res = align_image(yb, det, pre_cropped=True)
    assert res.route == "padded" and res.landmarks is not None
    assert (res.landmarks[:, 0] > 0).all() and (res.landmarks[:, 1] > 0).all()
    # the chosen face's box, mapped back to the crop's pixels like its landmarks, and around them
    x1, y1, x2, y2 = res.box[:4]
    assert x1 < res.landmarks[:, 0].min() and res.landmarks[:, 0].max() < x2
    assert y1 < res.landmarks[:, 1].min() and res.landmarks[:, 1].max() < y2
    flat = np.full((150, 150, 3), 90, np.uint8)
    assert align_image(flat, det).error == "no face"
    crop = align_image(flat, det, pre_cropped=True)
    assert crop.route == "template-crop" and crop.face.shape == (112, 112, 3) and crop.landmarks is None
    assert crop.box is None


def _bad_tree(root, data_dir):
    """identity/ tree: 3 good LFW images, and each kind of bad file the issue names."""
    from tests.test_images import bad_files

    good = data_dir / "lfw" / "images" / "Aaron_Sorkin" / "Aaron_Sorkin_0001.jpg"
    (root / "alice").mkdir(parents=True)
    (root / "bob").mkdir()
    for k, name in enumerate(["Colin_Powell/Colin_Powell_0001.jpg", "Colin_Powell/Colin_Powell_0002.jpg"]):
        (root / "alice" / f"a{k}.jpg").write_bytes((data_dir / "lfw" / "images" / name).read_bytes())
    (root / "bob" / "b0.jpg").write_bytes(good.read_bytes())
    scratch = root.parent / "scratch"
    scratch.mkdir()
    for kind, path in bad_files(scratch, good).items():
        path.rename(root / "bob" / f"bad_{kind}{path.suffix}")
    rng = np.random.default_rng(3)
    cv2.imwrite(str(root / "bob" / "noise.png"), rng.integers(0, 256, (160, 160, 3), dtype=np.uint8))
    return root


def test_failures_recorded_and_resume(data_dir, tmp_path):
    from facemeta.data.folder import image_folder

    src = _bad_tree(tmp_path / "src", data_dir)
    rows = image_folder(src)
    dst = tmp_path / "dst"
    stats: dict = {}
    aligned, failures = align_rows(rows, dst, workers=1, progress=False, stats=stats)
    assert stats["images"] == 8 and stats["aligned"] == 3 and stats["skipped"] == 0
    reasons = {f["path"].rsplit("/", 1)[1]: f["reason"] for f in failures}
    assert reasons == {"bad_empty.jpg": "unreadable", "bad_truncated.jpg": "unreadable",
                       "bad_text.jpg": "unreadable", "bad_huge.png": "unreadable", "noise.png": "no face"}
    with open(dst / "failures.csv", newline="") as fh:
        recs = list(csv.DictReader(fh))
    assert len(recs) == 5 and all(r["reason"] and "\n" not in r["detail"] for r in recs)
    manifest = read_manifest(dst / "manifest.csv")
    assert sorted(r.identity for r in manifest) == ["alice", "alice", "bob"]
    assert (dst / "alice" / "a0.png").is_file() and (dst / "bob" / "b0.png").is_file()
    for r in manifest:
        assert r.extra["route"] == "direct" and len(parse_landmarks(r.extra["landmarks"])) == 5
        assert float(r.extra["score"]) > 0.9 and r.extra["relpath"]
    # second run: everything is already done
    mtime = (dst / "alice" / "a0.png").stat().st_mtime_ns
    stats2: dict = {}
    aligned2, failures2 = align_rows(rows, dst, workers=1, progress=False, stats=stats2)
    assert stats2["skipped"] == 8 and len(aligned2) == 3 and len(failures2) == 5
    assert (dst / "alice" / "a0.png").stat().st_mtime_ns == mtime
    # an interrupted run: one output lost and a half-written journal line -> only that image again
    (dst / "alice" / "a1.png").unlink()
    with open(dst / JOURNAL, "a") as fh:
        fh.write('{"src": "cut mid-li')
    stats3: dict = {}
    align_rows(rows, dst, workers=1, progress=False, stats=stats3)
    assert stats3["skipped"] == 7 and (dst / "alice" / "a1.png").is_file()


def test_several_faces_policy(data_dir, tmp_path):
    from tests.test_align_detect import two_face_photo

    names = ["Aaron_Sorkin/Aaron_Sorkin_0001.jpg", "Colin_Powell/Colin_Powell_0001.jpg"]
    images = [load_image(data_dir / "lfw" / "images" / n) for n in names]
    (tmp_path / "src" / "group").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "src" / "group" / "two.png"), cv2.cvtColor(two_face_photo(images), cv2.COLOR_RGB2BGR))
    rows = [ManifestRow(str(tmp_path / "src" / "group" / "two.png"), "group", "test", {})]
    aligned, failures = align_rows(rows, tmp_path / "single", workers=1, progress=False, select="single")
    assert not aligned and failures[0]["reason"] == "several faces"
    aligned, failures = align_rows(rows, tmp_path / "largest", workers=1, progress=False, select="largest")
    assert len(aligned) == 1 and int(aligned[0].extra["faces"]) >= 2
    pts = np.array(parse_landmarks(aligned[0].extra["landmarks"]))
    assert pts[:, 0].max() < 320  # the larger, left face


def test_size_mismatch_refused(data_dir, tmp_path):
    from facemeta.errors import FacemetaError

    rows = [ManifestRow(str(data_dir / "orl" / "s1" / "1.pgm"), "s1", "orl", {})]
    align_rows(rows, tmp_path / "d", size=112, workers=1, progress=False)
    assert json.loads((tmp_path / "d" / ".align-config.json").read_text())["size"] == 112
    with pytest.raises(FacemetaError, match="size 112"):
        align_rows(rows, tmp_path / "d", size=96, workers=1, progress=False)


def test_aligned_set_cache(data_dir, tmp_path):
    rows = aligned_set("orl", size=64, data=data_dir, cache=tmp_path, limit_per_identity=1)
    assert len(rows) == 40 and len({r.identity for r in rows}) == 40
    dst = tmp_path / "aligned" / "orl-64"
    assert (dst / "manifest.csv").is_file()
    assert cv2.imread(rows[0].path).shape == (64, 64, 3)
    lines = (dst / JOURNAL).read_text().count("\n")
    again = aligned_set("orl", size=64, data=data_dir, cache=tmp_path, limit_per_identity=1)
    assert [r.path for r in again] == [r.path for r in rows]
    assert (dst / JOURNAL).read_text().count("\n") == lines  # nothing was aligned twice
