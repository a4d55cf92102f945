"""Gallery hardening (issue 12's review): symlinked gallery files, foreign or stale index files,
reruns of an interrupted enroll, identity names, reasons for unusable photos, and list/info with a
damaged index.

Every refusal is a one-line error (exit code 1 on the command line) and leaves the gallery's
files, and any file a link points to, as they were. Pure gallery tests use random unit vectors;
the enroll tests use real ORL photos and a small randomly initialised checkpoint (they check
plumbing, not what a face model decides: an untrained model still maps one photo to one vector).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from facemeta.cli import main
from facemeta.errors import GalleryError
from facemeta.gallery import Gallery, IndexSpec
from facemeta.gallery import records as gallery_records
from facemeta.gallery.index_file import load_index, read_index_header, save_index

DIM = 32
FP = "model-a"


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make(path: Path, people: list[str], seed: int, per: int = 2) -> np.ndarray:
    """A gallery of ``people`` with ``per`` random vectors each; returns the vectors (row i*per+j)."""
    x = unit(len(people) * per, seed)
    with Gallery.create(path, dim=DIM, fingerprint=FP) as g:
        g.enroll_many([p for p in people for _ in range(per)], x, fingerprint=FP,
                      sources=[f"/photos/{p}/{j}.jpg" for p in people for j in range(per)])
    return x


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def sql(gallery: Path, *statements) -> None:
    """Change a gallery's database behind facemeta's back (to build old or odd galleries)."""
    conn = sqlite3.connect(gallery / "gallery.sqlite", isolation_level=None)
    try:
        for st in statements:
            conn.execute(*((st,) if isinstance(st, str) else st))
    finally:
        conn.close()


def assert_one_line_error(code: int, err: str, command: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith(f"facemeta {command}: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def files(path: Path) -> dict[str, bytes]:
    """Bytes of the gallery's database and index (what a refused operation must leave alone)."""
    return {name: (path / name).read_bytes() for name in ("gallery.sqlite", "index.faiss")
            if (path / name).is_file() and not (path / name).is_symlink()}


def contents(path: Path) -> tuple:
    """Everything the database says: names, records and vectors, for before/after comparisons."""
    with Gallery.open(path, load_index=False) as g:
        people = [(i.name, i.count) for i in g.identities()]
        records = [(r.id, r.identity, r.source, r.content_hash) for r in g.records()]
        vectors = {name: g.vectors(name).tobytes() for name, _ in people}
    return people, records, vectors


# ------------------------------------------------------------------ 2. symbolic links and special files

def test_symlinked_or_hard_linked_lock_is_refused_and_the_outside_file_keeps_its_bytes(tmp_path, capsys):
    g = tmp_path / "G"
    make(g, ["Ada", "Bob"], seed=1)
    outside = tmp_path / "precious.txt"
    outside.write_bytes(b"do not truncate me\n")
    before = contents(g)
    (g / "writer.lock").unlink()
    (g / "writer.lock").symlink_to(outside)
    code, _, err = cli(capsys, "gallery", "rename", g, "Ada", "Ada Lovelace")
    assert_one_line_error(code, err, "gallery", f"{g / 'writer.lock'}", "symbolic link")
    with pytest.raises(GalleryError, match="symbolic link"):
        Gallery.open(g, mode="w", lock_timeout=0)
    assert outside.read_bytes() == b"do not truncate me\n" and contents(g) == before

    (g / "writer.lock").unlink()
    os.link(outside, g / "writer.lock")  # a hard link would write through to the outside file as well
    code, _, err = cli(capsys, "gallery", "remove", g, "Bob")
    assert_one_line_error(code, err, "gallery", "writer.lock", "hard links")
    assert outside.read_bytes() == b"do not truncate me\n" and contents(g) == before

    (g / "writer.lock").unlink()  # a plain lock file again: the writer works
    code, out, _ = cli(capsys, "gallery", "rename", g, "Ada", "Ada Lovelace")
    assert code == 0 and "renamed Ada to Ada Lovelace" in out
    assert (g / "writer.lock").is_file() and not (g / "writer.lock").is_symlink()


