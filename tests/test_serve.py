"""`facemeta serve`'s API through FastAPI's TestClient: real photos, the prior (a model that recognises faces),
a gallery in tmp. One service (one loaded model) for the module; the key, read-only and Host-checked apps share it."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the 'serve' extra (fastapi, uvicorn, python-multipart) is not installed")
pytest.importorskip("multipart", reason="python-multipart is not installed")
pytest.importorskip("httpx", reason="httpx (FastAPI's TestClient) is not installed")

from fastapi.testclient import TestClient  # noqa: E402

from facemeta.cli import main  # noqa: E402
from facemeta.serve import FaceService, create_app  # noqa: E402

KEY = "k3y-for-the-tests-0123456789"
MAX_UPLOAD = 1 << 20  # 1 MB: the test photos are ~10 kB
ORL_ENROLLED = ("s1", "s2", "s3", "s4")


pytestmark = pytest.mark.usefixtures("module_on_one_torch_thread")


@pytest.fixture(scope="module")
def service(prior_model, tmp_path_factory, module_on_one_torch_thread):
    svc = FaceService(tmp_path_factory.mktemp("serve") / "people", prior_model.model_path, slots=2)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service, max_upload_bytes=MAX_UPLOAD))


@pytest.fixture(scope="module")
def enrolled(client, data_dir):
    """Photo 1 of four ORL subjects, enrolled through the API."""
    for s in ORL_ENROLLED:
        r = client.post("/api/enroll", data={"name": s}, files=[("images", upload(data_dir / "orl" / s / "1.pgm"))])
        assert r.status_code == 201, r.text
    return ORL_ENROLLED


def upload(path, name: str | None = None):
    return (name or path.name, path.read_bytes(), "application/octet-stream")


def lfw(data_dir, name: str, n: int):
    return data_dir / "lfw" / "images" / name / f"{name}_{n:04d}.jpg"


def assert_error(r, status: int, *words: str) -> str:
    """A one-line JSON error {"error": ...} with this status (and these words in it)."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    msg = body["error"]
    assert msg and "\n" not in msg and "Traceback" not in msg and "/tmp/facemeta-upload" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def jpeg_side(data_url: str) -> tuple[int, int]:
    assert data_url.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))) as im:
        assert im.format == "JPEG"
        return im.size


# ---------------------------------------------------------------- reads
def test_health_and_info(client, prior_model):
    assert client.get("/api/health").json()["status"] == "ok"
    info = client.get("/api/info").json()
    assert len(info["model"]["fingerprint"]) == 16 and info["model"]["embedding_size"] == 128
    assert -1 < info["model"]["threshold"] < 1 and info["model"]["name"] == prior_model.model_path.name
    assert info["model"]["threshold_far"] == pytest.approx(1e-2)
    assert info["server"] == {**info["server"], "read_only": False, "auth": False, "max_upload_bytes": MAX_UPLOAD,
                              "inference_slots": 2}
    page = client.get("/")
    assert page.status_code == 200 and "<title>facemeta</title>" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/api/verify", "/api/identify", "/api/enroll",
                                                                   "/api/people", "/api/people/{name}", "/api/info"}


def test_verify_same_and_different_people(client, data_dir):
    same = client.post("/api/verify", files={"a": upload(lfw(data_dir, "Bill_Gates", 1)),
                                              "b": upload(lfw(data_dir, "Bill_Gates", 2))})
    assert same.status_code == 200, same.text
    s = same.json()
    assert s["decision"] == "same" and s["same"] and s["score"] >= s["threshold"], s
    assert s["threshold_far"] == pytest.approx(1e-2)
    assert [f["file"] for f in s["faces"]] == ["Bill_Gates_0001.jpg", "Bill_Gates_0002.jpg"]
    assert all(jpeg_side(f["aligned"]) == (112, 112) for f in s["faces"])
    diff = client.post("/api/verify", files={"a": upload(lfw(data_dir, "Bill_Gates", 1)),
                                              "b": upload(lfw(data_dir, "Anna_Kournikova", 1))}).json()
    assert diff["decision"] == "different" and not diff["same"] and diff["score"] < diff["threshold"], diff
    assert s["score"] - diff["score"] > 0.05, (s["score"], diff["score"])  # not a coin toss


