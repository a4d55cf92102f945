"""Hardening, second pass (issue 28): cross-site writes through ``Origin: null``, look-alike names, exports
onto the gallery they read or onto a device, nested export headers and repeated chunks, read-only galleries,
full disks, an ONNX contract that could lie, memory per request in the service, and the smaller ones
(a symlinked milvus.db, uvicorn's own 400s, a photo with two faces).

Every refusal is asserted as a one-line message with its exit code or HTTP status, and the files it could
have damaged are compared before and after. Pure gallery tests use random unit vectors; the service and
enroll tests use real LFW and ORL photos and a small random checkpoint (plumbing, not what a model decides).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest

from facemeta.cli import main
from facemeta.errors import GalleryError
from facemeta.gallery import Gallery

DIM = 32
FP = "model-a"


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make(path: Path, people: list[str], seed: int = 0, per: int = 2) -> Path:
    """A gallery of ``people`` with ``per`` random vectors each."""
    x = unit(len(people) * per, seed)
    with Gallery.create(path, dim=DIM, fingerprint=FP) as g:
        g.enroll_many([p for p in people for _ in range(per)], x, fingerprint=FP,
                      sources=[f"/photos/{p}/{j}.jpg" for p in people for j in range(per)])
    return path


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str, command: str, *needles: str) -> str:
    """The single stderr line of a failed command, holding each needle."""
    assert code == 1, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"facemeta {command}: error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def files(path: Path) -> dict[str, bytes]:
    """Every file of a folder (recursively) with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def state(path: Path) -> tuple:
    """What a gallery holds (people, every record, every vector) and whether it checks whole: compared before
    and after a refusal where a writer's open may rewrite the files' bytes (a WAL checkpoint, the lock's pid)."""
    with Gallery.open(path) as g:
        rows = [(r.id, r.identity, r.source, r.content_hash) for r in g.records()]
        vectors = {i.name: g.vectors(i.name).tobytes() for i in g.identities()}
        check = g.check()
        assert check["database"] == "ok" and check["index_matches_database"], check
        return [(i.name, i.count) for i in g.identities()], rows, vectors


def people_of(path: Path) -> list[tuple[str, int]]:
    with Gallery.open(path, load_index=False) as g:
        return [(i.name, i.count) for i in g.identities()]


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


def lfw(data_dir: Path, name: str, n: int) -> Path:
    return data_dir / "lfw" / "images" / name / f"{name}_{n:04d}.jpg"


# ------------------------------------------------------------------ 1: Origin "null"


@pytest.fixture(scope="module")
def service(model, tmp_path_factory):
    pytest.importorskip("fastapi")
    pytest.importorskip("multipart")
    pytest.importorskip("httpx")
    from facemeta.serve import FaceService

    svc = FaceService(tmp_path_factory.mktemp("serve") / "people", model, slots=2)
    yield svc
    svc.close()


