"""load_image: formats, EXIF, bit depth, and bounded untrusted input."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from convscope.errors import ImageError, ImageTooLargeError, UnknownSampleError
from convscope.images import load_image


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_samples_and_paths(tmp_path):
    cat = load_image("sample:chelsea")
    assert cat.mode == "RGB" and cat.size == (451, 300)
    path = tmp_path / "cat.png"
    cat.save(path)
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(cat))
    assert np.array_equal(np.asarray(load_image(str(path))), np.asarray(cat))
    with pytest.raises(UnknownSampleError, match="chelsea"):
        load_image("sample:chelsa")
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="folder"):
        load_image(tmp_path)


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = 255  # left half white
    image = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    loaded = np.asarray(load_image(path))
    assert loaded.shape == (40, 20, 3)
    assert loaded[:20].mean() > 200 and loaded[20:].mean() < 50  # white half now on top


def test_modes_and_bit_depths_become_8bit_rgb():
    gray = Image.fromarray(np.full((4, 4), 100, dtype=np.uint8))
    assert np.asarray(load_image(gray))[0, 0].tolist() == [100, 100, 100]
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))  # fully transparent -> white background
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [255, 255, 255]
    sixteen = np.full((3, 3), 65535, dtype=np.uint16)
    sixteen[0, 0] = 0
    loaded = np.asarray(load_image(Image.fromarray(sixteen)))
    assert loaded[1, 1].tolist() == [255, 255, 255] and loaded[0, 0].tolist() == [0, 0, 0]
    assert np.asarray(load_image(sixteen))[1, 1, 0] == 255
    floats = np.full((2, 2, 3), 0.5, dtype=np.float32)
    assert np.asarray(load_image(floats))[0, 0, 0] == 128
    tensor = torch.zeros(3, 5, 6)
    tensor[0] = 1.0
    assert np.asarray(load_image(tensor))[0, 0].tolist() == [255, 0, 0]
    palette = Image.new("P", (2, 2))
    assert load_image(palette).mode == "RGB"
    assert load_image(_png_bytes(gray)).size == (4, 4)


def test_oversized_truncated_and_non_images_are_refused(tmp_path):
    image = Image.new("RGB", (50, 40))
    with pytest.raises(ImageTooLargeError, match="2,000 pixels"):
        load_image(_png_bytes(image), max_pixels=1999)
    assert load_image(_png_bytes(image), max_pixels=2000).size == (50, 40)
    # A header that claims a huge image is refused before any pixel is decoded.
    huge = bytearray(_png_bytes(Image.new("L", (1, 1))))
    huge[16:24] = (100_000).to_bytes(4, "big") + (100_000).to_bytes(4, "big")
    huge[29:33] = zlib.crc32(bytes(huge[12:29])).to_bytes(4, "big")  # IHDR checksum
    with pytest.raises(ImageTooLargeError):
        load_image(bytes(huge))
    photo = io.BytesIO()
    load_image("sample:coffee").save(photo, format="JPEG")
    with pytest.raises(ImageError, match=r"could not be decoded|not a readable"):
        load_image(photo.getvalue()[: len(photo.getvalue()) // 3])
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(b"<html>not an image</html>")
    with pytest.raises(ImageError):
        load_image(np.full((2, 2), np.nan, dtype=np.float32))
    with pytest.raises(TypeError, match="int"):
        load_image(42)
