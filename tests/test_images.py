"""load_image on real files in every awkward mode, and one-line errors for bad files."""

from __future__ import annotations

import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from facemeta.errors import ImageReadError
from facemeta.images import load_image


@pytest.fixture(scope="module")
def lfw_jpg(data_dir):
    return data_dir / "lfw" / "images" / "Aaron_Sorkin" / "Aaron_Sorkin_0001.jpg"


@pytest.fixture(scope="module")
def orl_pgm(data_dir):
    return data_dir / "orl" / "s1" / "1.pgm"


def test_rgb_jpeg(lfw_jpg):
    img = load_image(lfw_jpg)
    assert img.shape == (150, 150, 3) and img.dtype == np.uint8 and img.flags.c_contiguous
    assert 30 < img.mean() < 230


def test_grey_pgm_small(orl_pgm):
    img = load_image(orl_pgm)
    assert img.shape == (112, 92, 3)
    assert (img[:, :, 0] == img[:, :, 1]).all() and (img[:, :, 1] == img[:, :, 2]).all()
    assert (img[:, :, 0] == np.asarray(Image.open(orl_pgm))).all()


def test_16bit_png_scaled_to_8bit(orl_pgm, tmp_path):
    grey = np.asarray(Image.open(orl_pgm)).astype(np.uint16) * 257
    path = tmp_path / "deep.png"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode.startswith("I")
    img = load_image(path)
    assert img.dtype == np.uint8
    assert np.abs(img[:, :, 0].astype(int) - np.asarray(Image.open(orl_pgm)).astype(int)).max() <= 1


def test_rgba_composited_on_white(lfw_jpg, tmp_path):
    rgb = np.asarray(Image.open(lfw_jpg))
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, :20] = 0
    path = tmp_path / "alpha.png"
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
    img = load_image(path)
    assert img.shape == rgb.shape
    assert (img[:, :20] == 255).all()
    assert (img[:, 20:] == rgb[:, 20:]).all()


def test_palette_png(lfw_jpg, tmp_path):
    path = tmp_path / "pal.png"
    Image.open(lfw_jpg).convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(path)
    assert Image.open(path).mode == "P"
    img = load_image(path)
    ref = np.asarray(Image.open(lfw_jpg).convert("RGB")).astype(int)
    assert img.shape == (150, 150, 3)
    assert np.abs(img.astype(int) - ref).mean() < 12


def test_exif_rotation_applied(data_dir, tmp_path):
    src = Image.open(data_dir / "orl" / "s2" / "1.pgm").convert("RGB")  # 92 wide, 112 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    src.save(path, exif=exif.tobytes(), quality=95)
    img = load_image(path)
    assert img.shape == (92, 112, 3)  # upright: width and height swapped
    expected = np.asarray(src.transpose(Image.Transpose.ROTATE_270)).astype(int)
    assert np.abs(img.astype(int) - expected).mean() < 4


def test_large_image(lfw_jpg, tmp_path):
    path = tmp_path / "large.jpg"
    Image.open(lfw_jpg).resize((3000, 3000)).save(path)
    assert load_image(path).shape == (3000, 3000, 3)


def _png_header_only(path, width, height):
    """A PNG whose IHDR claims width x height but holds almost no data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
                     + chunk(b"IEND", b""))
    return path


def bad_files(tmp_path, lfw_jpg):
    """The bad inputs of the acceptance criteria, written into tmp_path."""
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    data = lfw_jpg.read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    huge = _png_header_only(tmp_path / "huge.png", 20000, 20000)
    return {"empty": empty, "truncated": truncated, "text": text, "huge": huge}


@pytest.mark.parametrize("kind, words", [("empty", "empty file"), ("truncated", "truncated"),
                                         ("text", "not an image"), ("huge", "refused before decoding")])
def test_bad_files_raise_one_line(kind, words, tmp_path, lfw_jpg):
    path = bad_files(tmp_path, lfw_jpg)[kind]
    t0 = time.perf_counter()
    with pytest.raises(ImageReadError) as err:
        load_image(path)
    msg = str(err.value)
    assert words in msg and "\n" not in msg and str(path) in msg
    assert time.perf_counter() - t0 < 5  # the huge header is refused without decoding 1.2 GB


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="not found"):
        load_image(tmp_path / "nope.jpg")


def test_max_pixels_limit(lfw_jpg):
    with pytest.raises(ImageReadError, match="over the limit"):
        load_image(lfw_jpg, max_pixels=100 * 100)
