"""feature_grid / filter_grid: tiles hold the right values, inputs are never modified."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convscope.render.colormap import colormap_lut
from convscope.render.grid import feature_grid, filter_grid


def _tile(image, row: int, col: int, h: int, w: int, pad: int = 1) -> np.ndarray:
    array = np.asarray(image)
    top, left = pad + row * (h + pad), pad + col * (w + pad)
    return array[top:top + h, left:left + w]


def _expected_channel_tile(channel: np.ndarray, cmap: str) -> np.ndarray:
    """Independent per-channel min-max scaling and 256-level colour lookup."""
    scaled = (channel - channel.min()) / (channel.max() - channel.min())
    index = np.floor(scaled * 255 + 0.5).astype(int)
    return colormap_lut(cmap)[index]


def test_tile_r_c_holds_channel_r_times_cols_plus_c():
    torch.manual_seed(0)
    act = torch.randn(10, 4, 5)
    before = act.clone()
    image = feature_grid(act, cols=4, cmap="gray")
    assert image.size == (1 + 4 * 6, 1 + 3 * 5)
    for channel in range(10):
        row, col = divmod(channel, 4)
        tile = _tile(image, row, col, 4, 5)
        np.testing.assert_array_equal(tile, _expected_channel_tile(act[channel].numpy(), "gray"))
    assert torch.equal(act, before)
    # The two empty cells of the last row are padding colour.
    assert (_tile(image, 2, 3, 4, 5) == 255).all()


def test_layer_normalisation_shares_one_range_and_none_clips():
    act = torch.stack([torch.full((2, 2), 1.0), torch.full((2, 2), 3.0)])
    act[0, 0, 0] = 5.0
    image = feature_grid(act, cols=2, normalize="layer", cmap="gray", pad=0)
    array = np.asarray(image)[..., 0]
    lut = colormap_lut("gray")[:, 0]
    assert array[0, 0] == lut[255] and array[0, 1] == lut[0]
    assert array[0, 2] == lut[round(2 / 4 * 255)]
    clipped = np.asarray(feature_grid(act, cols=2, normalize="none", cmap="gray", pad=0))
    assert clipped[0, 2, 0] == lut[255] and clipped[1, 0, 0] == lut[255]
    constant = np.asarray(feature_grid(torch.ones(1, 3, 3), pad=0))
    assert (constant == colormap_lut("viridis")[0]).all()


def test_sort_channel_selection_and_batches():
    act = torch.zeros(5, 3, 3)
    for channel, peak in enumerate([1.0, 5.0, 3.0, 4.0, 2.0]):
        act[channel, 1, 1] = peak
    image = feature_grid(act.clone(), sort="max", channels=3, cols=3, normalize="layer",
                         cmap="gray", pad=0)
    centres = np.asarray(image)[1, [1, 4, 7], 0]
    lut = colormap_lut("gray")[:, 0]
    assert list(centres) == [lut[255], lut[round(4 / 5 * 255)], lut[round(3 / 5 * 255)]]
    picked = feature_grid(act, channels=[4, 0], cols=2, normalize="none", pad=0)
    assert picked.size == (6, 3)
    two = feature_grid(torch.randn(2, 6, 3, 3), cols=3, pad=1)
    one = feature_grid(torch.randn(6, 3, 3), cols=3, pad=1)
    assert two.size[0] == one.size[0] and two.size[1] > 2 * one.size[1]
    big = feature_grid(act, tile_size=12, cols=5, pad=0)
    assert big.size == (60, 12)
    np.testing.assert_array_equal(np.asarray(big)[:4, :4], np.asarray(big)[:1, :1].repeat(4, 0).repeat(4, 1))


def test_labels_and_numpy_input():
    act = np.random.default_rng(0).random((4, 32, 32)).astype(np.float32)
    plain = np.asarray(feature_grid(act, cols=2))
    labelled = np.asarray(feature_grid(act, cols=2, labels=True))
    assert plain.shape == labelled.shape and (plain != labelled).any()


def test_bad_inputs_get_clear_errors():
    with pytest.raises(TypeError, match="list"):
        feature_grid([[1.0]])
    with pytest.raises(ValueError, match="no spatial map"):
        feature_grid(torch.randn(4, 10))
    with pytest.raises(IndexError, match="out of range"):
        feature_grid(torch.randn(4, 3, 3), channels=[7])
    with pytest.raises(ValueError, match="normalize"):
        feature_grid(torch.randn(4, 3, 3), normalize="global")
    from convscope.render.colormap import UnknownColormapError

    with pytest.raises(UnknownColormapError, match="viridis"):
        feature_grid(torch.randn(4, 3, 3), cmap="virdis")


def test_rgb_filters_share_one_symmetric_scale_with_zero_at_mid_grey():
    torch.manual_seed(0)
    weights = torch.randn(6, 3, 3, 3)
    weights[0] = 0.0
    before = weights.clone()
    image = filter_grid(weights, cols=3, tile_size=3, pad=1)
    scale = weights.abs().max()
    for index in range(6):
        row, col = divmod(index, 3)
        tile = _tile(image, row, col, 3, 3)
        expected = np.floor((weights[index] / (2 * scale) + 0.5).permute(1, 2, 0).numpy() * 255 + 0.5)
        np.testing.assert_array_equal(tile, expected.astype(np.uint8))
    assert (_tile(image, 0, 0, 3, 3) == 128).all()  # an all-zero filter is mid-grey
    assert torch.equal(weights, before)
    enlarged = filter_grid(weights, cols=3, pad=0)  # default: 3x3 kernels drawn 24 px wide
    assert enlarged.size == (72, 48)


def test_deep_filters_mean_and_per_channel_modes():
    weights = torch.zeros(2, 4, 1, 1)
    weights[0, :, 0, 0] = torch.tensor([1.0, 1.0, -1.0, 3.0])  # mean 1
    weights[1, :, 0, 0] = -2.0  # mean -2
    lut = colormap_lut("RdBu_r")
    mean = np.asarray(filter_grid(weights, cols=2, tile_size=1, pad=0))
    np.testing.assert_array_equal(mean[0, 0], lut[round((1 / 4 + 0.5) * 255)])
    np.testing.assert_array_equal(mean[0, 1], lut[0])
    channels = np.asarray(filter_grid(weights, mode="channels", tile_size=1, pad=0))
    assert channels.shape == (2, 4, 3)  # one row per filter, one column per input channel
    np.testing.assert_array_equal(channels[0, 3], lut[255])
    np.testing.assert_array_equal(channels[0, 2], lut[round((-1 / 6 + 0.5) * 255)])
    with pytest.raises(ValueError, match="3 input channels"):
        filter_grid(weights, mode="rgb")


@pytest.mark.parametrize("sort", ["mean", "max"])
def test_sort_ranks_by_the_whole_batch_not_the_first_sample(sort):
    """Sample 0 alone would rank channel 0 first; averaged over the batch channel 2 wins.
    Every sample's block shows the same, batch-wide order."""
    act = torch.zeros(3, 4, 2, 3)  # non-square tiles
    act[0, 0] = 3.0
    act[1, 2] = 4.0
    act[2, 2] = 4.0
    act[:, 1] = 1.0
    act[0, 3, 0, 0] = 0.5  # channel 3: weakest on average
    batch_stat = act.flatten(2).mean(-1) if sort == "mean" else act.flatten(2).amax(-1)
    expected = torch.argsort(batch_stat.mean(0), descending=True, stable=True)[:3]
    assert expected.tolist() != torch.argsort(batch_stat[0], descending=True)[:3].tolist()
    image = feature_grid(act, sort=sort, channels=3, cols=3, normalize="none", cmap="gray",
                         pad=1)
    array = np.asarray(image)[..., 0]
    lut = colormap_lut("gray")[:, 0]
    block = (1 + (2 + 1)) + max(2 * 1, 4)  # one block's rows (pad + tile + pad) and the gap
    for sample in range(3):
        top = sample * block
        for col, channel in enumerate(expected.tolist()):
            left = 1 + col * 4
            tile = array[top + 1:top + 3, left:left + 3]
            want = lut[np.floor(np.clip(act[sample, channel].numpy(), 0, 1) * 255 + 0.5)
                       .astype(int)]
            np.testing.assert_array_equal(tile, want, err_msg=f"sample {sample} col {col}")


