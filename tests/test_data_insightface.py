"""insightface .bin and .rec/.idx readers, on files written here from real face images."""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from facemeta.data.insightface import (
    MAGIC,
    DataFormatError,
    RecordIOReader,
    UnsafePickleError,
    load_bin_raw,
    pack_record,
    read_bin,
    read_record_at,
    rec_to_manifest,
    unpack_record,
    write_bin,
    write_rec,
    write_record,
)
from facemeta.data.manifest import read_manifest
from facemeta.errors import FacemetaError


def _rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def lfw_files(data_dir) -> list[Path]:
    """Ten real LFW JPEGs: five same-person pairs' worth of files from two people."""
    base = data_dir / "lfw" / "images"
    return [base / "Aaron_Peirsol" / f"Aaron_Peirsol_{i:04d}.jpg" for i in range(1, 5)] + \
           [base / "Zico" / f"Zico_{i:04d}.jpg" for i in range(1, 4)] + \
           [base / "Abel_Pacheco" / f"Abel_Pacheco_{i:04d}.jpg" for i in range(1, 4)]


@pytest.fixture(scope="module")
def orl_faces(data_dir) -> tuple[list[np.ndarray], list[int]]:
    """Twelve real ORL faces (4 subjects x 3) as RGB arrays, with subject labels 0..3."""
    images, labels = [], []
    for lab, subject in enumerate(("s1", "s2", "s10", "s40")):
        for i in (1, 5, 10):
            images.append(_rgb(data_dir / "orl" / subject / f"{i}.pgm"))
            labels.append(lab)
    return images, labels


# --------------------------------------------------------------------------------------------- .bin

def test_bin_roundtrip_with_raw_jpeg_bytes(lfw_files, tmp_path):
    issame = [True, True, False, True, False]
    raw = [p.read_bytes() for p in lfw_files]
    for protocol in (2, 4, 5):  # 2: Python 3 writes bytes through _codecs.encode, which must still load
        path = write_bin(tmp_path / f"p{protocol}.bin", raw, issame, protocol=protocol)
        images, same = read_bin(path)
        assert same.dtype == bool and same.tolist() == issame
        assert len(images) == 10
        for img, p in zip(images, lfw_files, strict=True):
            assert img.dtype == np.uint8 and img.shape == (150, 150, 3)
            assert np.array_equal(img, _rgb(p))
    small, _ = read_bin(tmp_path / "p4.bin", image_size=112)
    assert {im.shape for im in small} == {(112, 112, 3)}


def _py2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """What Python 2's cPickle (protocol 2) writes for (list of str, list of bool)."""
    out = io.BytesIO()
    out.write(b"\x80\x02]q\x00(")
    for data in images:
        out.write(b"T" + struct.pack("<I", len(data)) + data)
    out.write(b"e]q\x01(" + b"".join(b"\x88" if s else b"\x89" for s in issame) + b"e\x86q\x02.")
    return out.getvalue()


def test_bin_written_by_python2(lfw_files, tmp_path):
    raw = [p.read_bytes() for p in lfw_files[:4]]
    path = tmp_path / "py2.bin"
    path.write_bytes(_py2_pickle(raw, [True, False]))
    got, same = load_bin_raw(path)
    assert got == raw and same.tolist() == [True, False]


def test_bin_from_arrays_is_lossless_as_png(orl_faces, tmp_path):
    images, _ = orl_faces
    path = write_bin(tmp_path / "orl.bin", images, [True] * 6, ext=".png")
    back, _ = read_bin(path)
    assert all(np.array_equal(a, b) for a, b in zip(images, back, strict=True))