def test_symlinked_database_index_or_special_index_file_is_refused(tmp_path, capsys):
    g = tmp_path / "G"
    x = make(g, ["Ada", "Bob"], seed=2)
    # The index a symbolic link to a copy of itself elsewhere: refused, and repair replaces the link
    # with a regular file instead of writing through it.
    outside = tmp_path / "outside.faiss"
    shutil.copyfile(g / "index.faiss", outside)
    kept = outside.read_bytes()
    (g / "index.faiss").unlink()
    (g / "index.faiss").symlink_to(outside)
    for mode in ("r", "w"):
        with pytest.raises(GalleryError, match="index.faiss is a symbolic link.*gallery repair"):
            Gallery.open(g, mode=mode, lock_timeout=0)
    code, out, _ = cli(capsys, "gallery", "repair", g)
    assert code == 0 and "index rebuilt" in out
    assert (g / "index.faiss").is_file() and not (g / "index.faiss").is_symlink()
    assert outside.read_bytes() == kept
    with Gallery.open(g) as r:
        assert [m.name for m in r.identify(x[[0, 2]])] == ["Ada", "Bob"]
    # A writer's save (temporary file + rename) replaces a link put in place of the index meanwhile,
    # and the writer's clean-up of half-written temporary files removes links without following them.
    (g / ".index.faiss.leftover.tmp").symlink_to(outside)
    with Gallery.open(g, mode="w") as w:
        assert not (g / ".index.faiss.leftover.tmp").is_symlink()
        (g / "index.faiss").unlink()
        (g / "index.faiss").symlink_to(outside)
        w.save()
    assert (g / "index.faiss").is_file() and not (g / "index.faiss").is_symlink()
    assert outside.read_bytes() == kept

    # A FIFO in place of the index is refused at once (a plain open() would block forever).
    idx = g / "index.faiss"
    idx.rename(tmp_path / "index.saved")
    os.mkfifo(idx)
    def too_slow(*_):
        raise TimeoutError("opening a FIFO blocked")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(20)
    try:
        with pytest.raises(GalleryError, match="not a regular file"):
            Gallery.open(g)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    idx.unlink()
    (tmp_path / "index.saved").rename(idx)

    # SQLite follows links: a linked database or WAL file is refused before SQLite opens it.
    for name in ("gallery.sqlite", "gallery.sqlite-wal"):
        target = tmp_path / f"elsewhere-{name}"
        if (g / name).exists():
            (g / name).rename(target)
        else:
            target.write_bytes(b"")
        kept = target.read_bytes()
        (g / name).symlink_to(target)
        code, _, err = cli(capsys, "gallery", "remove", g, "Ada")
        assert_one_line_error(code, err, "gallery", name, "symbolic link")
        assert target.read_bytes() == kept
        (g / name).unlink()
        if name == "gallery.sqlite":
            target.rename(g / name)
    assert [p for p, _ in contents(g)[0]] == ["Ada", "Bob"]


# ------------------------------------------------------------------ 3. foreign and stale index files

def test_foreign_index_of_the_same_model_is_refused_then_repaired(tmp_path, capsys):
    a, b = tmp_path / "A", tmp_path / "B"
    xa = make(a, ["Ada", "Bob", "Cy"], seed=3)
    make(b, ["Dee", "Eve", "Fay"], seed=4)  # same model, dimension, generation and ids, other people
    shutil.copyfile(b / "index.faiss", a / "index.faiss")
    before, db_bytes = contents(a), (a / "gallery.sqlite").read_bytes()
    for mode in ("r", "w"):
        with pytest.raises(GalleryError, match="belongs to another gallery.*gallery repair"):
            Gallery.open(a, mode=mode, lock_timeout=0)
    with Gallery.open(a, load_index=False) as lazy, pytest.raises(GalleryError, match="another gallery"):
        lazy.search(xa[0])  # no answer at all rather than a confident wrong name
    code, out, _ = cli(capsys, "gallery", "list", a)
    assert code == 0 and out.splitlines()[:3] == ["Ada\t2", "Bob\t2", "Cy\t2"]
    code, out, _ = cli(capsys, "gallery", "info", a, "--check", "--json")
    info = json.loads(out)
    assert code == 1 and not info["check"]["index_matches_database"] and info["check"]["database"] == "ok"
    assert info["index_status"].startswith("needs repair:") and "another gallery" in info["index_status"]
    assert (a / "gallery.sqlite").read_bytes() == db_bytes and contents(a) == before

    code, out, _ = cli(capsys, "gallery", "repair", a)
    assert code == 0 and "index rebuilt from the database: 6 embeddings" in out and "another gallery" in out
    assert len(list(a.glob("index.faiss.damaged-*"))) == 1
    with Gallery.open(a) as g:
        got = g.identify(xa[[0, 2, 4]])
        assert [m.name for m in got] == ["Ada", "Bob", "Cy"] and min(m.score for m in got) > 0.9999
    code, out, _ = cli(capsys, "gallery", "info", a, "--check", "--json")
    assert code == 0 and json.loads(out)["check"]["index_matches_database"]
    assert contents(a) == before


