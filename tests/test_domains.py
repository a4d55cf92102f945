"""Named domains of a gallery (issue 25): statistics from unlabelled photos, stored with the gallery, applied to
enroll, identify and verify exactly as domain_stats' formula says, re-normalising enrolled people without images.

Real AR photos with the shipped model (weights/default.safetensors): scarf photos of people 051-054 make the
"scarf" domain, neutral photos of people 055-058 the "neutral" one; people 001-002 are enrolled (neutral) and
probed with their scarf photos. Every expected score is recomputed here by hand from raw embeddings, with the
gallery's rule (``offset``) written out from the model's source statistics (meta ``domain_reference``).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from facemeta.cli import main
from facemeta.errors import FacemetaError, GalleryError

pytestmark = pytest.mark.usefixtures("module_on_one_torch_thread")


def ar(data_dir: Path, person: int, shot: int) -> Path:
    return data_dir / "ar" / f"{person:03d}" / f"face_{person:03d}_{shot:02d}.png"


_REF: dict = {}  # the shipped model's source statistics (meta domain_reference), set by the embedder fixture


def strength_by_hand(photos: np.ndarray) -> float:
    """The offset rule's strength, written out: 0.5 x gate(z) x reliability, with d = mean - source mean,
    spread = sum |x - mean|^2 / (n - 1), noise = spread / n, z = (|d|^2 - noise) / spread, gate 0 below z 0.15 and
    1 above 0.25, reliability = 1 - noise / |d|^2 (at least 0)."""
    x = np.asarray(photos, np.float64)
    n, mean = len(x), x.mean(axis=0)
    spread = ((x - mean) ** 2).sum() / (n - 1)
    d2 = ((mean - _REF["mean"]) ** 2).sum()
    z = (d2 - spread / n) / spread
    return 0.5 * min(max((z - 0.15) / 0.1, 0.0), 1.0) * max(0.0, 1 - (spread / n) / d2)


def by_hand(raw: np.ndarray, photos: np.ndarray | None) -> np.ndarray:
    """A vector normalised by its domain's photo vectors, written out: moved by s (mean - source mean), s from
    :func:`strength_by_hand`, then scaled to unit length."""
    v = np.asarray(raw, np.float64)
    if photos is not None:
        v = v - strength_by_hand(photos) * (np.asarray(photos, np.float64).mean(axis=0) - _REF["mean"])
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def embedder():
    from facemeta.embedder import FaceEmbedder

    e = FaceEmbedder()
    _REF["mean"] = np.asarray(e.meta["domain_reference"]["stats"]["mean"], np.float64)
    return e


@pytest.fixture(scope="module")
def photos(data_dir) -> dict[str, list[Path]]:
    return {"scarf": [ar(data_dir, p, 11) for p in (51, 52, 53, 54)],
            "neutral": [ar(data_dir, p, 1) for p in (55, 56, 57, 58)],
            "more_neutral": [ar(data_dir, p, 14) for p in (59, 60)],
            "enrolled": [ar(data_dir, p, 1) for p in (1, 2)],
            "probes": [ar(data_dir, p, 11) for p in (1, 2)]}


@pytest.fixture(scope="module")
def raw(embedder, photos) -> dict[str, np.ndarray]:
    """Raw embeddings (as the model gives them) of every photo the tests use, computed once."""
    return {k: np.stack([embedder.embed_file(p)[0] for p in v]) for k, v in photos.items()}


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, embedder, photos):
    """A gallery with domains scarf and neutral and people p1, p2 enrolled under neutral (from copies of their
    photos, deleted afterwards: nothing later may need them)."""
    from facemeta.recognizer import FaceRecognizer

    root = tmp_path_factory.mktemp("domains")
    path = root / "g"
    with FaceRecognizer(path, embedder=embedder) as fr:
        r = fr.add_domain("scarf", photos["scarf"])
        assert r.added == 4 and r.warning and "4 photo(s)" in r.warning
        fr.add_domain("neutral", photos["neutral"])
        for i, src in enumerate(photos["enrolled"], 1):
            copy = root / f"copy{i}.png"
            shutil.copy(src, copy)
            fr.enroll(f"p{i}", [copy], domain="neutral")
            copy.unlink()
    return path


def test_stats_and_scores_follow_the_formula(gallery, embedder, raw):
    """The domain's mean is the mean of its photos' raw vectors; identify's and verify's scores are the cosines
    of the by-hand normalised vectors (probe by its domain, enrolled by theirs)."""
    from facemeta.recognizer import FaceRecognizer

    with FaceRecognizer(gallery, embedder=embedder) as fr:
        scarf = fr.domain("scarf")
        assert scarf.photos == 4 and scarf.stats.kind == "offset"
        assert scarf.stats.strength == pytest.approx(strength_by_hand(raw["scarf"]), abs=1e-5)
        assert 0 < scarf.stats.strength <= 0.5  # AR lies far from the model's source photos
        np.testing.assert_allclose(scarf.stats.mean, raw["scarf"].mean(axis=0), atol=1e-6)
        x = raw["scarf"].astype(np.float64)  # stability: the relative standard error of the mean, by hand
        cov_trace = ((x - x.mean(axis=0)) ** 2).sum() / (len(x) - 1)
        assert scarf.stability == pytest.approx(np.sqrt(cov_trace / len(x)) / np.linalg.norm(x.mean(axis=0)), rel=1e-4)
        faces = fr.identify(str(_probe(gallery)), top_k=2, domain="scarf")
        got = {c["identity"]: c["score"] for c in faces[0]["candidates"]}
        probe = by_hand(raw["probes"][0], raw["scarf"])
        for i, name in enumerate(("p1", "p2")):
            want = float(probe @ by_hand(raw["enrolled"][i], raw["neutral"]))
            assert got[name] == pytest.approx(want, abs=2e-5)
        plain = fr.identify(str(_probe(gallery)), top_k=2)  # no domain: the raw probe against the stored vectors
        got_plain = {c["identity"]: c["score"] for c in plain[0]["candidates"]}
        want_plain = float(by_hand(raw["probes"][0], None) @ by_hand(raw["enrolled"][0], raw["neutral"]))
        assert got_plain["p1"] == pytest.approx(want_plain, abs=2e-5)
        assert abs(got_plain["p1"] - got["p1"]) > 1e-3  # the domain changed the score

        v = fr.verify(_photo(gallery, "enrolled", 0), _probe(gallery), domain_a="neutral", domain_b="scarf")
        want = float(by_hand(raw["enrolled"][0], raw["neutral"]) @ by_hand(raw["probes"][0], raw["scarf"]))
        assert v.score == pytest.approx(want, abs=2e-5)
        entry = embedder.meta.get("domain_threshold")  # the model's threshold for normalised vectors, if it has one
        assert (v.threshold, v.threshold_far) == ((entry["threshold"], entry["far"]) if entry else
                                                  (embedder.threshold, None))  # raw threshold: FAR unknown
        raw_v = fr.verify(_photo(gallery, "enrolled", 0), _probe(gallery))
        assert raw_v.score == pytest.approx(float(raw["enrolled"][0] @ raw["probes"][0]), abs=2e-5)


_PHOTOS: dict = {}


def _probe(gallery: Path) -> Path:
    return _PHOTOS["probes"][0]


def _photo(gallery: Path, key: str, i: int) -> Path:
    return _PHOTOS[key][i]


@pytest.fixture(scope="module", autouse=True)
def _photo_table(photos):
    _PHOTOS.update(photos)


def test_adding_photos_renormalises_enrolled_without_images(gallery, tmp_path, embedder, raw, photos):
    """The enrolled photos were deleted; adding photos to their domain re-normalises their stored vectors (new
    ids, raw kept) by the new mean, the index follows, and a photo counted already is skipped."""
    from facemeta.gallery import Gallery
    from facemeta.gallery.domains import raw_vectors
    from facemeta.recognizer import FaceRecognizer

    gallery = shutil.copytree(gallery, tmp_path / "g")
    with Gallery.open(gallery) as g:
        before = {r.identity: r.id for r in g.records()}
    with FaceRecognizer(gallery, embedder=embedder) as fr:
        r = fr.add_domain("neutral", photos["neutral"][:1] + photos["more_neutral"])
        assert (r.added, r.already) == (2, 1) and r.domain.photos == 6 and r.domain.enrolled == 2
    all_neutral = np.concatenate([raw["neutral"], raw["more_neutral"]])
    with Gallery.open(gallery, mode="w") as g:
        after = {r.identity: r.id for r in g.records()}
        assert all(after[k] > before[k] for k in before)  # stored again under new ids
        stored, names = raw_vectors(g, [after["p1"], after["p2"]])
        np.testing.assert_array_equal(stored, raw["enrolled"].astype(np.float32))
        assert names == ["neutral", "neutral"]
        for i, name in enumerate(("p1", "p2")):
            np.testing.assert_allclose(g.vectors(name)[0], by_hand(raw["enrolled"][i], all_neutral), atol=2e-6)
        hits = g.search(by_hand(raw["enrolled"][0], all_neutral).astype(np.float32), k=1)
        assert hits[0][0].name == "p1" and hits[0][0].score == pytest.approx(1.0, abs=1e-5)
        assert g.check()["index_matches_database"]


GALLERY_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from facemeta.gallery import Gallery
    from facemeta.gallery.domains import add_photos
    g = Gallery.open(sys.argv[1], mode="w")
    x = np.load(sys.argv[2])
    add_photos(g, "neutral", x, fingerprint=g.fingerprint, sources=[None] * len(x), content_hashes=[None] * len(x))
    g.close()
""")


