"""The explorer's PNG encoder: standard files whose pixels decode exactly."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from convscope.server.encode import png_bytes


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.verify()  # chunk CRCs and structure
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
@pytest.mark.parametrize("photo", [False, True])
@pytest.mark.parametrize("size", [(1, 1), (37, 19), (64, 64)])
def test_pixels_round_trip(mode: str, photo: bool, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(size) + len(mode))
    channels = len(mode)
    # Random bytes: every Up difference wraps around modulo 256 somewhere.
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(array[..., 0] if channels == 1 else array, mode)
    back = decode(png_bytes(image, photo=photo))
    assert back.mode == mode and back.size == size
    assert np.array_equal(np.asarray(back), np.asarray(image))


def test_filters_as_documented() -> None:
    """Row filter bytes read back from the zlib stream: 0 (None) for drawn pictures, 2 (Up)
    for photos; the first row of an Up-filtered image keeps its own bytes."""
    array = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    image = Image.fromarray(array, "RGB")
    for photo, expected in ((False, 0), (True, 2)):
        data = png_bytes(image, photo=photo)
        start = data.index(b"IDAT") + 4
        length = int.from_bytes(data[start - 8:start - 4], "big")
        raw = np.frombuffer(zlib.decompress(data[start:start + length]), np.uint8)
        rows = raw.reshape(4, 1 + 15)
        assert rows[:, 0].tolist() == [expected] * 4
        assert np.array_equal(rows[0, 1:], array[0].reshape(-1))
        if photo:
            assert np.array_equal(rows[1:, 1:], np.full((3, 15), 15, np.uint8))


def test_other_modes_through_pillow() -> None:
    image = Image.new("P", (9, 7))
    image.putpalette([0, 0, 0, 255, 0, 0] * 128)
    image.putpixel((3, 2), 1)
    back = decode(png_bytes(image))
    assert back.mode == "P"
    assert np.array_equal(np.asarray(back), np.asarray(image))
    gray16 = Image.fromarray(np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    assert np.array_equal(np.asarray(decode(png_bytes(gray16))), np.asarray(gray16))


def test_grid_smaller_than_pillow() -> None:
    """A nearest-enlarged grid: no filter compresses at least as well as Pillow's
    adaptive filters (the reason for the choice)."""
    import torch

    from convscope.render.grid import feature_grid

    torch.manual_seed(0)
    grid = feature_grid(torch.rand(16, 14, 14), tile_size=56)
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG", compress_level=1)
    data = png_bytes(grid)
    assert np.array_equal(np.asarray(decode(data)), np.asarray(grid))
    assert len(data) <= len(buffer.getvalue())


def test_pixel_arrays_encode_like_their_images() -> None:
    """An (H, W, 3) or (H, W) uint8 array is encoded as the image it would make, byte for
    byte; other arrays are refused."""
    rng = np.random.default_rng(3)
    for shape in [(23, 41, 3), (17, 9)]:
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        for photo in (False, True):
            data = png_bytes(pixels, photo=photo)
            assert data == png_bytes(Image.fromarray(pixels), photo=photo)
            assert np.array_equal(np.asarray(decode(data)), pixels)
    with pytest.raises(ValueError, match="uint8"):
        png_bytes(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        png_bytes(np.zeros((4, 4, 4), dtype=np.uint8))