def test_index_of_a_copied_gallery_or_another_moment_is_refused(tmp_path):
    a = tmp_path / "A"
    x = make(a, ["Ada", "Bob"], seed=5)
    shutil.copytree(a, tmp_path / "copy")  # same gallery id from here on
    snapshot = tmp_path / "A-at-gen-1"
    shutil.copytree(a, snapshot)
    with Gallery.open(a, mode="w") as g:
        g.enroll("Cy", unit(2, 6), fingerprint=FP)
    with Gallery.open(tmp_path / "copy", mode="w") as g:
        g.enroll("Dee", unit(2, 7), fingerprint=FP)  # same generation and ids as Cy, other vectors
    idx = a / "index.faiss"
    good = idx.read_bytes()
    shutil.copyfile(tmp_path / "copy" / "index.faiss", idx)
    with pytest.raises(GalleryError, match="digest mismatch at generation 2.*gallery repair"):
        Gallery.open(a)
    # An older index of this very gallery is its cache at an earlier generation: brought up to date.
    shutil.copyfile(snapshot / "index.faiss", idx)
    with Gallery.open(a) as r:
        assert [m.name for m in r.identify(np.concatenate([x[:1], unit(2, 6)[:1]]))] == ["Ada", "Cy"]
    # A database restored from an older copy, with the newer index: refused.
    idx.write_bytes(good)
    for leftover in ("gallery.sqlite-wal", "gallery.sqlite-shm"):
        (a / leftover).unlink(missing_ok=True)
    shutil.copyfile(snapshot / "gallery.sqlite", a / "gallery.sqlite")
    with pytest.raises(GalleryError, match="newer than the database"):
        Gallery.open(a)


def test_check_compares_vectors_not_only_ids(tmp_path, capsys):
    """A forged header (this gallery's id, generation and digest on another gallery's index) passes
    the open-time binding, but ``info --check`` compares the vectors and fails."""
    a, b = tmp_path / "A", tmp_path / "B"
    make(a, ["Ada", "Bob"], seed=8)
    make(b, ["Dee", "Eve"], seed=9)
    header = read_index_header(a / "index.faiss")
    built, _ = load_index(b / "index.faiss")
    save_index(built, a / "index.faiss", header["generation"], FP, gallery=header["gallery"], digest=header["digest"])
    code, out, _ = cli(capsys, "gallery", "info", a, "--check", "--json")
    check = json.loads(out)["check"]
    assert code == 1 and check["database"] == "ok" and not check["index_matches_database"]
    code, _, _ = cli(capsys, "gallery", "repair", a)
    assert code == 0 and len(list(a.glob("index.faiss.replaced-*"))) == 1  # it looked bound, so "replaced"
    code, out, _ = cli(capsys, "gallery", "info", a, "--check", "--json")
    assert code == 0 and json.loads(out)["check"]["index_matches_database"]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf_sq8"])
