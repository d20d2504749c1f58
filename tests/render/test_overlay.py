"""overlay(): heatmap blended over an image, values checked pixel by pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from convscope.render.colormap import colormap_lut
from convscope.render.overlay import overlay


def test_blend_values_by_hand() -> None:
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    image[0, 0] = (200, 100, 50)
    heat = np.array([[0.0, 1.0], [0.5, 1.0]], dtype=np.float32)
    out = np.asarray(overlay(image, heat, alpha=0.25, cmap="gray"))
    assert out.shape == (2, 2, 3)
    lut = colormap_lut("gray")
    # (1 - a) * image + a * colour, rounded
    expected00 = np.round(0.75 * np.array([200, 100, 50]) + 0.25 * lut[0]).astype(np.uint8)
    np.testing.assert_array_equal(out[0, 0], expected00)
    np.testing.assert_array_equal(out[0, 1], np.round(0.25 * lut[255]).astype(np.uint8))
    np.testing.assert_array_equal(out[1, 0], np.round(0.25 * lut[128]).astype(np.uint8))


def test_alpha_extremes_and_inputs_untouched(chelsea) -> None:
    heat = torch.rand(7, 9)
    heat_before = heat.clone()
    assert np.array_equal(np.asarray(overlay(chelsea, heat, alpha=0.0)), np.asarray(chelsea))
    full = overlay(chelsea, torch.ones(3, 3), alpha=1.0, cmap="jet")
    assert full.size == chelsea.size
    np.testing.assert_array_equal(np.asarray(full)[5, 5], colormap_lut("jet")[255])
    assert torch.equal(heat, heat_before)


def test_tensor_image_and_upsampled_heatmap() -> None:
    image = torch.full((3, 8, 6), 0.5)
    heat = torch.tensor([[0.0, 1.0]])  # (1, 2): resized bilinearly to (8, 6)
    out = np.asarray(overlay(image, heat[None], alpha=0.5, cmap="gray")).astype(int)
    assert out.shape == (8, 6, 3)
    # left edge darker than right edge, grey channels equal
    assert out[0, 0, 0] < out[0, -1, 0]
    assert out[0, 0, 0] == out[0, 0, 1] == out[0, 0, 2]
    assert isinstance(overlay(np.zeros((4, 4)), np.zeros((4, 4))), Image.Image)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="alpha"):
        overlay(np.zeros((2, 2, 3)), np.zeros((2, 2)), alpha=2)
    with pytest.raises(TypeError, match="heatmap must be 2D"):
        overlay(np.zeros((2, 2, 3)), np.zeros((2, 2, 2)))
    with pytest.raises(TypeError, match="image must be"):
        overlay("cat.png", np.zeros((2, 2)))
