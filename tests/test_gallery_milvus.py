"""The Milvus backend (Milvus Lite, embedded): parity with FAISS on real ORL faces, every gallery verb,
SIGKILL during a large enroll, damaged and busy Lite files, a missing extra, an unreachable server.

A Milvus server cannot be run on these machines; the server path is the same code (MilvusClient by URI)
with another URI, and its failure to connect is tested here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from test_gallery_orl import eigenfaces, orl_pixels  # noqa: E402

from facemeta.cli import main  # noqa: E402
from facemeta.errors import GalleryError  # noqa: E402
from facemeta.gallery import (
    Gallery,  # noqa: E402
    milvus_index,  # noqa: E402
)

FP = "model-a"


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32))


# --------------------------------------------------------------------------- parity on real faces

def test_orl_parity_between_faiss_and_milvus(data_dir, tmp_path):
    """The same ORL gallery (photo 1 of each of 40 people) on both backends: same top-5 names for all 360
    probes, best and mean scoring, scores equal within 1e-5, same open-set decisions."""
    pixels, names, index = orl_pixels(data_dir / "orl")
    enrolled = index == 1
    x = eigenfaces(pixels, enrolled)
    people = [n for n, e in zip(names, enrolled, strict=True) if e]
    answers = {}
    for backend in ("faiss", "milvus"):
        with Gallery.create(tmp_path / backend, dim=x.shape[1], fingerprint=FP, backend=backend) as g:
            # two photos for every fifth person, so mean scoring differs from best
            extra = [i for i in np.flatnonzero(index == 2) if int(names[i][1:]) % 5 == 0]
            g.enroll_many(people + [names[i] for i in extra], np.concatenate([x[enrolled], x[extra]]),
                          fingerprint=FP)
        with Gallery.open(tmp_path / backend) as g:
            assert g.backend == backend
            answers[backend] = {s: g.search(x[~enrolled], k=5, scoring=s) for s in ("best", "mean")}
            answers[backend]["open"] = g.identify(x[~enrolled], threshold=0.5)
    for scoring in ("best", "mean"):
        a, b = answers["faiss"][scoring], answers["milvus"][scoring]
        assert [[m.name for m in ms] for ms in a] == [[m.name for m in ms] for ms in b]
        diff = max(abs(ma.score - mb.score) for ra, rb in zip(a, b, strict=True) for ma, mb in zip(ra, rb, strict=True))
        assert diff <= 1e-5, f"{scoring}: scores differ by {diff}"
    a, b = answers["faiss"]["open"], answers["milvus"]["open"]
    assert [(m.name, m.known) for m in a] == [(m.name, m.known) for m in b]
    assert any(not m.known for m in a) and any(m.known for m in a)


def test_deep_search_beyond_milvus_top_k_is_exact(tmp_path, monkeypatch):
    """Mean scoring over an identity with many photos needs deeper searches than Milvus answers (16384
    hits); past that limit the backend searches the stored vectors exactly. A limit of 8 forces it here."""
    monkeypatch.setattr(milvus_index, "MAX_TOPK", 8)
    x = random_vectors(60, 16, 0)
    names = ["crowd"] * 40 + [f"p{i}" for i in range(20)]
    q = random_vectors(10, 16, 1)
    got = {}
    for backend in ("faiss", "milvus"):
        with Gallery.create(tmp_path / backend, dim=16, fingerprint=FP, backend=backend) as g:
            g.enroll_many(names, x, fingerprint=FP)
            got[backend] = g.search(q, k=4, scoring="mean")
    assert [[m.name for m in ms] for ms in got["faiss"]] == [[m.name for m in ms] for ms in got["milvus"]]
    assert np.allclose([[m.score for m in ms] for ms in got["faiss"]],
                       [[m.score for m in ms] for ms in got["milvus"]], atol=1e-5)


# --------------------------------------------------------------------------- every verb

def test_every_gallery_verb_on_milvus(tmp_path):
    x = random_vectors(30, 32, 2)
    path = tmp_path / "g"
    with Gallery.create(path, dim=32, fingerprint=FP, backend="milvus", index="hnsw", threshold=0.3) as g:
        ids = g.enroll_many([f"p{i // 3}" for i in range(30)], x, fingerprint=FP,
                            sources=[f"/photos/{i}.jpg" for i in range(30)],
                            content_hashes=[f"h{i}" for i in range(30)])
        info = g.info()
        assert info["backend"] == "milvus" and info["milvus_uri"] == "milvus.db"
        assert info["index_built"] == "HNSW" and info["index_status"] == "ok" and info["embeddings"] == 30
        assert (path / "milvus.db").is_dir() and not (path / "index.faiss").exists()
    with Gallery.open(path, mode="w") as w, Gallery.open(path) as r:
        assert [m.name for m in r.identify(x[::3])] == [f"p{i}" for i in range(10)]
        w.rename("p1", "Zoë")
        assert w.remove("p2") == 3
        assert w.remove_embeddings([ids[0]]) == 1
        w.set_defaults(threshold=0.99)
        # the reader in the same process shares Milvus and follows the writer's commits
        got = r.identify(x[[1, 3, 6, 9]])
        assert [m.name for m in got] == ["p0", "Zoë", "unknown", "p3"]
        assert got[2].nearest is not None and got[2].nearest != "p2"
        assert {i.name: i.count for i in r.identities()}["p0"] == 2
        assert r.records("Zoë")[0].source == "/photos/3.jpg" and r.content_hashes("Zoë") == {"h3", "h4", "h5"}
        w.rebuild_index("flat")
        assert w.info()["index_built"] == "FLAT"
        chk = w.check()
        assert chk == {"database": "ok", "index_matches_database": True, "embeddings": 26, "index_count": 26}
    with Gallery.open(path) as g:  # a fresh reader: the collection was flushed at close
        assert len(g) == 26 and g.identify(x[9:10])[0].name == "p3"
        assert g.check()["index_matches_database"]


def test_cli_gallery_commands_on_milvus(tmp_path, capsys):
    """list, info --check, rename, remove, repair through the CLI (enroll/identify from photos are the same
    FaceRecognizer calls as with FAISS; tests/test_cli_gallery.py runs them, the slow test below on Milvus)."""
    path = tmp_path / "g"
    with Gallery.create(path, dim=16, fingerprint=FP, backend="milvus") as g:
        g.enroll_many(["ada", "ada", "bob"], random_vectors(3, 16, 3), fingerprint=FP)
    assert main(["gallery", "info", str(path), "--check", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "milvus" and info["check"]["index_matches_database"] is True
    assert main(["gallery", "rename", str(path), "bob", "cy"]) == 0
    assert main(["gallery", "remove", str(path), "ada"]) == 0
    assert main(["gallery", "repair", str(path)]) == 0
    out = capsys.readouterr().out
    assert "index rebuilt from the database: 1 embeddings" in out and "milvus.db.replaced-" in out
    assert main(["gallery", "list", str(path), "--json"]) == 0
    assert [p["name"] for p in json.loads(capsys.readouterr().out)] == ["cy"]


# --------------------------------------------------------------------------- durability

CHILD = textwrap.dedent("""
    import os, sys
    import numpy as np
    from facemeta.gallery import Gallery

    def vectors_for(i, n):
        v = np.random.default_rng(i).standard_normal((n, 32)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    path, start, fault_at, fault, big = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    g = Gallery.open(path, mode="w", save_interval=0.0)
    print("ready", flush=True)
    for i in range(start, start + 100000):
        if i == fault_at:
            os.environ["FACEMETA_GALLERY_FAULT"] = fault
        g.enroll(f"p{i:05d}", vectors_for(i, big if i == fault_at else 3), fingerprint="model-a")
        print(f"ok {i}", flush=True)
""")
BASE = 40


def vectors_for(i: int, n: int = 3) -> np.ndarray:
    return unit(np.random.default_rng(i).standard_normal((n, 32)).astype(np.float32))


def make_base(path: Path) -> None:
    with Gallery.create(path, dim=32, fingerprint=FP, backend="milvus") as g:
        g.enroll_many([f"p{i:05d}" for i in range(BASE) for _ in range(3)],
                      np.concatenate([vectors_for(i) for i in range(BASE)]), fingerprint=FP)


def kill_child(path: Path, fault_at: int = -1, fault: str = "", delay: float | None = None, big: int = 3) -> list[int]:
    """A large enroll in a subprocess, killed by a fault point or after ``delay`` s; the identities it reported."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(BASE), str(fault_at), fault, str(big)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    if delay is not None:
        import time

        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    return [int(line.split()[1]) for line in out.splitlines() if line.startswith("ok ")]


def assert_whole(path: Path, committed: list[int], sizes: dict[int, int] | None = None) -> int:
    """After the kill: the listing (database only) has whole people and everyone enrolled before; the
    writer's open brings Milvus up to date; search finds everyone; a fresh reader agrees."""
    sizes = sizes or {}
    with Gallery.open(path, load_index=False) as g:
        names = {i.name: i.count for i in g.identities()}
    present = sorted(int(n[1:]) for n in names)
    assert present == list(range(len(present)))
    assert len(present) - (BASE + len(committed)) in (0, 1)
    assert all(names[f"p{i:05d}"] == sizes.get(i, 3) for i in present)
    for mode in ("w", "r"):
        with Gallery.open(path, mode=mode) as g:
            chk = g.check()
            assert chk["database"] == "ok" and chk["index_matches_database"], chk
            sample = present[:: max(1, len(present) // 30)] + present[-2:]
            got = [m.name for m in g.identify(np.stack([vectors_for(i, sizes.get(i, 3))[1] for i in sample]))]
            assert got == [f"p{i:05d}" for i in sample]
    return len(present)


@pytest.mark.parametrize("fault, survives, big", [
    ("before_commit", False, 3),  # killed inside the SQLite transaction: that person is not there
    ("after_commit", True, 3),  # committed to SQLite, not yet in Milvus: the writer's open adds it
    ("milvus_insert", True, 5000),  # killed between two Milvus insert calls of one large person
])
def test_sigkill_during_a_large_enroll(tmp_path, fault, survives, big):
    make_base(tmp_path / "g")
    committed = kill_child(tmp_path / "g", fault_at=BASE + 5, fault=fault, big=big)
    assert committed == list(range(BASE, BASE + 5))
    n = assert_whole(tmp_path / "g", committed, {BASE + 5: big})
    assert n == BASE + 5 + int(survives)


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.3, 0.9, 1.7, 2.6])
def test_sigkill_at_random_moments_of_a_large_enroll(tmp_path, delay):
    make_base(tmp_path / "g")
    committed = kill_child(tmp_path / "g", delay=delay)
    assert_whole(tmp_path / "g", committed)


# --------------------------------------------------------------------------- bad files, busy files, no extra

def test_damaged_lite_file_is_one_line_then_repaired(tmp_path, capsys):
    path = tmp_path / "g"
    make_base(path)
    for parquet in (path / "milvus.db").rglob("*.parquet"):
        parquet.write_bytes(os.urandom(parquet.stat().st_size))
    for mode in ("r", "w"):
        with pytest.raises(GalleryError, match="cannot be loaded.*facemeta gallery repair") as err:
            Gallery.open(path, mode=mode)
        assert "\n" not in str(err.value)
    assert main(["gallery", "repair", str(path)]) == 0
    assert "milvus.db.replaced-" in capsys.readouterr().out
    assert_whole(path, [])


def test_lite_file_replaced_by_garbage_and_missing_collection(tmp_path):
    path = tmp_path / "g"
    make_base(path)
    import shutil

    shutil.rmtree(path / "milvus.db")
    with pytest.raises(GalleryError, match="milvus.db is missing.*facemeta gallery repair"):
        Gallery.open(path)  # a reader cannot mend it, and makes no file
    assert not (path / "milvus.db").exists()
    (path / "milvus.db").write_bytes(b"not a milvus lite file" * 10)
    with pytest.raises(GalleryError, match="cannot be opened.*facemeta gallery repair"):
        Gallery.open(path, mode="w")
    with Gallery.open(path, mode="w", repair=True) as g:
        assert g.repaired["aside"] and g.check()["index_matches_database"]


def test_lite_file_open_in_another_process_is_one_line(tmp_path):
    path = tmp_path / "g"
    make_base(path)
    with Gallery.open(path) as g:
        g.identify(vectors_for(0)[:1])  # this process holds the Lite file
        facemeta = [sys.executable, "-m", "facemeta", "gallery"]
        info = subprocess.run([*facemeta, "info", str(path), "--check"], capture_output=True, text=True, timeout=120)
        rename = subprocess.run([*facemeta, "rename", str(path), "p00001", "x"], capture_output=True, text=True,
                                timeout=120)
    assert info.returncode == 1 and "index_status: unavailable: the Milvus Lite file" in info.stdout, info.stdout
    assert rename.returncode == 1
    lines = rename.stderr.strip().splitlines()
    assert len(lines) == 1 and "is open in another process" in lines[0], rename.stderr
    # listing reads the database only: it works meanwhile
    res = subprocess.run([sys.executable, "-m", "facemeta", "gallery", "list", str(path)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and f"{BASE} people" in res.stdout


def test_missing_extra_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "g"
    with Gallery.create(path, dim=8, fingerprint=FP, backend="milvus") as g:
        g.enroll("ada", random_vectors(1, 8, 4), fingerprint=FP)
    monkeypatch.setitem(sys.modules, "pymilvus", None)
    with pytest.raises(GalleryError, match=r"pip install 'facemeta\[milvus\]'"):
        Gallery.open(path)
    with pytest.raises(GalleryError, match=r"pip install 'facemeta\[milvus\]'"):
        Gallery.create(tmp_path / "new", dim=8, fingerprint=FP, backend="milvus")
    assert not any((tmp_path / "new").iterdir())  # no half gallery left behind


def test_unreachable_server_uri_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """The server path (MilvusClient by URI, token from the environment, never stored)."""
    monkeypatch.setenv(milvus_index.TOKEN_ENV, "root:s3cret-token")
    with pytest.raises(GalleryError, match=r"cannot reach the Milvus server http://127\.0\.0\.1:9 "):
        Gallery.create(tmp_path / "g", dim=8, fingerprint=FP, backend="milvus", milvus_uri="http://127.0.0.1:9")
    assert not any((tmp_path / "g").iterdir())
    assert main(["enroll", str(tmp_path / "x"), "ada", "a.jpg", "--milvus-uri", "http://h:19530"]) == 1
    assert capsys.readouterr().err.strip() == "facemeta enroll: error: --milvus-uri needs --backend milvus"
    with pytest.raises(GalleryError, match="unknown gallery backend"):
        Gallery.create(tmp_path / "y", dim=8, fingerprint=FP, backend="pgvector")


def test_token_is_never_stored(tmp_path, monkeypatch, capsys):
    """The token reaches MilvusClient (Milvus Lite ignores it) but no file of the gallery, nor info."""
    token = "root:s3cret-token-0123"
    monkeypatch.setenv(milvus_index.TOKEN_ENV, token)
    path = tmp_path / "g"
    with Gallery.create(path, dim=8, fingerprint=FP, backend="milvus") as g:
        g.enroll("ada", random_vectors(1, 8, 5), fingerprint=FP)
        meta = json.loads(g._records.read_meta()["milvus"])
    assert meta == {"uri": "milvus.db", "collection": f"facemeta_{g.gallery_id}"}
    assert main(["gallery", "info", str(path), "--check", "--json"]) == 0
    assert "s3cret" not in capsys.readouterr().out
    files = [p for p in path.rglob("*") if p.is_file()]
    assert files and not [p for p in files if b"s3cret" in p.read_bytes()]


# --------------------------------------------------------------------------- end to end with the shipped model

@pytest.mark.slow
def test_orl_end_to_end_with_the_shipped_model_on_both_backends(tmp_path, data_dir, monkeypatch, capsys):
    """`facemeta enroll --backend milvus` and `facemeta identify` from photos: the same answers and scores
    as the FAISS gallery for every ORL probe (photo 1 enrolled per person)."""
    monkeypatch.delenv("FACEMETA_MODEL", raising=False)
    orl = data_dir / "orl"
    enroll_dir = tmp_path / "enroll"
    for person in orl.iterdir():
        if person.is_dir():
            (enroll_dir / person.name).mkdir(parents=True)
            os.symlink(person / "1.pgm", enroll_dir / person.name / "1.pgm")
    probes = sorted(str(p) for p in orl.glob("s*/*.pgm") if p.name != "1.pgm")
    answers = {}
    for backend in ("faiss", "milvus"):
        assert main(["enroll", str(tmp_path / backend), "--folder", str(enroll_dir), "--backend", backend,
                     "--no-progress"]) == 0
        capsys.readouterr()
        assert main(["identify", str(tmp_path / backend), *probes, "--json", "--no-progress", "--threshold", "-1"]) == 0
        answers[backend] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    a, b = answers["faiss"], answers["milvus"]
    assert len(a) == len(b) == 360
    for ra, rb in zip(a, b, strict=True):
        fa, fb = ra["faces"][0], rb["faces"][0]
        assert fa["identity"] == fb["identity"] and abs(fa["score"] - fb["score"]) <= 1e-5
    rank1 = np.mean([max(r["faces"], key=lambda f: f["score"])["identity"] == Path(r["image"]).parent.name for r in b])
    print(f"ORL rank-1 on Milvus Lite, shipped model: {rank1:.3f}")
    assert rank1 >= 0.97


# --------------------------------------------------------------------------- the service and 1:1 verification

def test_serve_and_verify_person_on_milvus(prior_model, data_dir, tmp_path, capsys, one_torch_thread):
    """`facemeta serve`'s service over a Milvus Lite gallery it creates on the first enroll (the reader and each
    request's writer share the Lite file in one process), then `facemeta verify A --person` against it."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from facemeta.serve import FaceService, create_app

    orl = data_dir / "orl"

    def upload(subject: str, n: int):
        return ("images", (f"{subject}-{n}.pgm", (orl / subject / f"{n}.pgm").read_bytes(), "image/x-portable-graymap"))

    path = tmp_path / "people"
    svc = FaceService(path, prior_model.model_path, slots=1, backend="milvus")
    try:
        client = TestClient(create_app(svc))
        for subject in ("s1", "s2", "s3"):
            r = client.post("/api/enroll", data={"name": subject}, files=[upload(subject, 1), upload(subject, 2)])
            assert r.status_code == 201, r.text
        assert client.get("/api/info").json()["gallery"]["backend"] == "milvus"
        found = client.post("/api/identify", files={"image": upload("s2", 7)[1]}).json()
        assert found["faces"][0]["identity"] == "s2", found
        assert client.patch("/api/people/s2", json={"name": "Bob"}).status_code == 200
        assert client.delete("/api/people/s3").status_code == 200
        assert sorted(p["name"] for p in client.get("/api/people").json()["people"]) == ["Bob", "s1"]
        found = client.post("/api/identify", files={"image": upload("s2", 8)[1]}).json()
        assert found["faces"][0]["identity"] == "Bob", found
    finally:
        svc.close()
    model = str(prior_model.model_path)
    assert main(["verify", str(orl / "s2" / "9.pgm"), "--gallery", str(path), "--person", "Bob", "--model", model,
                 "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert main(["verify", str(orl / "s1" / "9.pgm"), "--gallery", str(path), "--person", "Bob", "--model", model,
                 "--json"]) == 0
    other = json.loads(capsys.readouterr().out)
    # The prior's cosines are high for everyone (another ORL person scores ~0.91 against a threshold of ~0.91):
    # the same person must pass with margin and score clearly above someone else.
    assert same["person"] == "Bob" and same["same"] is True and same["score"] > same["threshold"] + 0.03
    assert same["score"] > other["score"] + 0.03
    assert main(["verify", str(orl / "s2" / "9.pgm"), "--gallery", str(path), "--person", "s3", "--model", model]) == 1
    assert "no identity named 's3'" in capsys.readouterr().err
    assert main(["verify", str(orl / "s2" / "9.pgm"), "--person", "Bob", "--model", model]) == 1
    assert "--gallery GALLERY --person NAME" in capsys.readouterr().err
