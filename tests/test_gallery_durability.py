"""Gallery durability: SIGKILL during a large enroll, damaged files, another dimension or model.

A kill leaves a gallery that opens consistent (index ids == database ids, search works) with every
identity committed before it intact; damaged or foreign files raise GalleryError and are left
byte-for-byte as they were.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from facemeta.errors import GalleryError
from facemeta.gallery import Gallery
from facemeta.gallery.index_file import read_index_header

DIM = 128
FP = "model-a"
BASE = 150  # identities enrolled before the killed process starts
PER_ID = 3

CHILD = textwrap.dedent("""
    import os, sys
    import numpy as np
    from facemeta.gallery import Gallery

    def vectors_for(i):
        return np.random.default_rng(i).standard_normal((3, 128)).astype(np.float32)

    path, start, n, fault_at, fault = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    g = Gallery.open(path, mode="w", save_interval=0.0)  # save the index after every change
    print("ready", flush=True)
    for i in range(start, start + n):
        if i == fault_at:
            os.environ["FACEMETA_GALLERY_FAULT"] = fault
        g.enroll(f"p{i:05d}", vectors_for(i), fingerprint="model-a", sources=[f"/faces/{i}/{j}.png" for j in range(3)])
        print(f"ok {i}", flush=True)
    g.close()
""")


def vectors_for(i: int) -> np.ndarray:
    v = np.random.default_rng(i).standard_normal((PER_ID, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_base(path: Path) -> None:
    with Gallery.create(path, dim=DIM, fingerprint=FP) as g:
        for start in range(0, BASE, 50):
            ids = range(start, start + 50)
            g.enroll_many([f"p{i:05d}" for i in ids for _ in range(PER_ID)], np.concatenate([vectors_for(i) for i in ids]),
                          fingerprint=FP)


def run_child(path: Path, delay: float | None, fault_at: int = -1, fault: str = "") -> list[int]:
    """Start a large enroll in a subprocess and SIGKILL it after `delay` s (or let a fault kill it);
    returns the identities it reported committed."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(BASE), "100000", str(fault_at), fault],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    if delay is not None:
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err
    return [int(line.split()[1]) for line in out.splitlines() if line.startswith("ok ")]