class _Evil:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_malicious_or_foreign_pickles_are_refused(lfw_files, tmp_path):
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([lfw_files[0].read_bytes(), _Evil(target)], [True])))
    with pytest.raises(UnsafePickleError, match=r"refused to load (posix|os|nt)\.system"):
        read_bin(evil)
    assert not target.exists()
    # a numpy array is a global too (numpy.core.multiarray._reconstruct): refused, not run
    arr = tmp_path / "numpy.bin"
    arr.write_bytes(pickle.dumps(([np.zeros(3, np.uint8)] * 2, [True])))
    with pytest.raises(UnsafePickleError, match="numpy"):
        read_bin(arr)
    # _codecs.encode is only allowed as the latin-1 bytes builder
    sneaky = tmp_path / "codec.bin"
    sneaky.write_bytes(b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(UnsafePickleError, match="rot13"):
        load_bin_raw(sneaky)
    assert issubclass(UnsafePickleError, FacemetaError)


def test_bad_bin_files(lfw_files, tmp_path):
    good = write_bin(tmp_path / "good.bin", [p.read_bytes() for p in lfw_files[:2]], [True])
    truncated = tmp_path / "trunc.bin"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(DataFormatError, match="not a readable verification pickle"):
        read_bin(truncated)
    wrong = tmp_path / "wrong.bin"
    wrong.write_bytes(pickle.dumps(([lfw_files[0].read_bytes()] * 3, [True])))
    with pytest.raises(DataFormatError, match="3 images for 1 pairs"):
        read_bin(wrong)
    notimg = tmp_path / "notimg.bin"
    notimg.write_bytes(pickle.dumps(([b"hello", b"world"], [False])))
    with pytest.raises(DataFormatError, match="image 0: not an image"):
        read_bin(notimg)
    with pytest.raises(DataFormatError, match="not found"):
        read_bin(tmp_path / "missing.bin")


# ---------------------------------------------------------------------------------------- RecordIO

def test_rec_matches_the_format_spec(lfw_files, tmp_path):
    """Records built byte by byte from the spec (not by our writer) read back right."""
    jpg = [p.read_bytes() for p in lfw_files[:3]]
    rec, idx = tmp_path / "hand.rec", tmp_path / "hand.idx"
    offsets, blob = [], b""
    payloads = [struct.pack("<IfQQ", 0, 7.0, 0, 0) + jpg[0],
                struct.pack("<IfQQ", 2, 0.0, 5, 0) + struct.pack("<2f", 9.0, 1.5) + jpg[1],
                struct.pack("<IfQQ", 0, 3.0, 0, 0) + jpg[2]]
    for p in payloads:
        offsets.append(len(blob))
        blob += struct.pack("<II", 0xCED7230A, len(p)) + p + b"\0" * (-len(p) % 4)
    rec.write_bytes(blob)
    idx.write_text("".join(f"{k}\t{o}\n" for k, o in enumerate(offsets)))
    with RecordIOReader(rec, idx) as reader:
        assert reader.header0 is None and reader.keys == [0, 1, 2]
        image, label = reader[1]
        assert label == 9 and np.array_equal(image, _rgb(lfw_files[1]))
        head, data = reader.read_record(1)
        assert head.flag == 2 and head.id == 5 and head.label.tolist() == [9.0, 1.5] and data == jpg[1]
        assert [lab for _, lab in reader] == [7, 9, 3]
    # our writer produces exactly these bytes for scalar labels
    buf = io.BytesIO()
    write_record(buf, pack_record(7.0, jpg[0]))
    assert buf.getvalue() == blob[:offsets[1]]


def test_rec_insightface_layout_roundtrip(orl_faces, tmp_path):
    images, labels = orl_faces
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    write_rec(rec, idx, images, labels, ext=".png")
    with RecordIOReader(rec, idx) as reader:
        assert reader.header0 == (13, 17)  # 12 images at keys 1..12, identity records 13..16
        assert reader.keys == list(range(1, 13)) and len(reader) == 12
        for k in reader.keys:
            image, label = reader[k]
            assert label == labels[k - 1] and np.array_equal(image, images[k - 1])
        head, data = reader.read_record(15)  # third identity: images 7..9
        assert data == b"" and head.label.tolist() == [7.0, 10.0]
        with pytest.raises(DataFormatError, match="holds no image"):
            reader[0]
        with pytest.raises(KeyError):
            reader.read_raw(99)
        clone = pickle.loads(pickle.dumps(reader))  # as DataLoader workers get it: opens its own handle
        assert clone[5][1] == labels[4] and np.array_equal(clone[5][0], images[4])
        clone.close()
        seq = list(reader)  # header and identity records are skipped
        assert [lab for _, lab in seq] == labels
        assert all(np.array_equal(a, b) for (a, _), b in zip(seq, images, strict=True))
    # sequential reading needs no index
    no_idx = tmp_path / "copy.rec"
    no_idx.write_bytes(rec.read_bytes())
    reader = RecordIOReader(no_idx)
    assert reader.index is None and len(list(reader)) == 12
    with pytest.raises(DataFormatError, match="needs the .idx"):
        _ = reader.keys
    reader.close()


def test_record_holding_the_magic_is_split_and_rejoined():
    magic = struct.pack("<I", MAGIC)
    payload = pack_record(4.0, b"abcd" + magic + b"efgh" + magic + magic + b"xyz")
    buf = io.BytesIO()
    write_record(buf, payload)
    raw = buf.getvalue()
    flags = []
    pos = 0
    while pos < len(raw):
        m, lrec = struct.unpack_from("<II", raw, pos)
        assert m == MAGIC
        flags.append(lrec >> 29)
        pos += 8 + ((lrec & ((1 << 29) - 1)) + 3) // 4 * 4
    assert flags == [1, 2, 2, 3]  # start, middle, middle, end: as dmlc-core writes it
    buf.seek(0)
    assert read_record_at(buf, "test") == payload
    head, data = unpack_record(payload)
    assert head.label == 4.0 and data.endswith(b"xyz")


def test_bad_rec_files(orl_faces, tmp_path):
    images, labels = orl_faces
    rec, idx = tmp_path / "a.rec", tmp_path / "a.idx"
    write_rec(rec, idx, images[:3], labels[:3], insightface_header=False)
    data = rec.read_bytes()
    (tmp_path / "bad.rec").write_bytes(b"\x00\x11" + data[2:])
    with pytest.raises(DataFormatError, match="bad RecordIO magic"):
        list(RecordIOReader(tmp_path / "bad.rec"))
    (tmp_path / "short.rec").write_bytes(data[:-50])
    with pytest.raises(DataFormatError, match="truncated"):
        list(RecordIOReader(tmp_path / "short.rec"))
    (tmp_path / "bad.idx").write_text("0\t0\n1 twelve\n")
    with pytest.raises(DataFormatError, match="line 2"):
        RecordIOReader(rec, tmp_path / "bad.idx")
    with pytest.raises(DataFormatError, match="not found"):
        RecordIOReader(tmp_path / "none.rec")


def test_rec_to_manifest(lfw_files, tmp_path):
    raw = [p.read_bytes() for p in lfw_files]
    labels = [0] * 4 + [1] * 3 + [2] * 3
    write_rec(tmp_path / "t.rec", tmp_path / "t.idx", raw, labels)
    rows = rec_to_manifest(tmp_path / "t.rec", tmp_path / "t.idx", tmp_path / "out", domain="webface")
    assert len(rows) == 10 and [r.identity for r in rows] == [str(v) for v in labels]
    assert all(Path(r.path).read_bytes() == b for r, b in zip(rows, raw, strict=True))  # stored bytes, not re-encoded
    assert rows[0].path.endswith("images/0/1.jpg") and rows[0].domain == "webface"
    again = read_manifest(tmp_path / "out" / "manifest.csv")
    assert [(r.path, r.identity, r.extra["key"]) for r in again] == [(r.path, r.identity, r.extra["key"]) for r in rows]