def test_digest_follows_every_change_and_old_digests_are_pruned(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(gallery_records, "DIGEST_KEEP", 3)
    spec = {"flat": "flat", "hnsw": "hnsw", "ivf_sq8": IndexSpec(kind="ivf_sq8", nlist=4)}[kind]
    x = unit(400, 10)
    with Gallery.create(tmp_path / "g", dim=DIM, fingerprint=FP, index=spec, save_interval=3600) as g:
        g.enroll_many([f"p{i // 2}" for i in range(400)], x, fingerprint=FP)
        g.save()
        ids = g.enroll("extra", unit(3, 11), fingerprint=FP)
        g.remove("p1")
        g.remove_embeddings([ids[0], ids[1], 999_999])
        g.rename("p2", "Two")
        assert g.digest == g._records.digest_rows()  # kept up to date by the changed rows alone
        recorded = dict(g._conn.execute("SELECT generation, digest FROM index_digests").fetchall())
        assert sorted(recorded) == [1, 2, 3, 4, 5]  # from the saved index (generation 1) on
        for _ in range(5):
            g.rename("Two", "Zwei")
            g.rename("Zwei", "Two")
        assert g.check()["index_matches_database"] and g._index.built.kind == ("ivf_sq8" if kind == "ivf_sq8" else kind)
    with Gallery.open(tmp_path / "g", mode="w") as g:  # the saved index matches the last recorded digest
        assert g.check() == {"database": "ok", "index_matches_database": True, "embeddings": 399, "index_count": 399}
        g.rename("Two", "2")  # generation 16: keeps the saved index's (15) and the last DIGEST_KEEP
        generations = [r[0] for r in g._conn.execute("SELECT generation FROM index_digests ORDER BY generation")]
        assert generations == [13, 14, 15, 16]


def test_gallery_from_an_older_facemeta_is_upgraded_by_its_first_writer(tmp_path, capsys):
    g = tmp_path / "old"
    x = make(g, ["Ada", "Bob"], seed=12)
    # Turn it into a format-1 gallery: no id, no digests, no content_hash column, an unbound index file.
    sql(g, "DELETE FROM meta WHERE key='gallery_id'", "UPDATE meta SET value='1' WHERE key='format'",
        "DROP TABLE index_digests", "ALTER TABLE embeddings DROP COLUMN content_hash")
    built, header = load_index(g / "index.faiss")
    save_index(built, g / "index.faiss", header["generation"], FP)
    with pytest.raises(GalleryError, match="older facemeta.*gallery repair"):
        Gallery.open(g)  # a reader cannot tell whether an unbound index is this database's
    code, out, _ = cli(capsys, "gallery", "list", g)
    assert code == 0 and "2 people, 4 embeddings" in out
    with Gallery.open(g, mode="w") as w:  # the first writer adds the id, digest and column, rebuilds the index
        assert w.format == 2 and w.gallery_id and w.digest == w._records.digest_rows()
        assert [r.content_hash for r in w.records("Ada")] == [None, None]
    assert read_index_header(g / "index.faiss")["gallery"] == w.gallery_id
    with Gallery.open(g) as r:
        assert [m.name for m in r.identify(x[[0, 2]])] == ["Ada", "Bob"]


# ------------------------------------------------------------------ 10. names

BAD_NAMES = ["Ada\u2028Lovelace", "Ad\x85a", "Ada\u202eecalevoL", "Ada\x7f", "Ada\tL", "A\u200bda", "Ada\ue000",
             "Ada\u0378"]


def test_bad_names_are_refused_shown_escaped_and_names_are_normalised(tmp_path, capsys):
    g = tmp_path / "G"
    make(g, ["Tony_Blair", "Jos\u00e9"], seed=13)
    before = contents(g)
    with Gallery.open(g, mode="w") as w:
        for bad in BAD_NAMES:
            with pytest.raises(GalleryError) as err:
                w.enroll(bad, unit(1, 14), fingerprint=FP)
            msg = str(err.value)
            assert msg.startswith("bad identity name") and msg.isprintable() and repr(bad.strip()) in msg, msg
            with pytest.raises(GalleryError, match="bad identity name"):
                w.rename("Tony_Blair", bad)
        # Stored NFC: the decomposed spelling finds the same person; enrolling it adds no one.
        w.enroll("Jose\u0301 ", unit(1, 15), fingerprint=FP)
        assert [(i.name, i.count) for i in w.identities()] == [("Jos\u00e9", 3), ("Tony_Blair", 2)]
        w.remove_embeddings([w.records("Jose\u0301")[-1].id])
    assert contents(g) == before

    code, _, err = cli(capsys, "gallery", "rename", g, "Tony_Blair", "Tony\u202eBlair")
    assert_one_line_error(code, err, "gallery", "bad identity name", "\\u202e", "RIGHT-TO-LEFT OVERRIDE")
    assert "\u202e" not in err
    code, _, err = cli(capsys, "gallery", "remove", g, "Nobody\u2028Else")
    assert_one_line_error(code, err, "gallery", "no identity named", "\\u2028")
    assert contents(g) == before
    code, out, _ = cli(capsys, "gallery", "rename", g, " Tony_Blair ", " Tony Blair ")
    assert code == 0 and out.strip() == "renamed Tony_Blair to Tony Blair"
    code, out, _ = cli(capsys, "gallery", "remove", g, "  Tony Blair\t")
    assert code == 0 and "removed Tony Blair (2 embeddings)" in out

    # A name stored by an older facemeta with a control character: listed escaped, still removable.
    sql(g, ("UPDATE identities SET name=? WHERE name=?", ("Jos\u00e9\u202e", "Jos\u00e9")))
    code, out, _ = cli(capsys, "gallery", "list", g)
    assert code == 0 and "\u202e" not in out and "\\u202e" in out
    code, out, _ = cli(capsys, "gallery", "remove", g, "Jos\u00e9\u202e")
    assert code == 0 and "\u202e" not in out and "2 embeddings" in out


# ------------------------------------------------------------------ 12. list and info need only the database

def test_list_and_info_work_with_a_damaged_index_search_does_not(tmp_path, capsys):
    g = tmp_path / "G"
    x = make(g, ["Ada", "Bob"], seed=16)
    idx = g / "index.faiss"
    idx.write_bytes(idx.read_bytes()[:-10])
    before = files(g)
    code, out, _ = cli(capsys, "gallery", "list", g, "--json")
    assert code == 0 and [(p["name"], p["images"]) for p in json.loads(out)] == [("Ada", 2), ("Bob", 2)]
    code, out, _ = cli(capsys, "gallery", "info", g)
    status = next(line for line in out.splitlines() if line.startswith("index_status:"))
    assert code == 0 and "needs repair" in status and "truncated" in status and "gallery repair" in status
    assert "embeddings: 4" in out
    code, out, _ = cli(capsys, "gallery", "info", g, "--check", "--json")
    assert code == 1 and not json.loads(out)["check"]["index_matches_database"]
    with Gallery.open(g, load_index=False) as r:
        assert len(r) == 4
        with pytest.raises(GalleryError, match="truncated.*gallery repair"):
            r.identify(x[0])
    with pytest.raises(GalleryError, match="truncated.*gallery repair"):
        Gallery.open(g)
    assert files(g) == before


# ------------------------------------------------------------------ 4, 9, 10: enroll from real photos

@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A small random checkpoint (mobilenetv3_small_100, 64 px, 128-d): enough for plumbing."""
    import torch

    from facemeta.models.backbone import ModelConfig, build_model
    from facemeta.models.checkpoint import save_checkpoint

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = build_model(ModelConfig(backbone="mobilenetv3_small_100", image_size=64, embedding_size=128)).eval()
    path = save_checkpoint(m, tmp_path_factory.mktemp("model") / "m.safetensors", meta={"threshold": 0.5})
    yield path
    torch.set_num_threads(before)


def people_folder(root: Path, orl: Path, spec: dict[str, list[int]]) -> Path:
    for name, shots in spec.items():
        (root / name).mkdir(parents=True)
        for i in shots:
            shutil.copy(orl / name / f"{i}.pgm", root / name / f"{i}.pgm")
    return root


def test_rerun_of_an_interrupted_folder_enroll_adds_each_photo_once(tmp_path, data_dir, model, capsys):
    orl = data_dir / "orl"
    folder = people_folder(tmp_path / "in", orl, {"s1": [1, 2, 3], "s2": [1, 2], "s3": [4, 5]})
    shutil.copy(orl / "s2" / "1.pgm", folder / "s2" / "copy-of-1.pgm")  # same bytes, another name
    gal = tmp_path / "G"
    # kill -9 right after the first person's commit (before the index is saved).
    env = dict(os.environ, FACEMETA_GALLERY_FAULT="after_commit", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "facemeta.cli", "enroll", str(gal), "--folder", str(folder),
                           "--model", str(model), "--no-progress"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [(p, n) for p, n in contents(gal)[0]] == [("s1", 3)]

    code, out, err = cli(capsys, "enroll", gal, "--folder", folder, "--model", model, "--no-progress", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["added"] == {"s2": 2, "s3": 2} and res["already_enrolled"] == 4  # s1's three + the copy
    assert "skipped 4 image(s) already enrolled" in err
    people, records, _ = contents(gal)
    assert people == [("s1", 3), ("s2", 2), ("s3", 2)]
    for name, count in people:
        hashes = [r[3] for r in records if r[1] == name]
        assert len(set(hashes)) == count == len(hashes) and all(len(h) == 64 for h in hashes)

    before = contents(gal)
    code, out, err = cli(capsys, "enroll", gal, "--folder", folder, "--model", model, "--no-progress")
    assert code == 0 and "nothing new to enroll" in out and "8 image(s) already enrolled" in out, err
    code, out, _ = cli(capsys, "enroll", gal, "s1", orl / "s1/1.pgm", orl / "s1/2.pgm", "--model", model)
    assert code == 0 and "nothing new to enroll" in out
    assert contents(gal) == before
    code, out, _ = cli(capsys, "enroll", gal, "s1", orl / "s1/1.pgm", "--model", model, "--force")
    assert code == 0 and "enrolled 1 image(s) of s1" in out
    assert contents(gal)[0][0] == ("s1", 4)


def test_folder_enroll_goes_on_past_bad_names_and_faceless_people(tmp_path, data_dir, model, capsys):
    orl = data_dir / "orl"
    folder = people_folder(tmp_path / "in", orl, {"s4": [1], "s5": [1]})
    (folder / "Eve\u202eevE").mkdir()
    shutil.copy(orl / "s6" / "1.pgm", folder / "Eve\u202eevE" / "1.pgm")
    (folder / "Nobody").mkdir()
    (folder / "Nobody" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    gal = tmp_path / "G"
    code, out, err = cli(capsys, "enroll", gal, "--folder", folder, "--model", model, "--no-progress", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["added"] == {"s4": 1, "s5": 1} and res["identities"] == 2
    skipped = dict(res["skipped"])
    assert "bad identity name" in skipped[str(folder / "Eve\u202eevE")]
    assert "none of the 1 image(s) for 'Nobody' gave a usable face: " in skipped["Nobody"]
    assert "\u202e" not in err and "\\u202e" in err
    assert all(line.startswith("skipped ") for line in err.strip().splitlines())

    # One person, only unusable photos: one line that says why (item 9).
    code, _, err = cli(capsys, "enroll", gal, "Nobody", folder / "Nobody" / "broken.png", "--model", model)
    assert_one_line_error(code, err, "enroll", "none of the 1 image(s) for 'Nobody' gave a usable face: ",
                          "broken.png")
    # A bad name is refused before any photo is read.
    code, _, err = cli(capsys, "enroll", gal, "Ev\u2028e", orl / "s6" / "1.pgm", "--model", model)
    assert_one_line_error(code, err, "enroll", "bad identity name", "\\u2028")
    assert [p for p, _ in contents(gal)[0]] == ["s4", "s5"]


def test_identify_refuses_a_foreign_index_then_repair_gives_the_right_name(tmp_path, data_dir, model, capsys):
    orl = data_dir / "orl"
    a, b = tmp_path / "A", tmp_path / "B"
    assert cli(capsys, "enroll", a, "s7", orl / "s7/1.pgm", "--model", model)[0] == 0
    assert cli(capsys, "enroll", b, "s8", orl / "s8/1.pgm", "--model", model)[0] == 0
    shutil.copyfile(b / "index.faiss", a / "index.faiss")
    db_bytes = (a / "gallery.sqlite").read_bytes()
    code, out, err = cli(capsys, "identify", a, orl / "s7/1.pgm", "--model", model, "--threshold", "-1")
    assert_one_line_error(code, err, "identify", "another gallery", "gallery repair")
    assert out == "" and (a / "gallery.sqlite").read_bytes() == db_bytes
    assert cli(capsys, "gallery", "repair", a)[0] == 0
    code, out, _ = cli(capsys, "identify", a, orl / "s7/1.pgm", "--model", model, "--json")
    face = json.loads(out)["faces"][0]
    assert code == 0 and face["identity"] == "s7" and face["score"] > 0.999


def test_thresholds_are_checked_given_or_stored(tmp_path, capsys):
    """A NaN or out-of-range threshold, given to search/set_defaults/create or found in the meta table, is a
    one-line error (a NaN would otherwise make every face unknown without a word)."""
    from facemeta.errors import FacemetaError

    g_path = tmp_path / "g"
    x = make(g_path, ["Ada", "Bob"], seed=3)
    with Gallery.open(g_path, mode="w") as g:
        for bad in (float("nan"), 1e300, -2.0):
            with pytest.raises(FacemetaError, match="must be a cosine similarity in"):
                g.search(x[:1], threshold=bad)
            with pytest.raises(FacemetaError, match="must be a cosine similarity in"):
                g.set_defaults(threshold=bad)
        g.set_defaults(threshold=0.4)
        assert g.threshold == 0.4
    with pytest.raises(FacemetaError, match="must be a cosine similarity in"):
        Gallery.create(tmp_path / "new", dim=DIM, fingerprint=FP, threshold=float("inf"))
    assert not (tmp_path / "new").exists()  # refused before the folder is made
    sql(g_path, "UPDATE meta SET value='nan' WHERE key='threshold'")
    with pytest.raises(GalleryError, match="is damaged: its stored threshold must be"):
        Gallery.open(g_path)
    code, out, err = cli(capsys, "gallery", "list", g_path)
    assert_one_line_error(code, err, "gallery", "is damaged")