def test_identify_enrolled_and_unknown(client, enrolled, data_dir):
    r = client.post("/api/identify", files={"image": upload(data_dir / "orl" / "s2" / "5.pgm")})
    assert r.status_code == 200, r.text
    res = r.json()
    (face,) = res["faces"]
    assert face["identity"] == "s2" and face["score"] >= res["threshold"], res
    assert len(face["box"]) == 4 and [c["identity"] for c in face["candidates"]][0] == "s2"
    assert len(face["candidates"]) == 3 and res["threshold_far"] == pytest.approx(1e-2)
    assert res["image"] == {"width": 92, "height": 112, "preview": None}
    with_preview = client.post("/api/identify", files={"image": upload(data_dir / "orl" / "s2" / "5.pgm")},
                               data={"preview": "true", "top_k": "1"}).json()
    assert jpeg_side(with_preview["image"]["preview"]) == (92, 112) and len(with_preview["faces"][0]["candidates"]) == 1
    # someone never enrolled: an LFW face against four ORL subjects. The probe is one the prior places well below the
    # threshold (best match about 0.83 against about 0.91 on this machine; Bill Gates, used before, scored 0.909
    # against s4 with alignment pipeline 5: a decision that close to the threshold is a coin toss across CPUs)
    res = client.post("/api/identify", files={"image": upload(lfw(data_dir, "Serena_Williams", 1))}).json()
    assert [f["identity"] for f in res["faces"]] == ["unknown"], res
    assert res["faces"][0]["score"] < res["threshold"] - 0.03 and face["score"] - res["faces"][0]["score"] > 0.1


