"""Bad input from a clumsy user or an attacker: every command answers with one line and an exit code, and
folder jobs record the bad image and go on (issue 12: images, model metadata, command-line values, configs,
align destinations, error wording, images packed in .bin files).

The malformed images are generated here, from a real LFW photo: sizes 1 to 20 px, extreme aspect ratios,
random bytes behind valid format headers, truncations at random offsets, and the photo in every image mode
Pillow can write.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facemeta.cli import main

SEED = 12  # the malformed set is the same on every machine


pytestmark = pytest.mark.usefixtures("module_on_one_torch_thread")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Run `facemeta ARGV` in this process; an uncaught exception (a traceback) fails the test by itself."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, command: str) -> str:
    """The single stderr line of a failed command (asserting there is exactly one, and no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"facemeta {command}: error:"), err
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------- the malformed images

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png(width: int, height: int) -> bytes:
    """A valid PNG claiming width x height pixels of zeros, as a compressor would really write it (small)."""
    row = b"\0" * (1 + 3 * width)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def malformed_images(folder: Path, face_jpg: Path) -> dict[str, tuple[Path, bool]]:
    """{name: (path, hopeless)}: a few dozen bad images; `hopeless` ones can hold no usable face at all
    (the others are the real photo in an unusual mode, which a command may well use)."""
    rng = np.random.default_rng(SEED)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[Path, bool]] = {}
    face = Image.open(face_jpg).convert("RGB")
    for w, h in [(1, 1), (2, 2), (5, 5), (9, 9), (13, 13), (16, 16), (19, 19), (20, 20), (1, 20), (20, 1),
                 (3000, 2), (2, 3000), (4000, 12), (12, 4000)]:
        path = folder / f"size-{w}x{h}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        out[path.stem] = (path, True)
    small_face = folder / "face-shrunk-12px.png"
    face.resize((12, 12)).save(small_face)
    out[small_face.stem] = (small_face, True)
    headers = {"png": b"\x89PNG\r\n\x1a\n", "jpg": b"\xff\xd8\xff\xe0", "gif": b"GIF89a", "bmp": b"BM",
               "tif": b"II*\x00", "webp": b"RIFF\x00\x10\x00\x00WEBPVP8 "}
    for ext, head in headers.items():
        path = folder / f"random-{ext}.{ext}"
        path.write_bytes(head + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
        out[path.stem] = (path, True)
    data = face_jpg.read_bytes()
    png = folder / "face.png"
    face.save(png)
    for name, blob in (("jpg", data), ("png", png.read_bytes())):
        for cut in sorted(rng.integers(20, len(blob) - 200, 3)):
            path = folder / f"truncated-{cut}-{name}.{name}"
            path.write_bytes(blob[:cut])
            out[path.stem] = (path, True)
    png.unlink()
    for mode, ext in [("1", "png"), ("L", "png"), ("LA", "png"), ("P", "png"), ("RGBA", "png"), ("CMYK", "jpg"),
                      ("CMYK", "tif"), ("YCbCr", "tif"), ("LAB", "tif"), ("F", "tif"), ("I", "tif"),
                      ("RGBA", "webp"), ("P", "gif"), ("L", "bmp")]:
        path = folder / f"mode-{mode}-{ext}.{ext}"
        face.convert(mode).save(path)
        out[path.stem] = (path, False)
    grey16 = folder / "mode-I16.png"
    Image.fromarray(np.asarray(face.convert("L"), np.uint16) * 257).save(grey16)
    out["mode-I16"] = (grey16, False)
    return out


@pytest.fixture(scope="module")
def malformed(data_dir, tmp_path_factory):
    return malformed_images(tmp_path_factory.mktemp("malformed"),
                            data_dir / "lfw" / "images" / "Aaron_Sorkin" / "Aaron_Sorkin_0001.jpg")


@pytest.fixture(scope="module")
def gallery_of_two(prior_model, data_dir, tmp_path_factory):
    """A gallery with two real LFW people, enrolled by the CLI."""
    gallery = tmp_path_factory.mktemp("gallery") / "g"
    lfw = data_dir / "lfw" / "images"
    for name in ("Tony_Blair", "Colin_Powell"):
        code = main(["enroll", str(gallery), name, str(lfw / name / f"{name}_0001.jpg"),
                     "--model", str(prior_model.model_path), "--no-progress"])
        assert code == 0
    return gallery


# ----------------------------------------------------------------------------- items 1, property test

def test_every_command_refuses_malformed_images_in_one_line(malformed, prior_model, gallery_of_two, data_dir,
                                                             tmp_path, capsys):
    """detect, verify, enroll and identify on each malformed image: no traceback, exit 1 with one line
    naming the file for every hopeless image; the photo in an odd mode may be used (exit 0)."""
    model = ["--model", prior_model.model_path]
    good = data_dir / "lfw" / "images" / "Tony_Blair" / "Tony_Blair_0002.jpg"
    before = json.dumps([p for p in sorted(os.listdir(gallery_of_two))])
    for name, (path, hopeless) in malformed.items():
        for argv in (["detect", path], ["verify", path, good, *model], ["verify", good, path, *model],
                     ["enroll", tmp_path / f"new-{name}", "P", path, *model], ["identify", gallery_of_two, path, *model]):
            code, out, err = run_cli(capsys, *argv)
            assert code in (0, 1) and "Traceback" not in err, (name, argv[0], err)
            if hopeless:
                assert code == 1, (name, argv[0], out)
                line = one_error_line(err, argv[0])
                assert path.name in line, (name, line)
            elif code == 1:
                one_error_line(err, argv[0])
        assert not (tmp_path / f"new-{name}" / "gallery.sqlite").exists() or not hopeless, name
    assert json.dumps(sorted(os.listdir(gallery_of_two))) == before


def test_tiny_image_error_says_why(malformed, prior_model, capsys):
    path = malformed["size-5x5"][0]
    code, _, err = run_cli(capsys, "verify", path, path, "--model", prior_model.model_path)
    line = one_error_line(err, "verify")
    assert code == 1 and "no face found" in line and "5x5 pixels" in line and "smallest face" in line


def test_folder_jobs_record_bad_images_and_go_on(malformed, prior_model, data_dir, tmp_path, capsys):
    """enroll --folder and align over folders holding every malformed image beside real photos: both finish,
    report each bad image, and keep every good one (the align job also on a rerun)."""
    lfw = data_dir / "lfw" / "images"
    people = tmp_path / "people"
    (people / "A_first").mkdir(parents=True)
    for path, _ in malformed.values():
        shutil.copy(path, people / "A_first" / path.name)
    shutil.copy(lfw / "Tony_Blair" / "Tony_Blair_0001.jpg", people / "A_first")
    for name in ("B_second", "C_third"):
        (people / name).mkdir()
        shutil.copy(malformed["size-1x1"][0], people / name / "tiny.png")
    shutil.copy(lfw / "Colin_Powell" / "Colin_Powell_0001.jpg", people / "C_third")
    code, out, err = run_cli(capsys, "enroll", tmp_path / "g", "--folder", people, "--model", prior_model.model_path,
                             "--json", "--no-progress")
    assert code == 0, err
    report = json.loads(out)
    assert report["added"]["C_third"] == 1 and report["added"]["A_first"] >= 1
    skipped = {Path(what).name for what, _ in report["skipped"]}
    assert "B_second" in skipped or "tiny.png" in skipped
    hopeless = {p.name for p, h in malformed.values() if h}
    assert hopeless <= skipped

    src = tmp_path / "src"
    shutil.copytree(people, src)
    for _ in range(2):  # the second run resumes from the journal and must not crash either
        code, out, err = run_cli(capsys, "align", src, tmp_path / "aligned", "--workers", "1", "--json",
                                 "--no-progress")
        assert code == 0, err
        summary = json.loads(out)
        assert summary["aligned"] >= 2 and summary["failed"] >= len(hopeless)
    failures = (tmp_path / "aligned" / "failures.csv").read_text()
    assert all(name in failures for name in hopeless)
    assert (tmp_path / "aligned" / "manifest.csv").is_file()


# ----------------------------------------------------------------------------- item 5: model metadata

@pytest.mark.parametrize("key, value", [("align_size", -1), ("align_size", 0), ("align_size", "abc"),
                                        ("align_size", 100000), ("align_size", True), ("align_chip", "other"),
                                        ("threshold", "abc"), ("threshold", float("nan")), ("threshold", 1e300),
                                        ("threshold_far", -0.5)])
def test_bad_model_meta_is_refused_before_use(key, value, prior_model, data_dir, tmp_path, capsys):
    weights = tmp_path / "model.safetensors"
    shutil.copy(prior_model.model_path, weights)
    doc = json.loads(prior_model.model_path.with_suffix(".json").read_text())
    doc["meta"][key] = value
    weights.with_suffix(".json").write_text(json.dumps(doc))
    face = data_dir / "lfw" / "images" / "Tony_Blair" / "Tony_Blair_0001.jpg"
    code, out, err = run_cli(capsys, "verify", face, face, "--model", weights)
    line = one_error_line(err, "verify")
    assert code == 1 and out == "" and f"meta '{key}' must be" in line and "model.json" in line


# ----------------------------------------------------------------------------- item 6: command-line values

@pytest.mark.parametrize("value", ["nan", "1e308", "-inf", "1.5"])
def test_threshold_out_of_range(value, prior_model, gallery_of_two, data_dir, capsys):
    face = data_dir / "lfw" / "images" / "Tony_Blair" / "Tony_Blair_0001.jpg"
    model = ["--model", prior_model.model_path]
    for argv in (["verify", face, face, *model, f"--threshold={value}"],
                 ["identify", gallery_of_two, face, *model, f"--threshold={value}"]):
        code, out, err = run_cli(capsys, *argv)
        line = one_error_line(err, argv[0])
        assert code == 1 and out == "" and "threshold must be a cosine similarity in [-1, 1]" in line


def test_bad_devices(prior_model, data_dir, capsys):
    import torch

    face = data_dir / "lfw" / "images" / "Tony_Blair" / "Tony_Blair_0001.jpg"
    code, _, err = run_cli(capsys, "verify", face, face, "--model", prior_model.model_path, "--device", "bogus")
    assert code == 1 and "unknown device 'bogus'" in one_error_line(err, "verify")
    code, _, err = run_cli(capsys, "detect", face, "--device", "cuda:7")
    assert code == 1
    one_error_line(err, "detect")
    if not torch.cuda.is_available():
        code, _, err = run_cli(capsys, "verify", face, face, "--model", prior_model.model_path, "--device", "cuda")
        assert code == 1 and "no CUDA GPU" in one_error_line(err, "verify")


# ----------------------------------------------------------------------------- item 7: configs

def test_config_edge_cases(tmp_path, capsys):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("steps: 3\n# caf\xe9\n".encode("latin-1"))
    code, _, err = run_cli(capsys, "train", bad)
    assert code == 1 and "is not UTF-8 text (byte 0xe9" in one_error_line(err, "train")
    for override, words in (("optim.lr=.inf", "optim.lr: expected a finite number"),
                            ("optim.lr=.nan", "optim.lr: expected a finite number"),
                            ("loss.s=1e400", "loss.s: expected a finite number"),
                            ("model.embedding_size=1000000000", "model.embedding_size: must be in 1..65536")):
        code, out, err = run_cli(capsys, "train", "smoke", "--set", override, "--print-config")
        assert code == 1 and out == "" and words in one_error_line(err, "train"), override


# ----------------------------------------------------------------------------- item 8: align destinations

def test_align_destination_problems(data_dir, tmp_path, capsys):
    src = tmp_path / "src" / "Tony_Blair"
    src.mkdir(parents=True)
    shutil.copy(data_dir / "lfw" / "images" / "Tony_Blair" / "Tony_Blair_0001.jpg", src)
    a_file = tmp_path / "taken.txt"
    a_file.write_text("keep me")
    code, out, err = run_cli(capsys, "align", src.parent, a_file, "--workers", "1", "--no-progress")
    assert code == 1 and "exists and is not a folder" in one_error_line(err, "align")
    assert a_file.read_text() == "keep me"
    if os.geteuid() == 0:  # permissions do not stop root: a pseudo file system that refuses new folders does
        readonly = Path("/sys/facemeta-align-test")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        readonly = locked / "out"
    code, out, err = run_cli(capsys, "align", src.parent, readonly, "--workers", "1", "--no-progress")
    assert code == 1 and "cannot write aligned faces into" in one_error_line(err, "align")
    assert not readonly.exists()


def test_align_that_aligns_nothing_fails(malformed, tmp_path, capsys):
    src = tmp_path / "src" / "nobody"
    src.mkdir(parents=True)
    for name in ("size-1x1", "random-png"):
        shutil.copy(malformed[name][0], src)
    code, out, err = run_cli(capsys, "align", src.parent, tmp_path / "dst", "--workers", "1", "--no-progress")
    assert code == 1 and "aligned 0 of 2" in out
    assert "none of the 2 images gave an aligned face" in one_error_line(err, "align")
    assert (tmp_path / "dst" / "failures.csv").read_text().count("\n") == 3  # header + the two images


# ----------------------------------------------------------------------------- item 9: wording

def test_pickled_weights_are_described_not_advised(tmp_path):
    """PyTorch's refusal to unpickle ends in advice to load the file unsafely; ours says what the file holds."""
    import torch

    from facemeta.errors import CheckpointError
    from facemeta.models.backbone import read_state_dict
    from facemeta.train.state import load_state

    path = tmp_path / "weights.pt"
    torch.save({"fc.weight": torch.zeros(2, 2), "extra": Path("/etc/passwd")}, path)
    for read in (read_state_dict, load_state):
        with pytest.raises(CheckpointError) as err:
            read(path)
        msg = str(err.value)
        assert "pickled Python objects" in msg and "never unpickles" in msg and "\n" not in msg
        assert "weights_only" not in msg and "\x1b" not in msg


# ----------------------------------------------------------------------------- item 11: .bin pixel cap

def test_bin_images_pass_the_pixel_cap(tmp_path):
    """A small .bin holding two PNGs that decode to 12000x12000 each is refused from the headers."""
    from facemeta.data.insightface import read_bin
    from facemeta.data.sets import DataFormatError

    bomb = huge_png(12000, 12000)
    assert len(bomb) < 1_000_000
    path = tmp_path / "bomb.bin"
    path.write_bytes(pickle.dumps(([bomb, bomb], [True])))
    with pytest.raises(DataFormatError) as err:
        read_bin(path)
    msg = str(err.value)
    assert "image 0" in msg and "12000x12000" in msg and "refused before decoding" in msg and "\n" not in msg


# ----------------------------------------------------------------------------- issue 28: names and export headers

# Characters a name may hide or fake with: default-ignorables, fillers, format and zero-width characters,
# variation selectors, tag characters, combining marks, and spaces that are not the plain space.
HIDDEN = ["\u00ad", "\u034f", "\u061c", "\u115f", "\u1160", "\u17b4", "\u180b", "\u180e", "\u200b", "\u200c",
          "\u200d", "\u200e", "\u202e", "\u2060", "\u2062", "\u2064", "\u3164", "\ufe00", "\ufe0f", "\ufeff",
          "\uffa0", "\u2800", "\U000e0041", "\U000e007f", "\U0001d173"]
SPACES = ["\u00a0", "\u2002", "\u2003", "\u2009", "\u202f", "\u3000", "  "]
MARKS = ["\u0301", "\u0300", "\u0308", "\u0327", "\u20dd"]
BASE_PEOPLE = ["Tony Blair", "Colin Powell", "Jos\u00e9 Mar\u00eda Aznar", "\u5c71\u7530\u592a\u90ce", "Nguy\u1ec5n V\u0103n An"]


def printed(name: str) -> str:
    """How a name reads on a screen, judged independently of facemeta's own rules (from Unicode's character
    names and categories): compatibility forms folded, case folded, anything drawn as nothing dropped, every
    space one space."""
    import unicodedata

    out = []
    for c in unicodedata.normalize("NFKC", name).casefold():
        label = unicodedata.name(c, "")
        if unicodedata.category(c) in ("Cc", "Cf", "Cn", "Co", "Cs") or any(
                w in label for w in ("FILLER", "BLANK", "VARIATION SELECTOR", "GRAPHEME JOINER", "TAG ",
                                     "INVISIBLE", "ZERO WIDTH")):
            continue
        out.append(" " if c.isspace() else c)
    return " ".join("".join(out).split())


def look_alike_names(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` names made from BASE_PEOPLE by the tricks of the issue: hidden characters anywhere, another case,
    full width, odd spaces, decomposed accents, piled-up or lone combining marks."""
    import unicodedata

    out = []
    for _ in range(n):
        name = BASE_PEOPLE[rng.integers(len(BASE_PEOPLE))]
        for _ in range(rng.integers(1, 4)):
            trick = rng.integers(8)
            i = int(rng.integers(len(name) + 1))
            if trick == 0:
                name = name[:i] + HIDDEN[rng.integers(len(HIDDEN))] + name[i:]
            elif trick == 1:
                name = name.upper() if rng.random() < 0.5 else name.lower()
            elif trick == 2:
                name = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" and rng.random() < 0.5 else c for c in name)
            elif trick == 3:
                name = name.replace(" ", SPACES[rng.integers(len(SPACES))])
            elif trick == 4:
                name = unicodedata.normalize("NFD", name)
            elif trick == 5:
                name = name[:i] + "".join(MARKS[rng.integers(len(MARKS))] for _ in range(rng.integers(1, 8))) \
                    + name[i:]
            elif trick == 6:
                name = "".join(MARKS[rng.integers(len(MARKS))] for _ in range(rng.integers(1, 4)))
            else:
                name = name + HIDDEN[rng.integers(len(HIDDEN))] * int(rng.integers(1, 3))
        out.append(name)
    return out


def test_generated_look_alike_names_never_make_two_people_that_print_the_same(tmp_path):
    """Four hundred generated names against a gallery of five people: each is refused in one line or stored
    exactly as given (stripped, NFC); no two stored people ever read the same."""
    from facemeta.errors import GalleryError
    from facemeta.gallery import Gallery
    from facemeta.gallery.validate import normal_name

    rng = np.random.default_rng(SEED)
    vec = rng.standard_normal(16).astype(np.float32)
    refused = stored = 0
    with Gallery.create(tmp_path / "G", dim=16, fingerprint="m") as g:
        g.enroll_many(BASE_PEOPLE, np.stack([vec] * len(BASE_PEOPLE)), fingerprint="m")
        for name in look_alike_names(rng, 400):
            try:
                g.enroll(name, vec, fingerprint="m")
            except GalleryError as exc:
                msg = str(exc)
                assert "\n" not in msg and msg.isprintable(), msg
                assert not any(c in msg for c in HIDDEN if c != "\u00a0"), msg  # shown escaped, never raw
                refused += 1
                continue
            stored += 1
            assert normal_name(name) in {i.name for i in g.identities()}, name
        people = [i.name for i in g.identities()]
    seen: dict[str, str] = {}
    for person in people:
        assert printed(person) not in seen, (person, seen.get(printed(person)))
        seen[printed(person)] = person
    assert refused > 200 and stored > 0, (refused, stored)  # both outcomes happen: the test can fail


def _export_body(path: Path) -> bytes:
    return path.read_bytes()[:-72]


def _rechecksum(path: Path, body: bytes) -> None:
    import hashlib

    path.write_bytes(body + f"SHA256 {hashlib.sha256(body).hexdigest()}\n".encode())


def mutated_exports(rng: np.random.Generator, good: Path, folder: Path, n: int) -> list[Path]:
    """``n`` copies of a good export with their header or chunks changed (nestings up to 60,000 deep, sizes
    up to past the line limits, repeated chunks with the counts made to match), each with a valid checksum."""
    body = _export_body(good)
    magic, header, rest = body.split(b"\n", 2)
    head = json.loads(header)
    end = rest.rindex(b'{"end":true')
    chunks, trailer = rest[:end], rest[end:]
    out = []
    for k in range(n):
        kind = k % 6
        h = dict(head)
        new_chunks, new_trailer = chunks, trailer
        if kind == 0:  # nested values in the header
            depth = int(rng.choice([2, 7, 8, 9, 50, 1000, 60_000]))
            extra = b"[" * depth + b"]" * depth
            line = json.dumps(h).encode()[:-1] + b',"deep":' + extra + b"}"
        elif kind == 1:  # a header of growing size (past the 1 MB header limit)
            h["notes"] = "x" * int(rng.choice([10, 10_000, 900_000, 1_100_000, 3_000_000]))
            line = json.dumps(h).encode()
        elif kind == 2:  # nested values inside a chunk's metadata line
            depth = int(rng.choice([3, 9, 2000, 60_000]))
            line = json.dumps(h).encode()
            first_nl = chunks.index(b"\n")
            meta = chunks[:first_nl]
            new_chunks = meta[:-1] + b',"deep":' + b"[" * depth + b"]" * depth + b"}" + chunks[first_nl:]
        elif kind == 3:  # the chunks repeated (counts made to match, as a forger would)
            times = int(rng.integers(2, 4))
            h["embeddings"] = head["embeddings"] * times
            line = json.dumps(h).encode()
            new_chunks = chunks * times
            new_trailer = trailer.replace(f'"embeddings":{head["embeddings"]}'.encode(),
                                          f'"embeddings":{h["embeddings"]}'.encode())
        elif kind == 4:  # counts and sizes out of range
            key = ["people", "embeddings", "dim"][int(rng.integers(3))]
            h[key] = int(rng.choice([-1, 0, 2**31, 2**62, 10**30]))
            line = json.dumps(h).encode()
        else:  # a header that is a list, a number, or deep inside a list
            line = rng.choice([b"[]", b"42", b'"x"', b"[" * 5000 + b"]" * 5000])
        path = folder / f"m{k}.fmg"
        _rechecksum(path, magic + b"\n" + line + b"\n" + new_chunks + new_trailer)
        out.append(path)
    return out


def test_generated_export_headers_and_repeated_chunks_never_crash_or_duplicate(tmp_path, capsys):
    """Sixty generated export files (nestings, sizes, repeated chunks, bad counts): each import is a one-line
    refusal that leaves both targets as they were, or an import where no person holds one vector twice."""
    import shutil

    from facemeta.gallery import Gallery
    from facemeta.gallery.portable import export_gallery

    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((12, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with Gallery.create(tmp_path / "src", dim=16, fingerprint="m") as g:
        g.enroll_many([f"p{i // 3}" for i in range(12)], x, fingerprint="m")
        export_gallery(g, tmp_path / "good.fmg")
    with Gallery.create(tmp_path / "base", dim=16, fingerprint="m") as g:
        g.enroll_many(["p0", "other"], x[[0, 5]], fingerprint="m")
    (tmp_path / "files").mkdir()
    outcomes = {"refused": 0, "imported": 0}
    for k, path in enumerate(mutated_exports(rng, tmp_path / "good.fmg", tmp_path / "files", 60)):
        existing = tmp_path / f"existing{k}"
        shutil.copytree(tmp_path / "base", existing)
        for target in (tmp_path / f"new{k}", existing):
            before = sorted(p.name for p in target.iterdir()) if target.exists() else None
            code, out, err = run_cli(capsys, "gallery", "import", path, target, "--json")
            if code != 0:
                one_error_line(err, "gallery")
                assert (sorted(p.name for p in target.iterdir()) if target.exists() else None) == before
                outcomes["refused"] += 1
                continue
            outcomes["imported"] += 1
            with Gallery.open(target) as g:
                for person in g.identities():
                    rows = [v.tobytes() for v in g.vectors(person.name)]
                    assert len(rows) == len(set(rows)), (path.name, person.name)
                assert g.check()["database"] == "ok"
    assert outcomes["refused"] > 30 and outcomes["imported"] > 0, outcomes
