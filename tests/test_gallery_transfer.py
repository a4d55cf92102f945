"""`facemeta gallery export|import` and facemeta.gallery.portable: a gallery as one portable, checksummed file.

Synthetic unit vectors through the Gallery API (no model is needed: the file carries vectors, not photos).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from facemeta.cli import main
from facemeta.errors import GalleryError
from facemeta.gallery import Gallery, IndexSpec, portable
from facemeta.gallery.portable import MAGIC, export_gallery, import_gallery, read_export

DIM = 32
FP = "model-a"
PEOPLE = ["ada", "grace", "Zoë Ångström 李", "linus"]


def sample(seed: int, n: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_gallery(path: Path, fingerprint: str = FP, seed: int = 0) -> Path:
    """Four people, 3 to 6 rows each, with None among the sources, scores and content hashes."""
    names = [p for i, p in enumerate(PEOPLE) for _ in range(3 + i)]
    n = len(names)
    with Gallery.create(path, dim=DIM, fingerprint=fingerprint, index=IndexSpec(kind="hnsw", m=16), scoring="mean",
                        threshold=0.42) as g:
        g.enroll_many(names, sample(seed, n), fingerprint=fingerprint,
                      sources=[f"photos/{i}.jpg" if i % 3 else None for i in range(n)],
                      scores=[0.5 + i / 100 if i % 2 else None for i in range(n)],
                      content_hashes=[f"{seed}-{i:04x}" if i % 4 else None for i in range(n)])
    return path


@pytest.fixture
def source(tmp_path) -> Path:
    return make_gallery(tmp_path / "source")


def exported(gallery: Path, out: Path) -> Path:
    with Gallery.open(gallery, load_index=False) as g:
        export_gallery(g, out)
    return out


def contents(path: Path) -> dict:
    """Everything a gallery keeps of its people (ids and times aside) and its settings."""
    with Gallery.open(path, load_index=False) as g:
        people = {p.name: ([(r.source, r.score, r.content_hash, r.fingerprint) for r in g.records(p.name)],
                           g.vectors(p.name)) for p in g.identities()}
        return {"people": people, "dim": g.dim, "fingerprint": g.fingerprint, "threshold": g.threshold,
                "scoring": g.scoring, "spec": g.spec}


def test_export_holds_every_row_bit_for_bit(source, tmp_path):
    out = tmp_path / "people.fmg"
    with Gallery.open(source, load_index=False) as g:
        summary = export_gallery(g, out)
        gallery_id = g.gallery_id
    data = out.read_bytes()
    assert data.startswith(MAGIC) and summary["bytes"] == len(data) and summary["people"] == 4
    assert summary["sha256"] == hashlib.sha256(data[:-72]).hexdigest() and data.endswith(f"{summary['sha256']}\n".encode())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    header, chunks = read_export(out)
    assert (header["version"], header["dim"], header["fingerprint"], header["backend"]) == (1, DIM, FP, "faiss")
    assert (header["people"], header["embeddings"], header["gallery_id"]) == (4, 18, gallery_id)
    assert (header["threshold"], header["scoring"], header["index"]["kind"], header["index"]["m"]) == (0.42, "mean", "hnsw", 16)
    rows = [(name, vec.tobytes()) for c in chunks for name, vec in zip(c.names, c.vectors, strict=True)]
    want = contents(source)["people"]
    assert rows == [(name, v.tobytes()) for name in sorted(want) for v in want[name][1]]


def test_round_trip_keeps_people_provenance_settings_and_answers(source, tmp_path):
    copy = tmp_path / "copy"
    summary = import_gallery(exported(source, tmp_path / "f"), copy)
    assert summary["new"] and (summary["people"], summary["embeddings"], summary["skipped"]) == (4, 18, 0)
    a, b = contents(source), contents(copy)
    assert {k: a[k] for k in ("dim", "fingerprint", "threshold", "scoring", "spec")} == \
           {k: b[k] for k in ("dim", "fingerprint", "threshold", "scoring", "spec")}
    assert sorted(b["people"]) == sorted(PEOPLE)
    for name, (records, vectors) in a["people"].items():
        assert b["people"][name][0] == records
        assert np.array_equal(b["people"][name][1].view(np.uint32), vectors.view(np.uint32))  # bit for bit
    queries = sample(7, 6)
    with Gallery.open(source) as ga, Gallery.open(copy) as gb:
        for ma, mb in zip(ga.identify(queries, threshold=-1), gb.identify(queries, threshold=-1), strict=True):
            assert ma.name == mb.name and ma.score == pytest.approx(mb.score, abs=1e-6)


def test_round_trip_between_backends_is_lossless(source, tmp_path):
    """FAISS -> file -> Milvus Lite -> file -> FAISS: the same names, provenance and vectors bit for bit,
    and the same answers on both backends."""
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    on_milvus = tmp_path / "milvus"
    import_gallery(exported(source, tmp_path / "f1"), on_milvus, create_kwargs={"backend": "milvus"})
    back = tmp_path / "faiss-again"
    import_gallery(exported(on_milvus, tmp_path / "f2"), back)
    a, m, b = contents(source), contents(on_milvus), contents(back)
    for other in (m, b):
        assert sorted(other["people"]) == sorted(a["people"])
        for name, (records, vectors) in a["people"].items():
            assert other["people"][name][0] == records
            assert np.array_equal(other["people"][name][1].view(np.uint32), vectors.view(np.uint32))
    queries = sample(7, 6)
    with Gallery.open(source) as ga, Gallery.open(on_milvus) as gm:
        assert gm.backend == "milvus"
        for ma, mb in zip(ga.identify(queries, threshold=-1), gm.identify(queries, threshold=-1), strict=True):
            assert ma.name == mb.name and ma.score == pytest.approx(mb.score, abs=1e-5)


def test_chunks_and_batches(source, tmp_path, monkeypatch):
    monkeypatch.setattr(portable, "CHUNK_ROWS", 4)
    out = exported(source, tmp_path / "f")
    assert sum(len(c.names) for c in read_export(out)[1]) == 18
    seen = []
    import_gallery(out, tmp_path / "copy", batch_rows=5, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (18, 18) and len(seen) == 5
    assert contents(tmp_path / "copy")["people"].keys() == contents(source)["people"].keys()


def test_empty_gallery_round_trip(tmp_path):
    Gallery.create(tmp_path / "empty", dim=DIM, fingerprint=FP).close()
    summary = import_gallery(exported(tmp_path / "empty", tmp_path / "f"), tmp_path / "copy")
    assert (summary["people"], summary["embeddings"], summary["total"]) == (0, 0, 0)
    assert contents(tmp_path / "copy")["fingerprint"] == FP


def test_import_into_existing_gallery_adds_people_and_skips_what_it_has(source, tmp_path):
    out = exported(source, tmp_path / "f")
    target = make_gallery(tmp_path / "target", seed=1)  # same names, other photos
    summary = import_gallery(out, target)
    assert not summary["new"] and (summary["embeddings"], summary["skipped"], summary["total"]) == (18, 0, 36)
    again = import_gallery(out, target)  # everything is there now, with or without a content hash
    assert (again["embeddings"], again["skipped"], again["total"]) == (0, 18, 36)
    assert import_gallery(out, source)["embeddings"] == 0
    assert contents(target)["threshold"] == 0.42 and len(contents(target)["people"]["ada"][0]) == 6


def test_another_model_is_refused_unless_overridden(source, tmp_path):
    out = exported(source, tmp_path / "f")
    other = make_gallery(tmp_path / "other", fingerprint="model-b", seed=1)
    with pytest.raises(GalleryError, match="model 'model-a'.*model 'model-b'.*any-model") as err:
        import_gallery(out, other)
    assert "\n" not in str(err.value) and len(contents(other)["people"]["ada"][0]) == 3
    assert import_gallery(out, other, fingerprint_override=True)["embeddings"] == 18
    assert {r[3] for r in contents(other)["people"]["ada"][0]} == {"model-b"}

    with pytest.raises(GalleryError, match="model 'model-a'"):
        import_gallery(out, tmp_path / "new", expected_fingerprint="model-c")
    assert not (tmp_path / "new").exists()
    summary = import_gallery(out, tmp_path / "new", expected_fingerprint="model-c", fingerprint_override=True)
    assert summary["fingerprint"] == "model-c" and contents(tmp_path / "new")["fingerprint"] == "model-c"

    Gallery.create(tmp_path / "wide", dim=DIM * 2, fingerprint=FP).close()
    with pytest.raises(GalleryError, match="32-d embeddings.*64-d"):
        import_gallery(out, tmp_path / "wide", fingerprint_override=True)


def rewrite(out: Path, edit) -> None:
    """Change an export's body with ``edit`` and give it a valid checksum again."""
    before = out.read_bytes()[:-72]
    body = edit(before)
    assert body != before
    out.write_bytes(body + f"SHA256 {hashlib.sha256(body).hexdigest()}\n".encode())


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-1], "is truncated"),
    (lambda b: b[:len(b) // 2], "is truncated"),
    (lambda b: b[:10], "is not a facemeta gallery export"),
    (lambda b: b"", "is not a facemeta gallery export"),
    (lambda b: b[:400] + bytes([b[400] ^ 1]) + b[401:], r"is damaged \(checksum mismatch\)"),
    (lambda b: b[:-200] + bytes([b[-200] ^ 0x10]) + b[-199:], r"is damaged \(checksum mismatch\)"),
    (lambda b: b"FACEMETA-GALLERX" + b[16:], "is not a facemeta gallery export"),
    (lambda b: b"PK\x03\x04" + b[4:], "is not a facemeta gallery export"),
])
def test_damaged_files_are_refused_before_anything_is_written(source, tmp_path, damage, message):
    out = exported(source, tmp_path / "f")
    out.write_bytes(damage(out.read_bytes()))
    with pytest.raises(GalleryError, match=message) as err:
        import_gallery(out, tmp_path / "copy")
    assert str(out) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "copy").exists()
    with pytest.raises(GalleryError, match=message):
        import_gallery(out, source)
    assert len(contents(source)["people"]["ada"][0]) == 3


