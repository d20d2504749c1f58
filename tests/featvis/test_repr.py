"""Notebook views of a Visualization: ``_repr_png_`` is the labelled grid, ``_repr_html_``
one lossless figure per image with its objective and value, bounded in size."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import torch
from PIL import Image

from convscope.featvis import Visualization, channel, class_logit
from convscope.featvis import render as featvis_render


def _made_up(count: int = 3, size: int = 40) -> Visualization:
    """Images and values set by hand (no optimisation), so the views can be checked pixel
    by pixel."""
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(count, 3, size, size, generator=generator)
    objectives = [channel("conv", c) for c in range(count - 1)] + [class_logit(7)]
    values = torch.arange(count, dtype=torch.float32) * 1.25 + 0.5
    return Visualization(images, objectives, values, torch.zeros(4, count), {"steps": 4})


def _bytes(image: torch.Tensor) -> np.ndarray:
    """The 8-bit HWC array to_pil should give, computed here independently."""
    return np.floor(image.permute(1, 2, 0).numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)


def test_repr_png_is_the_grid_with_every_tile_in_place():
    vis = _made_up(3, 40)
    png = Image.open(io.BytesIO(vis._repr_png_()))
    assert png.format == "PNG"
    array = np.asarray(png.convert("RGB"))
    pad, size = 2, 40  # 2 columns (ceil(sqrt(3))), 2 rows
    assert array.shape == (2 * size + 3 * pad, 2 * size + 3 * pad, 3)
    for index in range(3):
        row, col = divmod(index, 2)
        top, left = pad + row * (size + pad), pad + col * (size + pad)
        # the label covers the top rows of a tile; the lower half is the image itself
        got = array[top + size // 2: top + size, left: left + size]
        expected = _bytes(vis.images[index])[size // 2:]
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_repr_png_shrinks_big_images_to_the_tile_size(monkeypatch):
    monkeypatch.setattr(featvis_render, "REPR_TILE", 16)
    png = Image.open(io.BytesIO(_made_up(1, 40)._repr_png_()))
    assert png.size == (16 + 4, 16 + 4)


def test_repr_html_has_each_image_losslessly_with_objective_and_value():
    vis = _made_up(3, 24)
    page = vis._repr_html_()
    sources = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(sources) == 3
    for index, data in enumerate(sources):
        decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
        assert np.array_equal(decoded, _bytes(vis.images[index]))
    captions = re.findall(r"<figcaption>(.*?)<br>(.*?)</figcaption>", page)
    assert captions == [("conv:0", "0.5"), ("conv:1", "1.75"), ("class:7", "3")]
    assert "steps=4" in page and "shown" not in page


def test_repr_html_is_bounded_and_says_so(monkeypatch):
    monkeypatch.setattr(featvis_render, "REPR_MAX_IMAGES", 2)
    page = _made_up(3, 16)._repr_html_()
    assert page.count("<figure") == 2
    assert "first 2 of 3 images shown" in page
