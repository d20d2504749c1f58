"""overlay(): heatmap blended over an image, values checked pixel by pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from convscope.render.colormap import colormap_lut
from convscope.render.overlay import overlay

GRAY = colormap_lut("gray")[:, 0]


def _gray_index(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] to 256-level indices, rounding half up (the documented quantiser)."""
    return np.floor(np.clip(values, 0.0, 1.0) * 255 + 0.5).astype(int)


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


# Cases a mutation run (stop 20) found unpinned.


def test_heatmap_is_resized_with_half_pixel_bilinear_sampling() -> None:
    """overlay resizes bilinearly with pixel centres aligned (align_corners=False): a 1x2
    heatmap [0, 1] on a 3x4 image becomes [0, 0.25, 0.75, 1] along every row (corner
    alignment would give thirds, nearest would give [0, 0, 1, 1])."""
    image = np.zeros((3, 4, 3), dtype=np.uint8)
    out = np.asarray(overlay(image, np.array([[0.0, 1.0]]), alpha=1.0, cmap="gray"))
    assert out.shape == (3, 4, 3)
    want = GRAY[_gray_index(np.array([0.0, 0.25, 0.75, 1.0]))]
    for row in range(3):
        np.testing.assert_array_equal(out[row, :, 0], want)


def test_heatmap_rows_follow_image_rows_on_a_non_square_tensor_image() -> None:
    """A (3, H, W) tensor image is read as H rows: a heatmap of the same (H, W) lands
    pixel for pixel, with no resize and no transpose."""
    image = torch.zeros(3, 2, 5)
    heat = torch.linspace(0, 1, 10).view(2, 5)
    out = np.asarray(overlay(image, heat, alpha=1.0, cmap="gray"))
    assert out.shape == (2, 5, 3)
    np.testing.assert_array_equal(out[..., 0], GRAY[_gray_index(heat.numpy())])
    assert isinstance(overlay(Image.new("RGB", (5, 2)), heat), Image.Image)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_float_image_arrays_are_already_in_zero_to_one(dtype: type) -> None:
    """Any float image array is taken as [0, 1] (only uint8 is divided by 255): with
    alpha=0 the picture is the image itself, whatever the float width."""
    rng = np.random.default_rng(3)
    image = rng.random((3, 5, 3)).astype(dtype)
    out = np.asarray(overlay(image, np.zeros((3, 5)), alpha=0.0))
    want = np.floor(image.astype(np.float64) * 255 + 0.5).astype(np.uint8)
    assert np.abs(out.astype(int) - want.astype(int)).max() <= 1


@pytest.mark.parametrize("shape", [(3, 6, 3), (1, 5, 3), (3, 2, 1), (1, 3, 6, 4)])
def test_a_tensor_that_reads_as_chw_and_as_hwc_is_refused(shape):
    """(3, 6, 3) is a 6x3 picture in (C, H, W) and a 3x6 one in (H, W, C): no guess."""
    with pytest.raises(ValueError, match="reads both as"):
        overlay(torch.rand(shape), torch.zeros(2, 2))
    tall = overlay(torch.rand(3, 6, 5), torch.zeros(2, 2))  # unambiguous: (C, H, W)
    assert tall.size == (5, 6)

