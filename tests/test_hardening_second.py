"""Hardening, second pass (issue 28): cross-site writes through ``Origin: null``, look-alike names, exports
onto the gallery they read or onto a device, nested export headers and repeated chunks, read-only galleries,
full disks, an ONNX contract that could lie, memory per request in the service, and the smaller ones
(a symlinked milvus.db, uvicorn's own 400s, a photo with two faces).

Every refusal is asserted as a one-line message with its exit code or HTTP status, and the files it could
have damaged are compared before and after. Pure gallery tests use random unit vectors; the service and
enroll tests use real LFW and ORL photos and a small random checkpoint (plumbing, not what a model decides).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facemeta.cli import main
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

    svc = FaceService(tmp_path_factory.mktemp("serve") / "people", model, slots=2, threads=1)
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