def _state(path: Path) -> tuple:
    with sqlite3.connect(path / "gallery.sqlite") as conn:
        return (conn.execute("SELECT COUNT(*) FROM domain_photos").fetchone()[0],
                conn.execute("SELECT stats FROM domains WHERE name='neutral'").fetchone()[0],
                sorted(conn.execute("SELECT id, vector FROM embeddings").fetchall()))


@pytest.mark.parametrize("point", ["before_commit", "after_commit"])
def test_kill_during_domain_add_loses_nothing(gallery, tmp_path, raw, point):
    """kill -9 inside `domain add`'s transaction leaves the gallery as it was; right after its commit, the whole
    change is there and the index catches up on the next open."""
    from facemeta.gallery import Gallery

    g_path = tmp_path / "g"
    shutil.copytree(gallery, g_path)
    before = _state(g_path)
    np.save(tmp_path / "x.npy", raw["probes"])
    env = dict(os.environ, FACEMETA_GALLERY_FAULT=point, OMP_NUM_THREADS="1")
    if point == "before_commit":  # the command itself, killed inside its transaction
        cmd = ["-m", "facemeta", "domain", "add", str(g_path), "neutral", *map(str, _PHOTOS["probes"])]
    else:  # the same call the command makes, killed right after its commit
        cmd = ["-c", GALLERY_SCRIPT, str(g_path), str(tmp_path / "x.npy")]
    proc = subprocess.run([sys.executable, *cmd], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    after = _state(g_path)
    if point == "before_commit":
        assert after == before
    else:
        assert after[0] == before[0] + 2 and after[1] != before[1] and after[2] != before[2]
    with Gallery.open(g_path, mode="w") as g:
        assert g.check()["index_matches_database"] and g.check()["database"] == "ok"
        assert {p.name for p in g.identities()} == {"p1", "p2"}


def test_cli_domain_commands(gallery, tmp_path, capsys, data_dir, embedder):
    """list, export, verify --domains without a gallery (same score as with it), calibrate, identify --json and
    remove through the command line."""
    g = tmp_path / "g"
    shutil.copytree(gallery, g)
    assert main(["domain", "list", str(g), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {d["name"]: d["photos"] for d in listed["domains"]} == {"neutral": 4, "scarf": 4}
    for name in ("neutral", "scarf"):
        assert main(["domain", "export", str(g), name, str(tmp_path / f"{name}.json")]) == 0
    capsys.readouterr()
    a, b = _PHOTOS["enrolled"][0], _PHOTOS["probes"][0]
    argv = ["verify", str(a), str(b), "--domain-a", "neutral", "--domain-b", "scarf", "--json"]
    assert main(argv + ["--gallery", str(g)]) == 0
    with_gallery = json.loads(capsys.readouterr().out)
    assert main(argv + ["--domains", str(tmp_path / "neutral.json"), "--domains", str(tmp_path / "scarf.json")]) == 0
    without = json.loads(capsys.readouterr().out)
    assert without["score"] == with_gallery["score"] and without["domain_b"] == "scarf"
    assert main(["verify", str(b), "--gallery", str(g), "--person", "p1", "--json"]) == 0  # no domain: as before
    plain = json.loads(capsys.readouterr().out)
    assert main(["verify", str(b), "--gallery", str(g), "--person", "p1", "--domain-a", "scarf", "--json"]) == 0
    person = json.loads(capsys.readouterr().out)
    assert person["score"] == with_gallery["score"] != plain["score"]  # p1's one photo, probe normalised as scarf

    distinct = tmp_path / "distinct"
    distinct.mkdir()
    for p in (61, 62, 63, 64, 65):
        shutil.copy(ar(data_dir, p, 11), distinct / f"{p}.png")
    assert main(["domain", "calibrate", str(g), "scarf", "--distinct", str(distinct), "--far", "0.1", "--json"]) == 0
    cal = json.loads(capsys.readouterr().out)["domain"]
    assert cal["calibration_pairs"] == 10 and cal["far"] == 0.1
    assert main(["identify", str(g), str(b), "--domain", "scarf", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["threshold"] == cal["threshold"] and out["threshold_far"] == 0.1
    assert out["threshold_source"].startswith("domain scarf")

    assert main(["domain", "remove", str(g), "neutral"]) == 1  # people are enrolled under it
    assert "2 enrolled embedding(s)" in capsys.readouterr().err
    assert main(["domain", "remove", str(g), "scarf"]) == 0
    assert main(["domain", "remove", str(g), "neutral", "--force", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["moved_to_default"] == 2
    from facemeta.gallery import Gallery

    with Gallery.open(g) as gal:  # back to their raw vectors
        np.testing.assert_array_equal(gal.vectors("p1")[0], embedder.embed_file(a)[0])


def test_another_models_domain_is_refused(gallery, tmp_path, embedder, raw):
    from facemeta.gallery import Gallery
    from facemeta.gallery.domain_files import write_domain_file
    from facemeta.gallery.domains import add_photos, get_domain
    from facemeta.recognizer_domains import load_domain_file

    out = write_domain_file(Gallery.open(gallery), "scarf", tmp_path / "scarf.json")
    body = json.loads(out.read_text())
    assert load_domain_file(out, embedder).fingerprint == embedder.fingerprint
    body["fingerprint"] = "another-model"
    out.write_text(json.dumps(body))
    with pytest.raises(GalleryError, match="another-model"):
        load_domain_file(out, embedder)
    g_path = tmp_path / "g"
    shutil.copytree(gallery, g_path)
    with Gallery.open(g_path, mode="w") as g:
        with pytest.raises(GalleryError, match="model"):
            add_photos(g, "scarf", raw["probes"], fingerprint="another-model", sources=[None, None],
                       content_hashes=[None, None])
    with sqlite3.connect(g_path / "gallery.sqlite") as conn:
        conn.execute("UPDATE domains SET fingerprint='another-model' WHERE name='scarf'")
    with Gallery.open(g_path) as g, pytest.raises(GalleryError, match="made with model another-model"):
        get_domain(g, "scarf")


def test_domain_names_are_checked(tmp_path, embedder, photos):
    from facemeta.recognizer import FaceRecognizer

    with FaceRecognizer(tmp_path / "g", embedder=embedder) as fr:
        for bad in ("", "unknown", "door\u202e2", "x" * 300):
            with pytest.raises(GalleryError, match="domain name|reserved"):
                fr.add_domain(bad, photos["scarf"][:1])
        assert not fr.exists()  # refused before anything was written
        fr.add_domain("Door-2", photos["scarf"][:1])
        with pytest.raises(GalleryError, match="looks like"):
            fr.add_domain("door-2", photos["scarf"][1:2])  # another domain's name but for its case
        with pytest.raises(FacemetaError, match="domain"):
            fr.enroll("p1", photos["enrolled"][:1], domain="nowhere")


def test_cli_few_photos_warning_and_bad_images(tmp_path, capsys, data_dir):
    """A folder with a file that is not an image and a photo without a face: both reported and skipped, the
    rest counted, the gallery created, and a warning with the count."""
    folder = tmp_path / "door"
    folder.mkdir()
    for p in (70, 71):
        shutil.copy(ar(data_dir, p, 8), folder / f"{p}.png")
    (folder / "broken.png").write_bytes(b"not an image at all")
    (folder / "black.png").write_bytes(_black_png())
    code = main(["domain", "add", str(tmp_path / "g"), "door", "--folder", str(folder), "--json"])
    captured = capsys.readouterr()
    assert code == 0
    out = json.loads(captured.out)
    assert out["added"] == 2 and out["domain"]["photos"] == 2
    assert {Path(p).name for p, _ in out["skipped"]} == {"broken.png", "black.png"}
    assert "rests on 2 photo(s)" in captured.err and "broken.png" in captured.err
    code = main(["domain", "add", str(tmp_path / "g"), "door", "--folder", str(folder)])
    assert code == 0 and "0 photo(s) added, 2 already counted" in capsys.readouterr().out


def _black_png() -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", np.zeros((120, 120), np.uint8))
    return buf.tobytes()


def test_http_domains(gallery, tmp_path, embedder, raw):
    """GET/POST/DELETE /api/domains, and the domain fields of identify, verify and enroll, with the same scores as
    the Python API's formula."""
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from facemeta.serve.app import create_app
    from facemeta.serve.service import FaceService

    g = shutil.copytree(gallery, tmp_path / "g")
    service = FaceService(g, embedder=embedder, slots=1)
    client = TestClient(create_app(service))
    listed = client.get("/api/domains").json()
    assert {d["name"] for d in listed["domains"]} == {"neutral", "scarf"} and "default" in listed

    def files(*paths):
        return [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]

    r = client.post("/api/domains", data={"name": "sunglasses"}, files=files(*_PHOTOS["more_neutral"]))
    assert r.status_code == 201 and r.json()["added"] == 2 and "2 photo(s)" in r.json()["warning"]
    assert client.post("/api/domains", data={"name": "unknown"}, files=files(_PHOTOS["probes"][0])).status_code == 422

    probe = _PHOTOS["probes"][0]
    r = client.post("/api/identify", data={"domain": "scarf", "top_k": "2"},
                    files={"image": (probe.name, probe.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    want = float(by_hand(raw["probes"][0], raw["scarf"]) @ by_hand(raw["enrolled"][0], raw["neutral"]))
    got = {c["identity"]: c["score"] for c in body["faces"][0]["candidates"]}
    assert got["p1"] == pytest.approx(want, abs=2e-5) and body["domain"] == "scarf" and "threshold_source" in body

    a = _PHOTOS["enrolled"][0]
    r = client.post("/api/verify", data={"domain_a": "neutral", "domain_b": "scarf"},
                    files={"a": (a.name, a.read_bytes(), "image/png"), "b": (probe.name, probe.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    entry = embedder.meta.get("domain_threshold")
    assert r.json()["score"] == pytest.approx(want, abs=2e-5)
    assert r.json()["threshold_far"] == (entry["far"] if entry else None)

    r = client.post("/api/enroll", data={"name": "p3", "domain": "scarf"}, files=files(probe))
    assert r.status_code == 201, r.text
    assert client.delete("/api/domains/scarf").status_code == 409  # p3 is enrolled under it
    assert client.delete("/api/domains", params={"name": "sunglasses"}).json()["removed"] == "sunglasses"
    assert client.delete("/api/domains/nowhere").status_code == 404
    service.close()


def _domain_rows(path: Path) -> dict:
    """Everything a gallery stores about its domains, bytes as stored (embeddings keyed by identity and vector)."""
    with sqlite3.connect(path / "gallery.sqlite") as conn:
        return {"domains": conn.execute("SELECT name, fingerprint, stats, threshold, far, calibration_pairs "
                                        "FROM domains ORDER BY name").fetchall(),
                "photos": conn.execute("SELECT domain, content_hash, source, vector FROM domain_photos "
                                       "ORDER BY domain, id").fetchall(),
                "rows": sorted(conn.execute("SELECT i.name, e.vector, e.raw, e.domain FROM embeddings e JOIN "
                                            "identities i ON i.id = e.identity_id").fetchall())}


@pytest.mark.parametrize("backend", ["faiss", "milvus"])
def test_export_import_keeps_domains_bit_for_bit(gallery, tmp_path, raw, backend):
    """A gallery export carries its domains (statistics, photos, each enrolled row's domain and raw vector); an
    import into a new gallery (FAISS or Milvus Lite) stores them byte for byte, searches the same, and a later
    add re-normalises the imported people. Importing into a gallery that has the domain already is refused."""
    if backend == "milvus":
        pytest.importorskip("pymilvus")
        pytest.importorskip("milvus_lite")
    from facemeta.gallery import Gallery
    from facemeta.gallery.domains import add_photos
    from facemeta.gallery.portable import export_gallery, import_gallery

    with Gallery.open(gallery) as g:
        export_gallery(g, tmp_path / "g.fmg")
    import_gallery(tmp_path / "g.fmg", tmp_path / "copy", create_kwargs={"backend": backend})
    assert _domain_rows(tmp_path / "copy") == _domain_rows(gallery)
    query = by_hand(raw["probes"][0], raw["scarf"]).astype(np.float32)
    with Gallery.open(gallery) as a, Gallery.open(tmp_path / "copy", mode="w") as b:
        assert b.backend == backend
        ha, hb = a.search(query, k=2)[0], b.search(query, k=2)[0]
        assert [m.name for m in ha] == [m.name for m in hb]
        assert [m.score for m in ha] == pytest.approx([m.score for m in hb], abs=1e-6)
        add_photos(b, "neutral", raw["more_neutral"], fingerprint=b.fingerprint, sources=[None, None],
                   content_hashes=[None, None])
        all_neutral = np.concatenate([raw["neutral"], raw["more_neutral"]])
        np.testing.assert_allclose(b.vectors("p1")[0], by_hand(raw["enrolled"][0], all_neutral), atol=2e-6)
        assert b.check()["index_matches_database"]
    with pytest.raises(GalleryError, match="already has a domain"):
        import_gallery(tmp_path / "g.fmg", tmp_path / "copy")


def test_photo_domain_near_the_source_stays_raw(tmp_path, embedder, data_dir):
    """Ten LFW photos of ten people (the model's source domain, people apart from its reference photos' folds)
    make a domain at strength 0: people enrolled under it are stored exactly as the model embeds them, so a
    comparison with them is raw whatever the other side's domain."""
    from facemeta.data.sets import read_set
    from facemeta.gallery import Gallery
    from facemeta.recognizer import FaceRecognizer

    rows = [r for r in read_set("lfw", data_dir) if r.extra.get("people_fold") == "7"]
    seen, chosen = set(), []
    for r in rows:
        if r.identity not in seen:
            seen.add(r.identity)
            chosen.append(Path(r.path))
        if len(chosen) == 11:
            break
    with FaceRecognizer(tmp_path / "g", embedder=embedder) as fr:
        d = fr.add_domain("photo", chosen[:10]).domain
        assert d.stats.kind == "offset" and d.stats.strength == 0.0
        fr.enroll("someone", [chosen[10]], domain="photo")
    with Gallery.open(tmp_path / "g") as g:
        np.testing.assert_array_equal(g.vectors("someone")[0], embedder.embed_file(chosen[10])[0])


def test_model_without_source_statistics_uses_the_plain_mean(gallery, tmp_path, capsys, raw, embedder):
    """A domain made without the model's source statistics (a model whose meta has no domain_reference) is the
    plain mean at strength 1, as before the offset rule, and `domain list` says so; its comparisons use the
    model's threshold for mean-normalised vectors (meta domain_threshold_mean), not the offset one."""
    from facemeta.gallery import Gallery
    from facemeta.gallery.domains import add_photos
    from facemeta.recognizer import FaceRecognizer

    g = shutil.copytree(gallery, tmp_path / "g")
    with Gallery.open(g, mode="w") as gal:
        d = add_photos(gal, "plain", raw["scarf"], fingerprint=gal.fingerprint, sources=[None] * 4,
                       content_hashes=[None] * 4)
    assert d.stats.kind == "mean" and d.stats.strength == 1.0
    np.testing.assert_allclose(d.stats.mean, raw["scarf"].mean(axis=0), atol=1e-6)
    assert main(["domain", "list", str(g)]) == 0
    out = capsys.readouterr().out
    assert "note: not the offset rule in plain" in out and "neutral" not in out.split("\n")[1]
    with FaceRecognizer(g, embedder=embedder) as fr:
        thr, far, _ = fr.threshold_for("plain")
        mean_entry, offset_entry = embedder.meta["domain_threshold_mean"], embedder.meta["domain_threshold"]
        assert (thr, far) == (mean_entry["threshold"], mean_entry["far"]) and thr != offset_entry["threshold"]
        assert fr.threshold_for("scarf")[0] == offset_entry["threshold"]
        assert fr.threshold_for("scarf", other="plain")[2].startswith("gallery")  # two scales: no model entry