@pytest.mark.parametrize("edit, message", [
    (lambda b: b.replace(b'"version":1', b'"version":2', 1), "newer facemeta .export format 2"),
    (lambda b: b.replace(b'"rows":18', b'"rows":17', 1), "is damaged"),
    (lambda b: b.replace(b'"embeddings":18', b'"embeddings":19', 1), "is damaged"),
    (lambda b: b.replace(b'"ada"', b'"unknown"', 1), "is damaged .*reserved"),
    (lambda b: b + b"x", "is damaged"),
])
def test_well_checksummed_but_wrong_files_are_refused(source, tmp_path, edit, message):
    out = exported(source, tmp_path / "f")
    rewrite(out, edit)
    with pytest.raises(GalleryError, match=message):
        import_gallery(out, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_a_file_that_changes_after_its_check_is_refused(source, tmp_path):
    """read_export checks the whole file; the import then reads it once more, hashing as it goes: a file changed
    in between (another size or time) is refused before any row, one whose bytes no longer give the checked
    checksum is refused at the end of the pass."""
    out = exported(source, tmp_path / "f")
    header, chunks = read_export(out)
    rewrite(out, lambda b: b.replace(b'"ada"', b'"adb"'))
    with pytest.raises(GalleryError, match="changed since it was checked"):
        next(chunks)
    header, chunks = read_export(out)
    header["sha256"] = "0" * 64  # what the check saw differs from what the import reads
    with pytest.raises(GalleryError, match="changed while it was imported"):
        list(chunks)


def test_inputs_that_are_not_files(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.fmg")  # opening a FIFO would wait for a writer: refused from its stat
    for what in (tmp_path / "pipe.fmg", tmp_path):
        with pytest.raises(GalleryError, match="is not a file"):
            import_gallery(what, tmp_path / "copy")
    with pytest.raises(GalleryError, match="cannot read"):
        import_gallery(tmp_path / "missing.fmg", tmp_path / "copy")


def test_targets_that_cannot_take_an_import(source, tmp_path):
    out = exported(source, tmp_path / "f")
    stuff = tmp_path / "stuff"
    stuff.mkdir()
    (stuff / "notes.txt").write_text("keep me")
    with pytest.raises(GalleryError, match="neither a facemeta gallery nor an empty folder"):
        import_gallery(out, stuff)
    assert [p.name for p in stuff.iterdir()] == ["notes.txt"]
    with pytest.raises(GalleryError, match="backend options apply to a new gallery only"):
        import_gallery(out, source, create_kwargs={"backend": "faiss"})
    (tmp_path / "empty").mkdir()
    assert import_gallery(out, tmp_path / "empty")["embeddings"] == 18
    with Gallery.open(source, load_index=False) as g, pytest.raises(GalleryError, match="is a folder"):
        export_gallery(g, tmp_path)


def test_an_interrupted_import_leaves_no_half_gallery_and_an_interrupted_export_no_half_file(source, tmp_path):
    out = exported(source, tmp_path / "f")
    before = out.read_bytes()

    def stop(done, total):
        raise KeyboardInterrupt

    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "copy", tmp_path / "empty"):
        with pytest.raises(KeyboardInterrupt):
            import_gallery(out, target, batch_rows=2, progress=stop)
        assert not target.exists() or not any(target.iterdir())
    with Gallery.open(source, load_index=False) as g, pytest.raises(KeyboardInterrupt):
        export_gallery(g, out, progress=stop)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["empty", "f", "source"]


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli(source, tmp_path, capsys):
    out = tmp_path / "people.fmg"
    code, stdout, err = cli(capsys, "gallery", "export", source, out)
    assert code == 0 and stdout.startswith(f"exported 4 people, 18 embeddings to {out} (") and not err
    code, stdout, err = cli(capsys, "gallery", "import", out, tmp_path / "copy", "--json")
    assert code == 0 and not err
    assert json.loads(stdout) == {"gallery": str(tmp_path / "copy"), "new": True, "fingerprint": FP,
                                  "total": 18, "people": 4, "embeddings": 18, "skipped": 0}
    code, stdout, err = cli(capsys, "gallery", "import", out, tmp_path / "copy")
    assert code == 0 and stdout == f"imported 0 embeddings of 0 people into {tmp_path / 'copy'} " \
                                   "(skipped 18 already there; it holds 18 embeddings)\n"
    code, stdout, err = cli(capsys, "gallery", "export", tmp_path / "copy", tmp_path / "again.fmg", "--json")
    assert code == 0 and json.loads(stdout)["embeddings"] == 18

    other = make_gallery(tmp_path / "other", fingerprint="model-b", seed=1)
    code, stdout, err = cli(capsys, "gallery", "import", out, other)
    assert code == 1 and not stdout and err.count("\n") == 1
    assert err.startswith("facemeta gallery: error: ") and "model 'model-b'" in err
    code, stdout, err = cli(capsys, "gallery", "import", out, other, "--any-model")
    assert code == 0 and "imported 18 embeddings of 4 people" in stdout

    damaged = tmp_path / "damaged.fmg"
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    code, stdout, err = cli(capsys, "gallery", "import", damaged, tmp_path / "new")
    assert code == 1 and err == f"facemeta gallery: error: {damaged} is damaged (checksum mismatch)\n"
    code, stdout, err = cli(capsys, "gallery", "import", out, source, "--backend", "faiss")
    assert code == 1 and "new gallery only" in err and err.count("\n") == 1
    code, stdout, err = cli(capsys, "gallery", "export", tmp_path / "nowhere", tmp_path / "x.fmg")
    assert code == 1 and "no gallery at" in err and not (tmp_path / "x.fmg").exists()
    assert not (tmp_path / "new").exists()
