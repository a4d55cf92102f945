"""The one route from an image to its faces (issue 27): training alignment and every inference caller find,
choose and warp the same face; the subject policy; alignment recorded with the model and the cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from facemeta.align.detect import Face, competing_note, select_faces, subject_score


def _face(x1, y1, side, score=0.99):
    box = np.array([x1, y1, x1 + side, y1 + side], np.float32)
    pts = np.array([[0.3, 0.35], [0.7, 0.35], [0.5, 0.55], [0.35, 0.75], [0.65, 0.75]], np.float32) * side
    return Face(box, score, pts + np.array([x1, y1], np.float32))


def test_subject_policy_prefers_the_central_face_over_a_larger_bystander_at_the_edge():
    centre = _face(45, 45, 60)           # a 60-px face in the middle of a 150-px photo (LFW's framing)
    bystander = _face(0, 80, 66)         # 10% larger, in a corner
    assert select_faces([centre, bystander], "largest") == [bystander]
    assert select_faces([centre, bystander], "subject", (150, 150)) == [centre]
    assert subject_score(centre, 150, 150) > subject_score(bystander, 150, 150)
    # a face much larger than the central one is the subject wherever it is (size still counts)
    close_up = _face(10, 20, 120)
    assert select_faces([centre, close_up], "subject", (150, 150)) == [close_up]
    with pytest.raises(ValueError, match="shape"):
        select_faces([centre], "subject")
    with pytest.raises(ValueError, match="smallest"):
        select_faces([centre], "smallest")


def test_competing_faces_are_reported():
    left, right = _face(20, 45, 50), _face(80, 45, 50)  # two equal faces either side of the centre
    note = competing_note([left, right], 150, 150)
    assert note is not None and "2 faces compete" in note
    assert competing_note([_face(45, 45, 60), _face(0, 0, 25)], 150, 150) is None
    assert competing_note([left], 150, 150) is None


@pytest.fixture(scope="module")
def photos(data_dir):
    from facemeta.images import load_image

    names = ["Colin_Powell/Colin_Powell_0001.jpg", "Tony_Blair/Tony_Blair_0003.jpg",
             "George_W_Bush/George_W_Bush_0010.jpg", "Bill_Gates/Bill_Gates_0001.jpg"]
    out = [load_image(data_dir / "lfw" / "images" / n) for n in names]
    out.append(load_image(data_dir / "yaleb" / "yaleB01" / "yaleB01_P00A+000E+00.png"))  # a tight grey crop
    return out


def test_product_and_training_alignment_warp_the_same_face(photos, data_dir):
    """What verify, enroll, identify and serve embed is, pixel for pixel, what the training folder job saves."""
    from facemeta.align.pipeline import align_batch
    from facemeta.embedder import FaceEmbedder

    embedder = FaceEmbedder()  # the shipped model (v3: an ensemble; its first chip is dlib's, 150 px)
    ours = embedder.faces_in_images(photos)
    per_chip = []
    for chip, size in embedder.chips:  # every chip of an ensemble: what the training folder job saves for it
        training = align_batch(photos, embedder.detector, size, chip=chip)
        for found, res in zip(ours, training, strict=True):
            assert len(found) == 1 and res.face is not None
            assert np.allclose(found[0].face.landmarks, res.landmarks)
        per_chip.append(np.stack([r.face for r in training]))
    assert all(np.array_equal(f[0].crop, c) for f, c in zip(ours, per_chip[0], strict=True))  # the first chip's
    # the crops (of every chip) are what was embedded
    again = embedder.embed_aligned(per_chip if embedder.ensemble else per_chip[0])
    assert np.allclose(again, np.stack([f[0].vector for f in ours]), atol=1e-5)
    # identify (every face) gives each of these faces the very crop verify and enroll give it
    every = embedder.faces_in_images(photos, every=True)
    for found, one in zip(every, ours, strict=True):
        assert sum(np.array_equal(f.crop, one[0].crop) for f in found) == 1
    # the path wrapper takes the same route
    vec, _ = embedder.embed_file(data_dir / "lfw" / "images" / "Colin_Powell" / "Colin_Powell_0001.jpg")
    assert np.allclose(vec, ours[0][0].vector, atol=1e-5)


def test_a_model_aligned_onto_another_template_is_refused(tmp_path):
    from facemeta.embedder import check_model_meta
    from facemeta.errors import CheckpointError

    ok = check_model_meta({"align_chip": "dlib", "align_size": 150}, tmp_path / "m.json")
    assert ok["align_chip"] == "dlib"
    with pytest.raises(CheckpointError, match="another dlib template") as err:
        check_model_meta({"align_chip": "dlib", "align_size": 150, "align_template": "0123456789ab"},
                         tmp_path / "m.json")
    assert "\n" not in str(err.value)
    from facemeta.embedder import WEIGHTS_DIR

    shipped = json.loads((WEIGHTS_DIR / "default.json").read_text())
    check_model_meta(shipped["meta"], "default.json")  # the shipped model records today's digest


def test_aligned_cache_records_the_template_and_carries_single_faces_over(tmp_path, data_dir):
    """A cache folder's config names the template; from version 5 only the images with several faces are
    aligned again, and a cache made with another template starts afresh."""
    from facemeta.align import pipeline
    from facemeta.align.warp import template_digest

    dst = tmp_path / "aligned"
    dst.mkdir()
    records = [{"src": "a.jpg", "ok": True, "route": "direct", "faces": 1},
               {"src": "b.jpg", "ok": True, "route": "direct", "faces": 3},
               {"src": "c.jpg", "ok": False, "reason": "no face"}]
    (dst / pipeline.JOURNAL).write_text("".join(json.dumps(r) + "\n" for r in records))
    (dst / pipeline.CONFIG).write_text(json.dumps({"size": 112, "version": 5}))
    pipeline._check_config(dst, 112)
    cfg = json.loads((dst / pipeline.CONFIG).read_text())
    assert cfg["version"] == pipeline.PIPELINE_VERSION and cfg["template"] == template_digest("arcface")
    kept = pipeline._read_journal(dst / pipeline.JOURNAL)
    assert set(kept) == {"a.jpg", "c.jpg"}  # b.jpg had three faces: the subject policy may choose another
    assert (dst / f"{pipeline.JOURNAL}.v5").is_file()
    # another template: nothing is carried over
    (dst / pipeline.CONFIG).write_text(json.dumps({**cfg, "template": "ffffffffffff"}))
    pipeline._check_config(dst, 112)
    assert not (dst / pipeline.JOURNAL).exists()
    assert json.loads((dst / pipeline.CONFIG).read_text())["template"] == template_digest("arcface")