def test_enroll_list_rename_remove(client, enrolled, data_dir, service):
    photos = [upload(data_dir / "orl" / "s7" / f"{i}.pgm", f"ada{i}.pgm") for i in (1, 2)]
    r = client.post("/api/enroll", data={"name": "  Ada Lovelace "},
                    files=[("images", p) for p in photos] + [("images", ("notes.txt", b"not a photo", "text/plain"))])
    assert r.status_code == 201, r.text
    res = r.json()
    assert res["name"] == "Ada Lovelace" and res["added"] == 2 and res["person"]["count"] == 2
    assert [(s["file"], s["reason"]) for s in res["skipped"]] == [("notes.txt", "notes.txt: not an image (format not recognised)")]
    # the same photos again: nothing new (200), both reported as already enrolled
    again = client.post("/api/enroll", data={"name": "Ada Lovelace"}, files=[("images", p) for p in photos])
    assert again.status_code == 200 and again.json()["already"] == 2 and again.json()["added"] == 0, again.text
    people = {p["name"]: p for p in client.get("/api/people").json()["people"]}
    assert set(people) == {*ORL_ENROLLED, "Ada Lovelace"} and people["Ada Lovelace"]["count"] == 2
    thumb = client.get(people["Ada Lovelace"]["thumbnail"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == (112, 112)
    ident = people["Ada Lovelace"]["id"]
    assert (service.path / "thumbnails" / f"{ident}.jpg").is_file()
    from facemeta.gallery import Gallery

    with Gallery.open(service.path, load_index=False) as g:  # the upload's name is recorded, not a temporary path
        assert [r.source for r in g.records("Ada Lovelace")] == ["upload:ada1.pgm", "upload:ada2.pgm"]
    # the new person is found at once by the reader (it refreshes from the database)
    found = client.post("/api/identify", files={"image": upload(data_dir / "orl" / "s7" / "5.pgm")}).json()
    assert found["faces"][0]["identity"] == "Ada Lovelace", found

    r = client.patch("/api/people/Ada Lovelace", json={"name": "Augusta Ada King"})
    assert r.status_code == 200 and r.json() == {"old": "Ada Lovelace", "name": "Augusta Ada King", "id": ident}
    r = client.post("/api/rename", json={"name": "Augusta Ada King", "new_name": "Ada/King"})  # POST form of rename
    assert r.status_code == 200, r.text
    people = {p["name"]: p for p in client.get("/api/people").json()["people"]}
    assert "Ada/King" in people and people["Ada/King"]["id"] == ident  # the thumbnail follows (keyed by id)
    assert client.get(people["Ada/King"]["thumbnail"]).status_code == 200

    r = client.delete("/api/people/Ada%2FKing")
    assert r.status_code == 200 and r.json() == {"removed": "Ada/King", "id": ident, "embeddings": 2}
    assert "Ada/King" not in {p["name"] for p in client.get("/api/people").json()["people"]}
    assert not (service.path / "thumbnails" / f"{ident}.jpg").exists()
    assert_error(client.get(f"/api/thumbnails/{ident}"), 404)
    gone = client.post("/api/identify", files={"image": upload(data_dir / "orl" / "s7" / "5.pgm")}).json()
    assert gone["faces"][0]["identity"] == "unknown", gone


def test_thumbnail_of_someone_enrolled_by_the_cli(client, enrolled, service, data_dir, prior_model):
    """A person enrolled outside the server (another process's writer) shows up at once, and their
    thumbnail is made from the stored source photo on first request."""
    code = main(["enroll", str(service.path), "Cli Person", str(data_dir / "orl" / "s9" / "1.pgm"),
                 "--model", str(prior_model.model_path), "--no-progress"])
    assert code == 0
    people = {p["name"]: p for p in client.get("/api/people").json()["people"]}
    ident = people["Cli Person"]["id"]
    assert not (service.path / "thumbnails" / f"{ident}.jpg").exists()
    r = client.get(f"/api/thumbnails/{ident}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert (service.path / "thumbnails" / f"{ident}.jpg").is_file()
    assert client.delete("/api/people/Cli Person").status_code == 200


# ---------------------------------------------------------------- errors: one line, a 4xx, and the server goes on
def test_errors_are_one_line_4xx(client, enrolled, data_dir, tmp_path):
    good = upload(lfw(data_dir, "Bill_Gates", 1))
    grey = io.BytesIO()
    Image.fromarray(np.full((160, 160, 3), 128, np.uint8)).save(grey, format="PNG")

    assert_error(client.post("/api/verify", files={"a": ("junk.jpg", b"this is not a JPEG"), "b": good}), 400,
                 "junk.jpg", "not an image")
    assert_error(client.post("/api/verify", files={"a": ("empty.jpg", b""), "b": good}), 400, "empty.jpg")
    truncated = lfw(data_dir, "Bill_Gates", 1).read_bytes()[:600]
    assert_error(client.post("/api/identify", files={"image": ("cut.jpg", truncated)}), 400, "cut.jpg")
    assert_error(client.post("/api/identify", files={"image": ("wall.png", grey.getvalue())}), 422, "no face", "wall.png")
    assert_error(client.post("/api/verify", files={"a": ("wall.png", grey.getvalue()), "b": good}), 422, "no face")
    assert_error(client.post("/api/enroll", data={"name": "Nobody"}, files=[("images", ("wall.png", grey.getvalue()))]),
                 422, "wall.png")
    # a body over the cap: declared (refused before reading) and streamed without a length (cut while reading)
    big = ("big.jpg", b"\xff" * (MAX_UPLOAD + 1))
    assert_error(client.post("/api/verify", files={"a": big, "b": good}), 413, "upload too large", "1 MB")

    def chunks():
        yield b"--x\r\nContent-Disposition: form-data; name=\"a\"; filename=\"a.jpg\"\r\n\r\n"
        for _ in range(40):
            yield b"\0" * 65536

    assert_error(client.post("/api/verify", content=chunks(),
                             headers={"content-type": "multipart/form-data; boundary=x"}), 413, "upload too large")
    # unknown person, bad names, a name taken
    assert_error(client.delete("/api/people/nobody"), 404, "nobody")
    assert_error(client.patch("/api/people/nobody", json={"name": "x"}), 404)
    assert_error(client.get("/api/thumbnails/987654"), 404)
    for bad in ("unknown", "   ", "evil\u202etxt", "tab\there", "x" * 300):
        assert_error(client.post("/api/enroll", data={"name": bad}, files=[("images", good)]), 422)
    assert_error(client.patch("/api/people/s1", json={"name": "line\nbreak"}), 422, "name")
    assert_error(client.patch("/api/people/s1", json={"name": "s2"}), 409, "s2")
    # malformed requests
    assert_error(client.post("/api/verify", files={"a": good}), 422, "b")
    assert_error(client.post("/api/identify", files={"image": good}, data={"top_k": "0"}), 422, "top_k")
    assert_error(client.post("/api/verify", files={"a": good, "b": good}, data={"threshold": "7"}), 400, "threshold")
    assert_error(client.patch("/api/people/s1", content=b"{not json", headers={"content-type": "application/json"}), 422)
    assert_error(client.get("/api/no-such-route"), 404)
    assert_error(client.put("/api/people"), 405)
    # and the server still answers good requests
    r = client.post("/api/identify", files={"image": upload(data_dir / "orl" / "s1" / "5.pgm")})
    assert r.status_code == 200 and r.json()["faces"][0]["identity"] == "s1", r.text
    assert {p["name"] for p in client.get("/api/people").json()["people"]} == set(ORL_ENROLLED)


def test_api_key(service, data_dir, enrolled):
    keyed = TestClient(create_app(service, api_key=KEY, max_upload_bytes=MAX_UPLOAD))
    assert keyed.get("/api/health").status_code == 200  # no key needed
    assert keyed.get("/").status_code == 200 and keyed.get("/static/app.js").status_code == 200
    assert_error(keyed.get("/api/people"), 401, "missing API key")
    assert_error(keyed.get("/api/people", headers={"X-API-Key": KEY[:-1] + "X"}), 401, "wrong API key")
    assert_error(keyed.get("/api/info", headers={"Authorization": "Basic " + KEY}), 401)
    r = keyed.get("/api/people", headers={"X-API-Key": KEY})
    assert r.status_code == 200 and r.json()["count"] == len(ORL_ENROLLED)
    assert keyed.get("/api/info", headers={"Authorization": f"Bearer {KEY}"}).json()["server"]["auth"] is True
    # refused before the body is read: no key + a body over the cap is a 401, not a 413
    assert_error(keyed.post("/api/verify", files={"a": ("a.jpg", b"\0" * (MAX_UPLOAD + 10))}), 401)
    r = keyed.post("/api/identify", headers={"X-API-Key": KEY},
                   files={"image": upload(data_dir / "orl" / "s3" / "5.pgm")})
    assert r.status_code == 200 and r.json()["faces"][0]["identity"] == "s3", r.text


def test_read_only(service, prior_model, data_dir, enrolled):
    ro = FaceService(service.path, embedder=service.embedder, read_only=True, slots=1)
    try:
        c = TestClient(create_app(ro))
        assert_error(c.post("/api/enroll", data={"name": "x"}, files=[("images", upload(data_dir / "orl" / "s5" / "1.pgm"))]),
                     403, "read-only")
        assert_error(c.patch("/api/people/s1", json={"name": "y"}), 403, "read-only")
        assert_error(c.delete("/api/people/s1"), 403, "read-only")
        assert c.get("/api/info").json()["server"]["read_only"] is True
        assert {p["name"] for p in c.get("/api/people").json()["people"]} == set(ORL_ENROLLED)
        r = c.post("/api/identify", files={"image": upload(data_dir / "orl" / "s4" / "5.pgm")})
        assert r.status_code == 200 and r.json()["faces"][0]["identity"] == "s4"
    finally:
        ro.close()


def test_cross_site_writes_and_foreign_hosts_refused(service, data_dir):
    c = TestClient(create_app(service, allowed_hosts=["127.0.0.1", "localhost", "::1"]), base_url="http://127.0.0.1:8000")
    assert c.get("/api/health").status_code == 200
    assert c.get("/api/health", headers={"Host": "[::1]:8000"}).status_code == 200
    assert_error(c.get("/api/people", headers={"Host": "evil.example:8000"}), 400, "Host")
    assert_error(c.delete("/api/people/s1", headers={"Origin": "http://evil.example"}), 403, "cross-site")
    assert_error(c.post("/api/verify", headers={"Origin": "http://evil.example"}), 403)
    r = c.delete("/api/people/nobody", headers={"Origin": "http://127.0.0.1:8000"})  # same origin passes the gate
    assert_error(r, 404)


def test_parallel_reads_while_writing(client, enrolled, data_dir):
    """Identify from four threads while a fifth enrolls and removes someone: every answer is right."""
    results, errors = [], []

    def reader(subject: str) -> None:
        try:
            for _ in range(2):
                r = client.post("/api/identify", files={"image": upload(data_dir / "orl" / subject / "6.pgm")})
                results.append((subject, r.status_code, r.json()["faces"][0]["identity"]))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def writer() -> None:
        try:
            for _ in range(2):
                r = client.post("/api/enroll", data={"name": "temp"},
                                files=[("images", upload(data_dir / "orl" / "s20" / "1.pgm"))])
                results.append(("enroll", r.status_code, r.json().get("added")))
                r = client.delete("/api/people/temp")
                results.append(("remove", r.status_code, r.json().get("embeddings")))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(s,)) for s in ORL_ENROLLED] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    reads = [r for r in results if r[0] in ORL_ENROLLED]
    assert len(reads) == 8 and all(code == 200 and who == s for s, code, who in reads), reads
    assert [r for r in results if r[0] == "enroll"] == [("enroll", 201, 1)] * 2
    assert [r for r in results if r[0] == "remove"] == [("remove", 200, 1)] * 2


def test_cli_serve_refuses_bad_options(tmp_path, capsys):
    key = tmp_path / "key"
    key.write_text("short\n")
    assert main(["serve", str(tmp_path / "g"), "--api-key-file", str(key)]) == 1
    assert "at least 16" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "g"), "--api-key-file", str(tmp_path / "missing")]) == 1
    assert "cannot read --api-key-file" in capsys.readouterr().err
    for opt in (["--max-upload-mb", "0"], ["--threads", "0"], ["--port", "70000"]):
        assert main(["serve", str(tmp_path / "g"), *opt]) == 1
        err = capsys.readouterr().err
        assert err.startswith("facemeta serve: error: ") and err.count("\n") == 1, err


def test_unexpected_failure_is_a_logged_500_one_liner(service, monkeypatch, caplog):
    c = TestClient(create_app(service), raise_server_exceptions=False)

    def broken():
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(service, "people", broken)
    assert_error(c.get("/api/people"), 500, "internal error (RuntimeError)")
    assert "disk on fire" in caplog.text  # logged with its traceback, not sent to the client
    monkeypatch.undo()
    assert c.get("/api/people").status_code == 200
