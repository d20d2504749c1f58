"""Feature-map and filter grids: one vectorised pass, no per-channel Python loop.

Both functions are pure: they copy what they read, never modify their input, and return a
``PIL.Image``. Tile ``(r, c)`` of a grid with ``cols`` columns shows item ``r * cols + c``;
its top-left pixel is at ``(pad + r * (h + pad), pad + c * (w + pad))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .colormap import colormap_lut, quantize

Normalize = Literal["channel", "layer", "none"]
ChannelSelection = int | Sequence[int] | slice | None

#: Colour of the gaps between tiles.
PAD_COLOR = (255, 255, 255)


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device="cpu", dtype=torch.float32)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.asarray(value, dtype=np.float32))
    raise TypeError(f"{what} must be a torch.Tensor or numpy array; got {type(value).__name__}")


def _select_channels(count: int, channels: ChannelSelection, order: torch.Tensor | None
                     ) -> torch.Tensor:
    """Indices of the channels to draw, in drawing order."""
    base = order if order is not None else torch.arange(count)
    if channels is None:
        return base
    if isinstance(channels, bool):
        raise TypeError("channels must be an int, a sequence of ints or a slice, not a bool")
    if isinstance(channels, int):
        if channels <= 0:
            raise ValueError(f"channels must be positive; got {channels}")
        return base[:channels]
    if isinstance(channels, slice):
        return base[channels]
    picked = torch.as_tensor(list(channels), dtype=torch.long)
    if picked.numel() == 0:
        raise ValueError("channels selects no channel")
    bad = picked[(picked < 0) | (picked >= count)]
    if bad.numel():
        raise IndexError(f"channel {int(bad[0])} out of range: the layer has {count} channels")
    return picked


def _grid_shape(count: int, cols: int | None, height: int, width: int) -> tuple[int, int]:
    if cols is None:
        # About square overall, taking the tile aspect ratio into account.
        cols = max(1, math.ceil(math.sqrt(count * height / max(width, 1))))
    if cols <= 0:
        raise ValueError(f"cols must be positive; got {cols}")
    cols = min(cols, count)
    return math.ceil(count / cols), cols


def _resize_tiles(tiles: torch.Tensor, tile_size: int | None) -> torch.Tensor:
    """Scale ``(K, h, w)`` tiles so the longer side is about ``tile_size``: integer nearest
    upscaling (pixels stay crisp), area averaging when shrinking."""
    if tile_size is None:
        return tiles
    if tile_size <= 0:
        raise ValueError(f"tile_size must be positive; got {tile_size}")
    height, width = tiles.shape[-2:]
    longest = max(height, width)
    if tile_size >= longest:
        factor = tile_size // longest
        if factor > 1:
            tiles = tiles.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
        return tiles
    size = (max(1, round(height * tile_size / longest)), max(1, round(width * tile_size / longest)))
    return torch.nn.functional.adaptive_avg_pool2d(tiles.unsqueeze(1), size).squeeze(1)


def layout(tiles: np.ndarray, cols: int, pad: int, pad_color: Sequence[int] = PAD_COLOR
           ) -> np.ndarray:
    """Arrange ``(K, h, w, 3)`` uint8 tiles row-major into one ``(H, W, 3)`` canvas."""
    count, height, width, _ = tiles.shape
    rows = math.ceil(count / cols)
    if pad < 0:
        raise ValueError(f"pad must be >= 0; got {pad}")
    cell = np.empty((rows * cols, height + pad, width + pad, 3), dtype=np.uint8)
    cell[...] = np.asarray(pad_color, dtype=np.uint8)
    cell[:count, :height, :width] = tiles
    canvas = cell.reshape(rows, cols, height + pad, width + pad, 3).transpose(0, 2, 1, 3, 4)
    canvas = canvas.reshape(rows * (height + pad), cols * (width + pad), 3)
    if pad:
        framed = np.empty((canvas.shape[0] + pad, canvas.shape[1] + pad, 3), dtype=np.uint8)
        framed[...] = np.asarray(pad_color, dtype=np.uint8)
        framed[pad:, pad:] = canvas
        canvas = framed
    return canvas


def _draw_labels(image: Image.Image, labels: Sequence[str], cols: int, height: int, width: int,
                 pad: int) -> None:
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(8, min(12, height // 4)))
    for position, text in enumerate(labels):
        row, col = divmod(position, cols)
        top, left = pad + row * (height + pad), pad + col * (width + pad)
        box = draw.textbbox((left + 1, top), text, font=font)
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((left + 1, top), text, fill=(255, 255, 255), font=font)


@torch.no_grad()
def normalize_maps(maps: torch.Tensor, mode: Normalize) -> torch.Tensor:
    """Scale ``(..., K, h, w)`` maps to [0, 1]: per map (``channel``), over all maps of a
    sample (``layer``) or not at all (``none``: values are clipped). Constant maps -> 0."""
    if mode == "none":
        return maps.clamp(0.0, 1.0)
    if mode == "channel":
        flat = maps.flatten(-2)
        low = flat.amin(-1, keepdim=True).unsqueeze(-1)
        high = flat.amax(-1, keepdim=True).unsqueeze(-1)
    elif mode == "layer":
        flat = maps.flatten(-3)
        low = flat.amin(-1, keepdim=True).unsqueeze(-1).unsqueeze(-1)
        high = flat.amax(-1, keepdim=True).unsqueeze(-1).unsqueeze(-1)
    else:
        raise ValueError(f"normalize must be 'channel', 'layer' or 'none'; got {mode!r}")
    span = high - low
    return torch.where(span > 0, (maps - low) / span.clamp_min(1e-30), torch.zeros_like(maps))


@torch.no_grad()
def feature_grid(
    act: torch.Tensor | np.ndarray,
    *,
    channels: ChannelSelection = None,
    cols: int | None = None,
    normalize: Normalize = "channel",
    cmap: str = "viridis",
    sort: Literal["mean", "max"] | None = None,
    pad: int = 1,
    tile_size: int | None = None,
    labels: bool = False,
) -> Image.Image:
    """Draw the channels of one layer's activation as a grid of colour-mapped tiles.

    ``act`` is ``(C, H, W)`` or ``(N, C, H, W)``; with N > 1 every sample gets its own block
    of rows, separated by a gap, with the same channel order. ``channels`` picks an int
    count (the first, or the strongest with ``sort``), a list of indices or a slice.
    ``sort`` orders channels by descending spatial mean or max (averaged over the batch).
    ``normalize``: ``channel`` scales each tile to its own range, ``layer`` uses one range
    for the whole layer so tiles are comparable, ``none`` takes values as already in [0, 1].
    ``tile_size`` scales each tile's longer side (nearest-neighbour when enlarging).
    ``labels`` writes the channel index on each tile.
    """
    maps = _as_tensor(act, "act")
    if maps.dim() == 3:
        maps = maps.unsqueeze(0)
    if maps.dim() != 4:
        raise ValueError(
            f"act must be (C, H, W) or (N, C, H, W); got shape {tuple(maps.shape)} — "
            "for a flat (N, C) output there is no spatial map to draw"
        )
    if maps.numel() == 0:
        raise ValueError(f"act is empty: shape {tuple(maps.shape)}")
    order = None
    if sort is not None:
        if sort not in ("mean", "max"):
            raise ValueError(f"sort must be None, 'mean' or 'max'; got {sort!r}")
        stat = maps.flatten(2).mean(-1) if sort == "mean" else maps.flatten(2).amax(-1)
        order = torch.argsort(stat.mean(0), descending=True, stable=True)
    index = _select_channels(maps.shape[1], channels, order)
    chosen = torch.nan_to_num(maps.index_select(1, index))
    values = normalize_maps(chosen, normalize)
    values = _resize_tiles(values.flatten(0, 1), tile_size).unflatten(0, chosen.shape[:2])
    height, width = values.shape[-2:]
    count = values.shape[1]
    _, cols = _grid_shape(count, cols, height, width)
    lut = colormap_lut(cmap)
    blocks = []
    for sample in values:  # one block per image of the batch (not per channel)
        tiles = lut[quantize(sample.numpy())]
        blocks.append(layout(tiles, cols, pad))
    if len(blocks) > 1:
        gap = np.empty((max(2 * pad, 4), blocks[0].shape[1], 3), dtype=np.uint8)
        gap[...] = np.asarray(PAD_COLOR, dtype=np.uint8)
        canvas = np.concatenate([part for block in blocks for part in (block, gap)][:-1])
    else:
        canvas = blocks[0]
    image = Image.fromarray(canvas)
    if labels:
        names = [str(int(c)) for c in index]
        block_height = blocks[0].shape[0] + (max(2 * pad, 4) if len(blocks) > 1 else 0)
        for sample_index in range(len(blocks)):
            sub = image.crop((0, sample_index * block_height, image.width,
                              sample_index * block_height + blocks[0].shape[0]))
            _draw_labels(sub, names, cols, height, width, pad)
            image.paste(sub, (0, sample_index * block_height))
    return image


FilterMode = Literal["auto", "rgb", "mean", "channels"]


@torch.no_grad()
def filter_tiles(weights: torch.Tensor | np.ndarray, mode: FilterMode = "auto",
                 cmap: str = "RdBu_r", max_filters: int | None = None,
                 max_channels: int | None = None) -> tuple[np.ndarray, int]:
    """Colour tiles ``(K, kh, kw, 3)`` uint8 of conv filters and the natural column count.

    All filters share one symmetric scale (the largest absolute weight), so zero is always
    mid-grey (``rgb``) or the colour map's centre (``mean``/``channels``) and tiles are
    comparable with each other.
    """
    w = _as_tensor(weights, "weights")
    if w.dim() == 3:
        w = w.unsqueeze(1)
    if w.dim() != 4:
        raise ValueError(
            f"conv weights must be (out, in, kh, kw); got shape {tuple(w.shape)}"
        )
    if max_filters is not None:
        w = w[:max_filters]
    out_channels, in_channels = w.shape[:2]
    if mode == "auto":
        mode = "rgb" if in_channels == 3 else "mean"
    if mode == "rgb":
        if in_channels != 3:
            raise ValueError(f"mode='rgb' needs 3 input channels; these filters have {in_channels}")
        scale = float(w.abs().max()) or 1.0
        rgb = (w / (2 * scale) + 0.5).permute(0, 2, 3, 1).numpy()
        return quantize(rgb), 0
    if mode == "mean":
        maps = w.mean(1)
        cols = 0
    elif mode == "channels":
        if max_channels is not None:
            w = w[:, :max_channels]
        maps = w.flatten(0, 1)
        cols = w.shape[1]
    else:
        raise ValueError(f"mode must be 'auto', 'rgb', 'mean' or 'channels'; got {mode!r}")
    scale = float(maps.abs().max()) or 1.0
    del out_channels
    return colormap_lut(cmap)[quantize((maps / (2 * scale) + 0.5).numpy())], cols


def _upscale_rgb(tiles: np.ndarray, tile_size: int | None) -> np.ndarray:
    height, width = tiles.shape[1:3]
    target = tile_size if tile_size is not None else 24
    factor = max(1, target // max(height, width))
    if factor > 1:
        tiles = tiles.repeat(factor, axis=1).repeat(factor, axis=2)
    return tiles


@torch.no_grad()
def filter_grid(
    weights: torch.Tensor | np.ndarray,
    *,
    mode: FilterMode = "auto",
    cols: int | None = None,
    pad: int = 1,
    tile_size: int | None = None,
    cmap: str = "RdBu_r",
    max_filters: int | None = None,
    max_channels: int | None = None,
) -> Image.Image:
    """Draw conv filters ``(out, in, kh, kw)`` as a grid of small images.

    ``mode``: ``rgb`` shows 3-input-channel filters (first layers) as colour patches;
    ``mean`` averages over input channels; ``channels`` draws one row per filter and one
    column per input channel (limit with ``max_channels``); ``auto`` picks ``rgb`` for 3
    input channels and ``mean`` otherwise. Signed single-channel tiles use the diverging
    ``cmap`` with zero at its centre. Kernels are enlarged with nearest-neighbour to about
    ``tile_size`` pixels (default 24) so a 3x3 filter stays visible.
    """
    tiles, natural_cols = filter_tiles(weights, mode, cmap, max_filters, max_channels)
    tiles = _upscale_rgb(tiles, tile_size)
    height, width = tiles.shape[1:3]
    if cols is None and natural_cols:
        cols = natural_cols
    _, cols = _grid_shape(len(tiles), cols, height, width)
    return Image.fromarray(layout(tiles, cols, pad))