def assert_consistent(path: Path, committed: list[int]) -> int:
    """Open after the crash: ids agree, every committed identity is whole, search finds each."""
    for mode in ("r", "w"):  # a reader reconciles in memory; the writer also saves the index
        with Gallery.open(path, mode=mode, lock_timeout=2) as g:
            chk = g.check()
            assert chk["database"] == "ok" and chk["index_matches_database"], chk
            names = {i.name: i.count for i in g.identities()}
            present = sorted(int(n[1:]) for n in names)
            # A prefix of the enroll survived: everything reported committed, plus at most the
            # one transaction that committed before its "ok" line was printed.
            assert present == list(range(len(present)))
            assert len(present) - (BASE + len(committed)) in (0, 1)
            assert all(c == PER_ID for c in names.values())  # no half-enrolled identity
            for i in [0, BASE - 1, *present[BASE:][-3:]]:
                assert np.allclose(g.vectors(f"p{i:05d}"), vectors_for(i), atol=1e-6)
            sample = present[:: max(1, len(present) // 40)] + present[-2:]
            got = [m.name for m in g.identify(np.stack([vectors_for(i)[1] for i in sample]))]
            assert got == [f"p{i:05d}" for i in sample]
            assert len(g) == PER_ID * len(present)
    header = read_index_header(path / "index.faiss")
    with Gallery.open(path) as g:
        assert header["generation"] == g.generation and header["count"] == len(g)
    return len(present)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_sigkill_at_a_random_point_of_a_large_enroll(tmp_path, seed):
    make_base(tmp_path / "g")
    delay = random.Random(seed).uniform(0.05, 0.9)
    committed = run_child(tmp_path / "g", delay)
    torn = len(list((tmp_path / "g").glob(".index.faiss.*.tmp")))  # killed mid index write?
    n = assert_consistent(tmp_path / "g", committed)
    assert not list((tmp_path / "g").glob(".index.faiss.*.tmp"))  # the writer cleaned them up
    print(f"killed after {delay:.2f}s: {len(committed)} identities reported committed, {n - BASE} found, "
          f"{torn} half-written index file(s) left")


@pytest.mark.parametrize("fault, survives", [("before_commit", False), ("after_commit", True)])
def test_sigkill_just_before_and_after_a_commit(tmp_path, fault, survives):
    make_base(tmp_path / "g")
    committed = run_child(tmp_path / "g", None, fault_at=BASE + 7, fault=fault)
    assert committed == list(range(BASE, BASE + 7))
    n = assert_consistent(tmp_path / "g", committed)
    assert n == BASE + 7 + int(survives)


# --------------------------------------------------------------------------- damaged files

def snapshot(path: Path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in ("gallery.sqlite", "index.faiss")}


def assert_refused(path: Path, pattern: str) -> None:
    before = snapshot(path)
    for mode in ("r", "w"):
        with pytest.raises(GalleryError, match=pattern):
            Gallery.open(path, mode=mode, lock_timeout=1)
    assert snapshot(path) == before, "a failed open changed the gallery's files"


@pytest.fixture
def base(tmp_path) -> Path:
    make_base(tmp_path / "g")
    return tmp_path / "g"


def _damage_index(path: Path, how: str, tmp_path: Path) -> None:
    idx = path / "index.faiss"
    data = bytearray(idx.read_bytes())
    if how == "truncated":
        idx.write_bytes(data[: len(data) // 2])
    elif how == "bitflip":
        data[len(data) - 1000] ^= 0x40
        idx.write_bytes(data)
    elif how == "garbage":
        idx.write_bytes(os.urandom(len(data)))
    elif how == "empty":
        idx.write_bytes(b"")
    elif how in ("other_dim", "other_model"):
        other = tmp_path / how
        with Gallery.create(other, dim=64 if how == "other_dim" else DIM,
                            fingerprint=FP if how == "other_dim" else "model-b") as g:
            g.enroll("someone", np.ones(64 if how == "other_dim" else DIM), fingerprint=g.fingerprint)
        shutil.copyfile(other / "index.faiss", idx)


@pytest.mark.parametrize("how, pattern", [
    ("truncated", "truncated"), ("bitflip", "checksum"), ("garbage", "not a facemeta gallery index"),
    ("empty", "not a facemeta gallery index"), ("other_dim", "64-d vectors but the gallery is 128-d"),
    ("other_model", "belongs to model 'model-b'"),
])
def test_damaged_or_foreign_index_is_refused_untouched_then_repaired(base, tmp_path, how, pattern):
    _damage_index(base, how, tmp_path)
    damaged = (base / "index.faiss").read_bytes()
    assert_refused(base, pattern)
    with pytest.raises(GalleryError, match="gallery repair"):
        Gallery.open(base)
    with Gallery.open(base, mode="w", repair=True) as g:  # rebuilt from the database
        assert g.check()["index_matches_database"] and len(g) == BASE * PER_ID
        assert g.identify(vectors_for(7)[0])[0].name == "p00007"
    kept = list(base.glob("index.faiss.damaged-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == damaged


@pytest.mark.parametrize("how, pattern", [
    ("truncated", "truncated"), ("garbage", "not an SQLite database"), ("schema", "corrupt"),
    ("empty", "not an SQLite database"),
])
def test_damaged_database_is_refused_untouched(base, how, pattern):
    db = base / "gallery.sqlite"
    data = bytearray(db.read_bytes())
    assert len(data) > 50_000
    if how == "truncated":
        db.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        db.write_bytes(os.urandom(len(data)))
    elif how == "schema":  # keep the 100-byte header, scramble the rest of page 1 (the schema)
        data[100:4096] = random.Random(0).randbytes(3996)
        db.write_bytes(data)
    elif how == "empty":
        db.write_bytes(b"")
    assert_refused(base, pattern)


def test_reader_sees_only_whole_transactions_while_another_process_writes(base):
    """A reader refreshing while a writer process enrolls sees every identity whole (3 of 3
    embeddings) and an index that matches its snapshot of the database."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(base), str(BASE), "100000", "-1", ""],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with Gallery.open(base) as r:
            seen = set()
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                r.refresh()
                n = len(r)
                assert n % PER_ID == 0 and r._index.built.count == n
                newest = n // PER_ID - 1
                assert r.search(vectors_for(newest)[2], refresh=False)[0][0].name == f"p{newest:05d}"
                seen.add(n)
        assert len(seen) >= 3, "the writer made no visible progress"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