def _torch_feature_grid(act: torch.Tensor, channels, cols: int, normalize: str, cmap: str,
                        pad: int, tile_size) -> np.ndarray:
    """The grid as the torch pipeline drew it before numpy did: torch.nan_to_num,
    normalize_maps, repeat_interleave / adaptive_avg_pool2d, then the colour table."""
    from convscope.render.colormap import quantize
    from convscope.render.grid import layout, normalize_maps

    maps = torch.nan_to_num(act[None, channels].float())
    values = normalize_maps(maps, normalize)[0]
    if tile_size is not None:
        height, width = values.shape[-2:]
        longest = max(height, width)
        if tile_size >= longest:
            factor = tile_size // longest
            values = values.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
        else:
            size = (max(1, round(height * tile_size / longest)),
                    max(1, round(width * tile_size / longest)))
            values = torch.nn.functional.adaptive_avg_pool2d(values[:, None], size)[:, 0]
    return layout(colormap_lut(cmap)[quantize(values.numpy())], cols, pad)


def test_numpy_drawing_matches_the_torch_pipeline_bit_for_bit():
    rng = np.random.default_rng(1)
    for trial in range(120):
        count, height, width = (int(v) for v in rng.integers(1, [24, 50, 50]))
        act = torch.from_numpy(rng.standard_normal((count, height, width)).astype(np.float32)
                               * float(rng.choice([1.0, 1e-3, 1e30])))
        if trial % 7 == 0:
            act[0, 0, 0] = float("nan")
        if trial % 11 == 0:
            act[-1, -1, -1] = float("inf")
        channels = [int(c) for c in rng.permutation(count)[: int(rng.integers(1, count + 1))]]
        normalize = ["channel", "layer", "none"][trial % 3]
        tile_size = [None, int(rng.integers(1, 120))][trial % 2]
        cols = int(rng.integers(1, 8))
        pad = trial % 3
        expected = _torch_feature_grid(act, channels, min(cols, len(channels)), normalize,
                                       "magma", pad, tile_size)
        drawn = feature_grid(act, channels=channels, cols=cols, normalize=normalize,
                             cmap="magma", pad=pad, tile_size=tile_size)
        np.testing.assert_array_equal(np.asarray(drawn), expected, err_msg=str(trial))