def assert_json_error(r, status: int, *words: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    msg = body["error"]
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_origin_null_and_cross_site_fetches_are_refused_for_every_write(service, data_dir):
    from fastapi.testclient import TestClient

    from facemeta.serve import create_app

    c = TestClient(create_app(service), base_url="http://127.0.0.1:8000")
    photo = lfw(data_dir, "Tony_Blair", 3)
    people = c.get("/api/people").json()["people"]
    for headers in ({"Origin": "null"}, {"Origin": "NULL"}, {"Origin": " null"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": "http://[::1"}):
        r = c.post("/api/enroll", data={"name": "Evil"}, files=[("images", (photo.name, photo.read_bytes()))],
                   headers=headers)
        assert_json_error(r, 403, "cross-site")
        assert_json_error(c.delete("/api/people/Evil", headers=headers), 403, "cross-site")
        assert_json_error(c.patch("/api/people/Evil", json={"name": "X"}, headers=headers), 403, "cross-site")
        assert_json_error(c.post("/api/rename", json={"name": "Evil", "new_name": "X"}, headers=headers), 403)
    assert c.get("/api/people").json()["people"] == people  # nothing was enrolled
    # reads stay open to any origin; the page's own origin (and scripts sending none) may write
    assert c.get("/api/people", headers={"Origin": "null"}).status_code == 200
    r = c.post("/api/enroll", data={"name": "Tony Blair"}, files=[("images", (photo.name, photo.read_bytes()))],
               headers={"Origin": "http://127.0.0.1:8000", "Sec-Fetch-Site": "same-origin"})
    assert r.status_code == 201, r.text
    assert c.delete("/api/people/Tony Blair").status_code == 200


# ------------------------------------------------------------------ 2: look-alike and invisible names

INVISIBLE_SUFFIXES = ["\u034f", "\u3164", "\ufe0f", "\uffa0", "\u2800", "\u200b", "\u00ad", "\u115f", "\U000e0041"]
LOOK_ALIKES = ["tony blair", "TONY BLAIR", "Tony  Blair", "\uff34\uff4f\uff4e\uff59 \uff22\uff4c\uff41\uff49\uff52",
               "Tony\u00a0Blair", "Tony\u3000Blair"]


def test_invisible_and_look_alike_names_are_refused_naming_the_person(tmp_path, capsys):
    g = make(tmp_path / "G", ["Tony Blair", "Colin Powell"])
    before = files(g)
    with Gallery.open(g, mode="w") as w:
        for bad in ["Tony Blair" + c for c in INVISIBLE_SUFFIXES] + ["\u0301", "\u0301\u0301\u0301", "a" + "\u0301" * 6]:
            with pytest.raises(GalleryError, match="bad identity name") as err:
                w.enroll(bad, unit(1, 3), fingerprint=FP)
            msg = str(err.value)
            assert "\n" not in msg and msg.isprintable(), msg
            assert not any(c in msg for c in INVISIBLE_SUFFIXES + ["\u0301"]), msg  # shown escaped, never raw
            with pytest.raises(GalleryError, match="bad identity name"):
                w.rename("Colin Powell", bad)
        for alike in LOOK_ALIKES:
            with pytest.raises(GalleryError, match="looks like 'Tony Blair'") as err:
                w.enroll(alike, unit(1, 4), fingerprint=FP)
            assert "\n" not in str(err.value)
            with pytest.raises(GalleryError, match="looks like 'Tony Blair'"):
                w.rename("Colin Powell", alike)
            with pytest.raises(GalleryError, match="looks like"):  # two new look-alikes in one transaction
                w.enroll_many(["Ada Lovelace", "ADA LOVELACE"], unit(2, 5), fingerprint=FP)
        assert "Ada Lovelace" not in [i.name for i in w.identities()]
    assert files(g) == before
    code, _, err = cli(capsys, "gallery", "rename", g, "Colin Powell", "tony blair")
    one_line_error(code, err, "gallery", "looks like 'Tony Blair'")
    code, _, err = cli(capsys, "gallery", "rename", g, "Colin Powell", "Tony Blair\u3164")
    one_line_error(code, err, "gallery", "bad identity name", "\\u3164", "HANGUL FILLER")
    assert files(g) == before
    # a person may change the case of their own name; the same name again is the same person
    with Gallery.open(g, mode="w") as w:
        w.rename("Tony Blair", "TONY BLAIR")
        w.enroll("TONY BLAIR", unit(1, 6), fingerprint=FP)
        assert [(i.name, i.count) for i in w.identities()] == [("Colin Powell", 2), ("TONY BLAIR", 3)]


def test_look_alike_names_are_refused_by_enroll_folder_enroll_import_and_the_service(tmp_path, data_dir, model,
                                                                                   service, capsys):
    from facemeta.gallery.portable import export_gallery, import_gallery

    orl = data_dir / "orl"
    g = tmp_path / "G"
    code, out, err = cli(capsys, "enroll", g, "s1", orl / "s1" / "1.pgm", "--model", model, "--json")
    assert code == 0, err
    before = state(g)
    code, _, err = cli(capsys, "enroll", g, "S1", orl / "s2" / "1.pgm", "--model", model)
    one_line_error(code, err, "enroll", "looks like 's1'")
    assert state(g) == before
    folder = tmp_path / "people"
    for name, subject in (("\uff33\uff11", "s2"), ("s3", "s3")):  # full-width "S1" looks like s1
        (folder / name).mkdir(parents=True)
        shutil.copy(orl / subject / "1.pgm", folder / name / "1.pgm")
    code, out, err = cli(capsys, "enroll", g, "--folder", folder, "--model", model, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["added"] == {"s3": 1} and any("looks like 's1'" in why for _, why in result["skipped"]), result
    # import: a file holding "S1" into a gallery holding "s1" is refused before any row is written
    other = make(tmp_path / "O", ["S1"], per=1)
    with Gallery.open(other) as o:
        export_gallery(o, tmp_path / "o.fmg")
    h = make(tmp_path / "H", ["s1"], per=1)
    before = files(h)
    with pytest.raises(GalleryError, match="looks like 's1'"):
        import_gallery(tmp_path / "o.fmg", h)
    assert files(h) == before
    # the service: 409 naming the person, nobody added
    from fastapi.testclient import TestClient

    from facemeta.serve import create_app

    c = TestClient(create_app(service))
    photo = orl / "s5" / "1.pgm"
    assert c.post("/api/enroll", data={"name": "Ada"}, files=[("images", (photo.name, photo.read_bytes()))]).status_code == 201
    people = c.get("/api/people").json()["people"]
    r = c.post("/api/enroll", data={"name": "ADA"}, files=[("images", (photo.name, photo.read_bytes()))])
    assert_json_error(r, 409, "looks like 'Ada'")
    assert_json_error(c.post("/api/enroll", data={"name": "Ada\u2800"}, files=[("images", (photo.name, b"x"))]), 422,
                      "bad identity name", "\\u2800")
    assert c.get("/api/people").json()["people"] == people
    assert c.delete("/api/people/Ada").status_code == 200


# ------------------------------------------------------------------ 5, 6: export headers and repeated chunks


def rewrite(out: Path, edit) -> None:
    """Change an export's body with ``edit`` and give it a valid checksum again (a forger's file)."""
    import hashlib

    body = edit(out.read_bytes()[:-72])
    out.write_bytes(body + f"SHA256 {hashlib.sha256(body).hexdigest()}\n".encode())


def exported(tmp_path: Path, people=("Tony Blair", "Colin Powell"), per: int = 8) -> tuple[Path, Path]:
    from facemeta.gallery.portable import export_gallery

    g = make(tmp_path / "src", list(people), per=per)
    with Gallery.open(g) as src:
        export_gallery(src, tmp_path / "g.fmg")
    return g, tmp_path / "g.fmg"


def nested_header(body: bytes, depth: int) -> bytes:
    head, rest = body.split(b"\n", 2)[:2], body.split(b"\n", 2)[2]
    deep = b"[" * depth + b"]" * depth
    return head[0] + b"\n" + head[1][:-1] + b',"x":' + deep + b"}\n" + rest


def test_deeply_nested_export_header_is_one_line_and_nothing_is_written(tmp_path, capsys):
    g, out = exported(tmp_path)
    h = make(tmp_path / "H", ["Ada"])
    before = files(h)
    for depth in (9, 1000, 50_000):
        rewrite(out, lambda b, d=depth: nested_header(b, d))
        with pytest.raises(GalleryError, match="nested more than 8 deep") as err:
            import_gallery_(out, tmp_path / "new")
        assert "\n" not in str(err.value)
        code, _, err_text = cli(capsys, "gallery", "import", out, h)
        one_line_error(code, err_text, "gallery", "is damaged", "nested more than 8 deep")
        assert not (tmp_path / "new").exists() and files(h) == before
        _, out = exported(tmp_path / f"again{depth}")


def import_gallery_(*args, **kwargs):
    from facemeta.gallery.portable import import_gallery

    return import_gallery(*args, **kwargs)


def test_a_repeated_chunk_is_refused_and_no_import_duplicates_a_row(tmp_path, capsys):
    from facemeta.gallery import portable

    g, out = exported(tmp_path)
    body = out.read_bytes()[:-72]
    magic, header, rest = body.split(b"\n", 2)
    trailer_at = rest.rindex(b'{"end":true')
    chunks = rest[:trailer_at]
    rewrite(out, lambda b: b.replace(b'"embeddings":16', b'"embeddings":32').replace(chunks, chunks + chunks))
    for target in (tmp_path / "new", make(tmp_path / "H", ["Ada"])):
        before = files(target) if target.exists() else None
        with pytest.raises(GalleryError, match="is repeated"):
            import_gallery_(out, target)
        assert (files(target) if target.exists() else None) == before
    # rows copied into another chunk (not a byte-for-byte repeat): each row is still stored once
    monkey = pytest.MonkeyPatch()
    monkey.setattr(portable, "CHUNK_ROWS", 3)
    try:
        _, out = exported(tmp_path / "c", per=8)
    finally:
        monkey.undo()
    body = out.read_bytes()[:-72]
    first_line_end = body.index(b"\n", len(b"FACEMETA-GALLERY\n")) + 1
    first = body.index(b"\n", first_line_end) + 1 + 3 * DIM * 4  # the first chunk, 3 rows
    line = body[first_line_end:body.index(b"\n", first_line_end) + 1]
    meta = json.loads(line)
    # a new chunk: rows 0 and 1 of the first chunk again, with another row count
    two = {k: (v[:2] if isinstance(v, list) else 2) for k, v in meta.items()}
    extra = json.dumps(two, separators=(",", ":")).encode() + b"\n" + body[first - 3 * DIM * 4:first - DIM * 4]
    rewrite(out, lambda b: (b[:first] + extra + b[first:]).replace(b'"embeddings":16', b'"embeddings":18'))
    r = import_gallery_(out, tmp_path / "new2")
    assert r["embeddings"] == 16 and r["skipped"] == 2, r
    assert sorted(people_of(tmp_path / "new2")) == [("Colin Powell", 8), ("Tony Blair", 8)]


# ------------------------------------------------------------------ 3, 4: outputs on a gallery's files or a device


def test_an_export_never_lands_on_the_gallery_it_reads(tmp_path, capsys):
    g = make(tmp_path / "g1", ["Tony Blair", "Colin Powell"])
    before, held = state(g), files(g)
    outside = tmp_path / "link.fmg"
    outside.symlink_to(g / "gallery.sqlite")
    for out in [g / "gallery.sqlite", g / "index.faiss", g / "writer.lock", g / "gallery.sqlite-wal",
                g / "milvus.db", outside]:
        code, out_text, err = cli(capsys, "gallery", "export", g, out)
        one_line_error(code, err, "gallery", "file of the gallery", "write outside the gallery folder")
        assert out_text == "" and files(g) == held and state(g) == before
    assert outside.is_symlink()
    # a new file beside the gallery's own is fine, and so is overwriting an earlier export
    for _ in range(2):
        code, out_text, err = cli(capsys, "gallery", "export", g, g / "backup.fmg")
        assert code == 0 and "exported 2 people" in out_text, err
    assert state(g) == before


def special_files(folder: Path) -> dict[str, tuple[Path, int]]:
    """A FIFO, a Unix socket and a folder (and a character device when this user may make one):
    {what: (path, st_mode kind)}. The socket stays bound while the test runs."""
    import socket

    folder.mkdir()
    out = {}
    os.mkfifo(folder / "fifo")
    out["FIFO"] = folder / "fifo"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "sock"))
    special_files.keep = sock  # kept open (and bound) until the next call
    out["socket"] = folder / "sock"
    (folder / "dir").mkdir()
    out["folder"] = folder / "dir"
    try:
        os.mknod(folder / "full", 0o666 | stat.S_IFCHR, os.makedev(1, 7))  # what /dev/full is
        out["character device"] = folder / "full"
    except (PermissionError, OSError):
        pass
    return {k: (p, stat.S_IFMT(os.lstat(p).st_mode)) for k, p in out.items()}


def test_an_export_onto_a_device_fifo_socket_or_folder_is_refused_and_keeps_its_type(tmp_path, capsys):
    from facemeta.atomic import OutputPathError, atomic_write

    g = make(tmp_path / "g1", ["Tony Blair"])
    specials = special_files(tmp_path / "special")
    for what, (path, kind) in specials.items():
        code, out_text, err = cli(capsys, "gallery", "export", g, path)
        line = one_line_error(code, err, "gallery", f"cannot write {path}")
        assert ("folder" in line) if what == "folder" else ("facemeta writes only regular files" in line), line
        assert stat.S_IFMT(os.lstat(path).st_mode) == kind, what
        with pytest.raises(OutputPathError, match="regular files|folder"), atomic_write(path) as fh:
            fh.write("x")
        assert stat.S_IFMT(os.lstat(path).st_mode) == kind, what
    assert not [p for p in (tmp_path / "special").iterdir() if p.name.endswith(".tmp")]
    if os.path.exists("/dev/full") and os.geteuid() == 0:  # the probe, refused before any rename
        with pytest.raises(OutputPathError, match="character device"):
            with atomic_write("/dev/full") as fh:
                fh.write("x")
        assert stat.S_ISCHR(os.lstat("/dev/full").st_mode)


def test_a_writer_never_overwrites_the_file_it_reads(tmp_path):
    from facemeta.atomic import OutputPathError, atomic_write

    src = tmp_path / "in.txt"
    src.write_text("keep")
    (tmp_path / "hard").hardlink_to(src)
    for out in (src, tmp_path / "hard"):
        with pytest.raises(OutputPathError, match="which this command reads"):
            with atomic_write(out, reading=[src]) as fh:
                fh.write("lost")
    assert src.read_text() == "keep"


# ------------------------------------------------------------------ 7, 8: read-only galleries, full disks


@pytest.fixture
def small_mount(tmp_path):
    """A 300 KB tmpfs mounted at tmp_path/mnt (root only; skipped where mounting is not permitted)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()[:120]}")
    try:
        yield mnt
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], capture_output=True)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def remount(mnt: Path, how: str) -> None:
    if subprocess.run(["mount", "-o", f"remount,{how}", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip(f"cannot remount the test file system {how} here")


def test_a_read_only_gallery_is_read_and_a_write_says_read_only(small_mount, data_dir, model, capsys):
    orl = data_dir / "orl"
    g = small_mount / "G"
    for s in ("s1", "s2"):
        code, _, err = cli(capsys, "enroll", g, s, orl / s / "1.pgm", "--model", model)
        assert code == 0, err
    before, held = state(g), files(g)
    remount(small_mount, "ro")
    code, out, err = cli(capsys, "gallery", "list", g)
    assert code == 0 and "s1" in out and "s2" in out, err
    code, out, err = cli(capsys, "gallery", "info", g, "--check", "--json")
    assert code == 0 and json.loads(out)["check"]["database"] == "ok", err
    code, out, err = cli(capsys, "identify", g, orl / "s2" / "2.pgm", "--model", model, "--json")
    assert code == 0, err
    code, out, err = cli(capsys, "gallery", "export", g, small_mount.parent / "g.fmg")
    assert code == 0, err
    for argv in (["enroll", g, "s3", orl / "s3" / "1.pgm", "--model", model], ["gallery", "rename", g, "s1", "x"],
                 ["gallery", "remove", g, "s1"], ["gallery", "repair", g]):
        code, _, err = cli(capsys, *argv)
        one_line_error(code, err, argv[0], "read-only")
    assert files(g) == held
    remount(small_mount, "rw")
    assert state(g) == before


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill the file system of ``folder`` up, then give back ``leave`` bytes; returns the filler file."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while fh.write(b"\0" * 4096):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def test_a_full_disk_is_told_as_disk_full_with_what_was_committed(small_mount, data_dir, model, capsys):
    orl = data_dir / "orl"
    g = small_mount / "G"
    code, _, err = cli(capsys, "enroll", g, "s1", orl / "s1" / "1.pgm", "--model", model)
    assert code == 0, err
    before = state(g)
    folder = small_mount.parent / "people"
    for i in range(2, 12):
        (folder / f"s{i}").mkdir(parents=True)
        for n in (1, 2, 3):
            shutil.copy(orl / f"s{i}" / f"{n}.pgm", folder / f"s{i}" / f"{n}.pgm")
    filler = fill(small_mount)
    code, out, err = cli(capsys, "enroll", g, "--folder", folder, "--model", model, "--no-progress")
    line = one_line_error(code, err.split("facemeta: warning:")[0], "enroll", "disk full", "not committed")
    filler.unlink()
    assert state(g) == before and "committed before it" not in line  # nothing fitted: no one was added
    # some room: a person or two fit, the rest do not, and the message counts those committed
    filler = fill(small_mount, leave=64 << 10)
    code, out, err = cli(capsys, "enroll", g, "--folder", folder, "--model", model, "--no-progress")
    lines = [x for x in err.strip().splitlines() if not x.startswith("facemeta: warning:")]
    assert code == 1 and len(lines) == 1 and "disk full" in lines[0] and "Traceback" not in err, err
    filler.unlink()
    added = [p for p in state(g)[0] if p not in before[0]]
    assert 1 <= len(added) < 10, added
    assert f"was not enrolled, the {len(added)} people ({3 * len(added)} photos) enrolled before it are " \
           "committed" in lines[0], (lines, added)
    code, out, err = cli(capsys, "gallery", "info", g, "--check", "--json")
    check = json.loads(out)["check"]
    assert code == 0 and check["database"] == "ok" and check["index_matches_database"], (out, err)


def test_an_injected_enospc_leaves_every_file_and_says_so(tmp_path, monkeypatch, capsys, caplog):
    import sqlite3

    from facemeta import atomic
    from facemeta.gallery import records

    g = make(tmp_path / "G", ["Tony Blair"])
    before = state(g)
    (tmp_path / "old.fmg").write_bytes(b"an earlier export")
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    code, out, err = cli(capsys, "gallery", "export", g, tmp_path / "old.fmg")
    one_line_error(code, err, "gallery", "disk full", "old.fmg was not written")
    assert (tmp_path / "old.fmg").read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["G", "old.fmg"]
    # the index cannot be saved at close: a warning, the change is committed, the next open catches up
    with Gallery.open(g, mode="w") as w:
        w.enroll("Colin Powell", unit(1, 9), fingerprint=FP)
    assert "disk full" in caplog.text and "committed" in caplog.text
    monkeypatch.setattr(atomic.os, "fsync", real_fsync)
    assert state(g)[0] == sorted([*before[0], ("Colin Powell", 1)])
    # SQLite's own full disk inside a change: one line, nothing of the change committed
    def sqlite_full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(records.Change, "add_embedding", sqlite_full)
    with Gallery.open(g, mode="w") as w, pytest.raises(GalleryError, match="disk full.*not committed") as err:
        w.enroll("Ada", unit(1, 10), fingerprint=FP)
    assert "\n" not in str(err.value)
    assert state(g)[0] == sorted([*before[0], ("Colin Powell", 1)])


# ------------------------------------------------------------------ 9: an ONNX contract that cannot lie


def tiny_graph(size: int = 64, dim: int = 128) -> bytes:
    """A small embedding graph made by hand (no torch export): mean colour -> linear -> L2 normalised."""
    import onnx
    from onnx import TensorProto, helper

    w = np.random.default_rng(0).standard_normal((3, dim)).astype(np.float32)
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["raw"]),
             helper.make_node("LpNormalization", ["raw"], ["embedding"], axis=1, p=2)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                           ["N", 3, size, size])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", dim])],
                              [onnx.numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


@pytest.fixture
def onnx_pair(model, tmp_path):
    """(the .onnx of a hand-made graph with a version-2 contract naming the test checkpoint, write(contract))."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from facemeta.embedder import file_fingerprint
    from facemeta.models.backbone import ModelConfig
    from facemeta.models.onnx_export import (
        CONTRACT_VERSION,
        build_contract,
        contract_path,
        numbers_digest,
        sha16,
    )

    graph = tiny_graph()
    out = tmp_path / "tiny.onnx"
    out.write_bytes(graph)
    config = ModelConfig(backbone="mobilenetv3_small_100", image_size=64, embedding_size=128)
    doc = build_contract(config, {"align_size": 112, "align_chip": "arcface", "threshold": 0.5,
                                  "threshold_far": None}, file_fingerprint(model), 18, True, "m.safetensors")
    doc.update(version=CONTRACT_VERSION, onnx_sha256=sha16(graph))
    doc["numbers_sha256"] = numbers_digest(doc)

    def write(edit=None, redigest: bool = False) -> dict:
        new = json.loads(json.dumps(doc))
        if edit:
            edit(new)
        if redigest:  # a forger's contract: its digest recomputed
            new["numbers_sha256"] = numbers_digest(new)
        contract_path(out).write_text(json.dumps(new))
        return new

    write()
    return out, write


def test_an_onnx_contract_that_lies_is_refused_in_one_line(onnx_pair, model, data_dir, capsys):
    from facemeta.errors import CheckpointError
    from facemeta.models.checkpoint import read_checkpoint_info
    from facemeta.models.onnx_export import OnnxEmbeddingModel

    out, write = onnx_pair
    a, b = lfw(data_dir, "Tony_Blair", 1), lfw(data_dir, "Colin_Powell", 1)
    verify = ["verify", a, b, "--model", model, "--runtime", "onnx", "--onnx", out, "--json"]
    code, text, err = cli(capsys, *verify)
    assert code == 0, err  # the honest contract works (a random graph: its decision means nothing)

    def size(n):
        return lambda c: c.update(image_size=n) or c["input"].update(shape=["N", 3, n, n])

    def mean(v):
        return lambda c: c["input"].update(mean=[v, v, v])

    cases = [(size(112), False, "numbers (input size, mean, std, thresholds...) are not those it was exported"),
             (mean(1e30), False, "mean values must be finite and in [-1, 2]"),
             (lambda c: c.update(threshold=-1.0), False, "not those it was exported with"),
             (size(112), True, "the graph's input is ['N', 3, 64, 64], its contract says [N, 3, 112, 112]"),
             (size(100000), True, "image_size must be in 16..1024"),
             (mean(1e30), True, "mean values must be finite and in [-1, 2]"),
             (lambda c: c["input"].update(std=[0.0, 1.0, 1.0]), True, "std values must be finite"),
             (lambda c: c.update(embedding_size=64) or c["output"].update(shape=["N", 64]), True,
              "the graph's output is ['N', 128]")]
    for edit, redigest, words in cases:
        write(edit, redigest)
        code, text, err = cli(capsys, *verify)
        one_line_error(code, err, "verify", words)
        assert text == ""
    # numbers in range that still differ from the checkpoint's own: refused when the caller gives them
    write(mean(0.9), True)
    config = read_checkpoint_info(model)["config"]
    with pytest.raises(CheckpointError, match="its contract says mean .0.9, 0.9, 0.9., the checkpoint"):
        OnnxEmbeddingModel(out, config=config)
    write()
    assert OnnxEmbeddingModel(out, config=config).embedding_size == 128


def test_an_onnx_export_never_replaces_a_checkpoint_sidecar(model, tmp_path):
    from facemeta.errors import CheckpointError
    from facemeta.models.onnx_export import export_onnx

    sidecar = model.with_suffix(".json")
    before = sidecar.read_bytes()
    with pytest.raises(CheckpointError, match="which is not an ONNX contract") as err:
        export_onnx(None, model.with_suffix(".onnx"), {}, np.zeros((1, 64, 64, 3), np.uint8))
    assert "\n" not in str(err.value) and sidecar.read_bytes() == before
    assert not model.with_suffix(".onnx").exists()


# ------------------------------------------------------------------ 10: memory per request in the service


def test_concurrent_decoding_is_bounded_by_the_pixel_budget(service, data_dir, tmp_path, capsys):
    import threading

    from fastapi.testclient import TestClient
    from PIL import Image

    from facemeta.commands import serve as serve_command
    from facemeta.serve import budget, create_app

    assert (serve_command.DEFAULT_MEGAPIXELS, serve_command.BYTES_PER_PIXEL) == \
        (budget.DEFAULT_MEGAPIXELS, budget.BYTES_PER_PIXEL)
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--max-megapixels-in-flight" in capsys.readouterr().out
    c = TestClient(create_app(service))
    photo = orl_photo = data_dir / "orl" / "s7" / "1.pgm"
    r = c.post("/api/enroll", data={"name": "s7"}, files=[("images", (photo.name, photo.read_bytes()))])
    assert r.status_code in (200, 201), r.text
    big = tmp_path / "big.jpg"  # 1.44 megapixels claimed by a small JPEG
    Image.open(lfw(data_dir, "Tony_Blair", 3)).resize((1200, 1200)).save(big, quality=70)
    saved = service.pixels
    service.pixels = budget.PixelBudget(2_000_000)  # room for one such image at a time
    statuses = []
    try:
        def ask() -> None:
            r = c.post("/api/identify", files=[("image", (big.name, big.read_bytes()))])
            statuses.append(r.status_code)

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(set(statuses)) <= [200, 422] and len(statuses) == 4, statuses
        assert service.pixels.peak == 1_440_000 and service.pixels.used == 0  # never two at once
        # a request that finds no room in time: a one-line 503, and the budget is whole again after
        service.pixels = budget.PixelBudget(2_000_000, wait=0.2)
        with service.pixels.hold(2_000_000):
            r = c.post("/api/identify", files=[("image", (big.name, big.read_bytes()))])
        assert_json_error(r, 503, "busy")
        assert service.pixels.used == 0
        r = c.post("/api/identify", files=[("image", (orl_photo.name, orl_photo.read_bytes()))])
        assert r.status_code == 200, r.text
    finally:
        service.pixels = saved
        c.delete("/api/people/s7")
    assert c.get("/api/info").json()["server"]["max_pixels_in_flight"] == budget.DEFAULT_MEGAPIXELS * 1_000_000


# ------------------------------------------------------------------ smaller: a symlinked milvus.db, uvicorn's 400s


def test_a_symlinked_milvus_lite_file_is_refused_and_not_written_through(tmp_path, capsys):
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    g = tmp_path / "G"
    x = unit(4, 1)
    with Gallery.create(g, dim=DIM, fingerprint=FP, backend="milvus") as w:
        w.enroll_many(["a", "a", "b", "b"], x, fingerprint=FP)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(g / "milvus.db", elsewhere / "milvus.db")
    (g / "milvus.db").symlink_to(elsewhere / "milvus.db")
    before = files(elsewhere)
    for mode in ("r", "w"):
        with pytest.raises(GalleryError, match="milvus.db is a symbolic link; refusing to follow it") as err:
            with Gallery.open(g, mode=mode) as opened:
                opened.search(x[:1])
        assert "\n" not in str(err.value)
    code, out, err = cli(capsys, "gallery", "info", g, "--check")  # the database is listed; the index refused
    assert code == 1 and "milvus.db is a symbolic link" in out and "Traceback" not in out + err, (out, err)
    assert files(elsewhere) == before and (g / "milvus.db").is_symlink()


def test_requests_uvicorn_cannot_parse_get_a_one_line_json_400(service):
    import socket
    import threading
    import time

    uvicorn = pytest.importorskip("uvicorn")
    from facemeta.serve import create_app
    from facemeta.serve.protocol import json_errors_protocol

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="critical",
                                           http=json_errors_protocol(), lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        assert server.started
        for raw in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
                    b"POST /api/enroll HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(raw)
                answer = b""
                while chunk := conn.recv(65536):
                    answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower(), answer
            msg = json.loads(body)["error"]
            assert msg.startswith("malformed HTTP request") and "\n" not in msg, msg
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:  # a sound request still works
            conn.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in answer, answer
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_photo_with_two_competing_faces_is_enrolled_with_a_warning_and_the_count(tmp_path, data_dir, model,
                                                                                   capsys):
    from PIL import Image

    a = np.asarray(Image.open(lfw(data_dir, "Tony_Blair", 3)).convert("RGB"))
    b = np.asarray(Image.open(lfw(data_dir, "Colin_Powell", 1)).convert("RGB"))
    two = tmp_path / "two.jpg"  # two real faces side by side: neither is clearly the subject
    Image.fromarray(np.concatenate([a, b], axis=1)).save(two, quality=95)
    code, out, err = cli(capsys, "enroll", tmp_path / "G", "Both", two, "--model", model, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["added"] == {"Both": 1} and result["embeddings"] == 1, result
    [warning] = result["warnings"]
    assert warning["image"] == str(two) and warning["warning"].startswith("2 faces compete"), warning
    assert "2 faces compete" in err and "Traceback" not in err