def test_area_shrinking_is_torch_adaptive_avg_pool_exactly():
    from convscope.render.grid import _area_pool

    tiles = torch.rand(5, 112, 112)
    for size in [(80, 80), (37, 53), (1, 1), (111, 7)]:
        expected = torch.nn.functional.adaptive_avg_pool2d(tiles[:, None], size)[:, 0]
        np.testing.assert_array_equal(_area_pool(tiles.numpy(), size), expected.numpy())


# Cases a mutation run (stop 20) found unpinned.


GRAY = colormap_lut("gray")[:, 0]


def _gray_index(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] to 256-level indices, rounding half up (the documented quantiser)."""
    return np.floor(np.clip(values, 0.0, 1.0) * 255 + 0.5).astype(int)


def test_layer_normalisation_uses_one_range_per_sample_not_per_batch() -> None:
    """normalize='layer': one min-max range over all channels of a sample; each sample of a
    batch is scaled on its own (a batch-wide range would darken the weaker sample)."""
    rng = np.random.default_rng(0)
    act = rng.random((2, 3, 2, 4)).astype(np.float32)
    act[1] *= 10.0
    act[0] -= 5.0
    image = np.asarray(feature_grid(act, cols=3, normalize="layer", cmap="gray", pad=1))[..., 0]
    block = 1 + 2 + 1 + max(2 * 1, 4)  # pad, tile rows, pad, then the gap between samples
    for sample in range(2):
        values = act[sample]
        scaled = (values - values.min()) / (values.max() - values.min())
        for channel in range(3):
            top, left = sample * block + 1, 1 + channel * (4 + 1)
            tile = image[top:top + 2, left:left + 4]
            np.testing.assert_array_equal(tile, GRAY[_gray_index(scaled[channel])],
                                          err_msg=f"sample {sample} channel {channel}")


@pytest.mark.parametrize(("height", "width"), [(2, 8), (8, 2)])
def test_automatic_columns_make_the_grid_about_square_for_any_tile_shape(
        height: int, width: int) -> None:
    """cols=None: the tile's aspect ratio is taken into account, so 12 wide tiles stack in
    few columns and 12 tall ones spread over many; either way the canvas is about square."""
    image = feature_grid(torch.rand(12, height, width), pad=1)
    ratio = max(image.size) / min(image.size)
    assert ratio < 1.5, image.size


def test_labels_name_the_channel_drawn_not_the_tile_position() -> None:
    """labels=True writes the channel index: with channels=[2, 0] the second tile shows
    channel 0 and says "0", exactly as channel 0 drawn alone does."""
    act = torch.rand(3, 32, 40)
    picked = np.asarray(feature_grid(act, channels=[2, 0], cols=2, labels=True, pad=1))
    alone = np.asarray(feature_grid(act, channels=[0], cols=1, labels=True, pad=1))
    second = picked[1:33, 1 + 41:1 + 41 + 40]
    np.testing.assert_array_equal(second, alone[1:33, 1:41])
    unlabelled = np.asarray(feature_grid(act, channels=[2, 0], cols=2, pad=1))
    assert (picked[1:33, 1 + 41:1 + 41 + 40] != unlabelled[1:33, 1 + 41:1 + 41 + 40]).any()


def _rgb_tile_by_hand(weights: torch.Tensor, index: int) -> np.ndarray:
    scale = float(weights.abs().max())
    expected = (weights[index] / (2 * scale) + 0.5).permute(1, 2, 0).numpy()
    return np.floor(expected * 255 + 0.5).astype(np.uint8)


def test_max_filters_limits_the_tiles_drawn() -> None:
    """max_filters=2 of 5 filters: two tiles, the first two filters, in one row; the scale
    is that of the filters drawn."""
    torch.manual_seed(1)
    weights = torch.randn(5, 3, 2, 3)
    image = np.asarray(filter_grid(weights, max_filters=2, tile_size=3, pad=1))
    assert image.shape == (1 + 2 + 1, 1 + 2 * (3 + 1), 3)
    for index in range(2):
        left = 1 + index * 4
        np.testing.assert_array_equal(image[1:3, left:left + 3],
                                      _rgb_tile_by_hand(weights[:2], index))


def test_max_channels_limits_the_columns_of_channel_mode() -> None:
    """mode='channels', max_channels=2: one row per filter, only the first two input
    channels as columns, on the symmetric scale of what is drawn."""
    weights = torch.zeros(3, 4, 1, 1)
    weights[:, :, 0, 0] = torch.tensor([[1.0, -2.0, 9.0, 9.0],
                                        [0.5, 0.0, 9.0, 9.0],
                                        [-1.0, 2.0, -9.0, 9.0]])
    image = np.asarray(filter_grid(weights, mode="channels", max_channels=2, tile_size=1,
                                   pad=0))
    assert image.shape == (3, 2, 3)
    lut = colormap_lut("RdBu_r")
    kept = weights[:, :2, 0, 0].numpy()
    expected = lut[np.floor((kept / (2 * 2.0) + 0.5) * 255 + 0.5).astype(int)]
    np.testing.assert_array_equal(image, expected)


def test_non_square_rgb_filters_keep_their_orientation_and_enlarge_by_the_longer_side() -> None:
    """A 2x3 RGB kernel is drawn 2 rows by 3 columns; with the default target of 24 px the
    longer side (3) sets the factor: 8, so each tile is 16x24."""
    torch.manual_seed(2)
    weights = torch.randn(2, 3, 2, 3)
    exact = np.asarray(filter_grid(weights, cols=2, tile_size=3, pad=0))
    assert exact.shape == (2, 6, 3)
    for index in range(2):
        np.testing.assert_array_equal(exact[:, index * 3:index * 3 + 3],
                                      _rgb_tile_by_hand(weights, index))
    enlarged = np.asarray(filter_grid(weights, cols=2, pad=0))
    assert enlarged.shape == (16, 48, 3)
    np.testing.assert_array_equal(enlarged, exact.repeat(8, axis=0).repeat(8, axis=1))
