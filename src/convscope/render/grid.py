"""Feature-map and filter grids: one vectorised pass, no per-channel Python loop.

Both functions are pure: they copy what they read, never modify their input, and return a
``PIL.Image``. Tile ``(r, c)`` of a grid with ``cols`` columns shows item ``r * cols + c``;
its top-left pixel is at ``(pad + r * (h + pad), pad + c * (w + pad))``.

:func:`feature_grid` draws with numpy only (torch is used for ``sort`` alone): numpy runs
on the calling thread, while a torch op on a large tensor starts an OpenMP thread team for
that thread, and in the explorer server a second team in the process made every forward
pass of the model's own team about 1.7x slower (libgomp stops spinning between parallel
regions once it manages more threads than there are cores). The numpy steps are the same
float32 operations in the same order as torch's, so the pixels are exactly the same. Tiles
are coloured at the activation's size and enlarged afterwards, as colours (fewer pixels to
scale and look up).
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
                     ) -> np.ndarray:
    """Indices of the channels to draw, in drawing order (numpy: no torch op per call)."""
    base = order.numpy() if order is not None else np.arange(count)
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
    picked = np.asarray(list(channels), dtype=np.int64)
    if picked.size == 0:
        raise ValueError("channels selects no channel")
    bad = picked[(picked < 0) | (picked >= count)]
    if bad.size:
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


def _index_range(count: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) of each of ``count`` adaptive-pooling windows over
    ``size`` cells: ``floor(i * size / count)`` to ``ceil((i + 1) * size / count)``, as
    torch's ``adaptive_avg_pool2d`` computes them."""
    index = np.arange(count, dtype=np.int64)
    return index * size // count, ((index + 1) * size + count - 1) // count


def _area_pool(tiles: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``torch.nn.functional.adaptive_avg_pool2d`` of ``(K, h, w)`` float32 tiles, bit for
    bit: each window summed from 0 in row-major order in float32, then divided by its
    height and then by its width. Offsets past a smaller window read a zero row or column
    (adding +0.0 leaves a float sum unchanged). The work runs on ``(h, w, K)`` so every
    gather copies runs of K contiguous values."""
    if size == (1, 1):  # torch takes the mean here (another summation order): use it
        return torch.from_numpy(tiles[:, None]).mean((-1, -2), keepdim=True)[:, 0].numpy()
    height, width = tiles.shape[-2:]
    top, bottom = _index_range(size[0], height)
    left, right = _index_range(size[1], width)
    span_h, span_w = bottom - top, right - left
    padded = np.zeros((height + 1, width + 1, tiles.shape[0]), dtype=np.float32)
    padded[:height, :width] = tiles.transpose(1, 2, 0)
    total = np.zeros((size[0], size[1], tiles.shape[0]), dtype=np.float32)
    for dy in range(int(span_h.max())):
        rows = padded[np.where(dy < span_h, top + dy, height)]
        for dx in range(int(span_w.max())):
            total += rows[:, np.where(dx < span_w, left + dx, width)]
    total /= span_h.astype(np.float32)[:, None, None]
    total /= span_w.astype(np.float32)[None, :, None]
    return np.ascontiguousarray(total.transpose(2, 0, 1))


def _normalize_array(maps: np.ndarray, mode: Normalize) -> tuple[np.ndarray, bool]:
    """``normalize_maps(torch.nan_to_num(maps), mode)`` in numpy, on a float32 array the
    caller owns (changed in place): the same float32 operations, so the same values; and
    whether every result is finite. The NaN/inf pass is skipped when every range is
    finite (then so is every value), the zeroing of constant maps when there are none."""
    if mode == "none":
        np.nan_to_num(maps, copy=False)
        return np.clip(maps, np.float32(0.0), np.float32(1.0), out=maps), True
    if mode == "channel":
        axes: tuple[int, ...] = (-2, -1)
    elif mode == "layer":
        axes = (-3, -2, -1)
    else:
        raise ValueError(f"normalize must be 'channel', 'layer' or 'none'; got {mode!r}")
    low = maps.min(axis=axes, keepdims=True)
    high = maps.max(axis=axes, keepdims=True)
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        np.nan_to_num(maps, copy=False)
        low = maps.min(axis=axes, keepdims=True)
        high = maps.max(axis=axes, keepdims=True)
    with np.errstate(all="ignore"):  # overflow to inf and inf / inf as in torch (IEEE)
        span = high - low
        maps -= low
        maps /= np.maximum(span, np.float32(1e-30))
    flat = ~(span > 0)
    if flat.any():
        np.copyto(maps, np.float32(0.0), where=flat)
    # A finite span bounds every x - low by it (rounding is monotonic): results in [0, 1].
    return maps, bool(np.isfinite(span).all())


def _colour_words(values: np.ndarray, cmap: str, finite: bool = False) -> np.ndarray:
    """``colormap_lut(cmap)[quantize(values)]`` as one little-endian word per pixel (R, G,
    B, then a spare byte; ``values`` is changed): a pixel is one 4-byte element, so
    enlarging and placing tiles copy whole pixels, ~8x faster than 3-byte rows.
    ``finite``: the caller knows there is no NaN or infinity (skips that pass)."""
    if not finite:
        np.nan_to_num(values, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
    values *= np.float32(255.0)
    values += np.float32(0.5)
    np.clip(values, np.float32(0.0), np.float32(255.0), out=values)
    return np.take(_words(colormap_lut(cmap)), values.astype(np.uint8))


def _words(colours: np.ndarray) -> np.ndarray:
    """``(n, 3)`` uint8 colours as ``(n,)`` uint32 words whose first 3 bytes are R, G, B."""
    padded = np.zeros((len(colours), 4), dtype=np.uint8)
    padded[:, :3] = colours
    return padded.view(np.uint32).ravel()


#: Views an array of 4-byte pixel words as 3-byte RGB items, to copy them in one pass.
_RGB_OF_WORD = np.dtype({"names": ["rgb"], "formats": ["V3"], "offsets": [0], "itemsize": 4})


def words_to_rgb(words: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``(H, W)`` pixel words (see :func:`_colour_words`) as ``(H, W, 3)`` uint8 RGB, into
    ``out`` when given (any ``(H, W, 3)`` uint8 array whose rows are contiguous)."""
    height, width = words.shape
    if out is None:
        out = np.empty((height, width, 3), dtype=np.uint8)
    target = out.reshape(height, width * 3).view("V3")
    target[...] = np.ascontiguousarray(words).view(_RGB_OF_WORD)["rgb"]
    return out


def _tile_values(maps: np.ndarray, tile_size: int | None) -> tuple[np.ndarray, int]:
    """``(N, K, h, w)`` values in [0, 1] at the tiles' drawn size, and the integer factor
    the colour tiles are still to be enlarged by (1: none). Area averaging when shrinking
    (``adaptive_avg_pool2d``'s windows); enlarging (nearest, by an integer factor) is
    left for after colouring."""
    if tile_size is None:
        return maps, 1
    if tile_size <= 0:
        raise ValueError(f"tile_size must be positive; got {tile_size}")
    height, width = maps.shape[-2:]
    longest = max(height, width)
    if tile_size >= longest:
        return maps, max(1, tile_size // longest)
    size = (max(1, round(height * tile_size / longest)), max(1, round(width * tile_size / longest)))
    pooled = _area_pool(maps.reshape(-1, height, width), size)
    return pooled.reshape(*maps.shape[:2], *size), 1


def _layout_words(tiles: np.ndarray, cols: int, pad: int, factor: int,
                  pad_color: Sequence[int] = PAD_COLOR) -> np.ndarray:
    """``layout`` of ``(K, h, w)`` pixel words, each tile enlarged ``factor`` times along
    both axes, as ``(H, W)`` words: tiles are widened with one repeat, then copied row by
    row into the canvas (no enlarged copy, no intermediate canvases)."""
    count, small_h, small_w = tiles.shape
    if pad < 0:
        raise ValueError(f"pad must be >= 0; got {pad}")
    height, width = small_h * factor, small_w * factor
    rows = math.ceil(count / cols)
    canvas = np.empty((pad + rows * (height + pad), pad + cols * (width + pad)),
                      dtype=np.uint32)
    canvas.fill(_words(np.asarray([pad_color], dtype=np.uint8))[0])
    wide = np.repeat(tiles, factor, axis=2) if factor > 1 else tiles
    # cells[r, y, c, x] is pixel (y, x) of cell (r, c); each cell is a tile and its gap.
    cells = canvas[pad:, pad:].reshape(rows, height + pad, cols, width + pad)
    full = count // cols
    for first, last, span in ((0, full, cols), (full, rows, count - full * cols)):
        if last <= first or span == 0:
            continue
        block = wide[first * cols:first * cols + (last - first) * span]
        block = block.reshape(last - first, span, small_h, width).transpose(0, 2, 1, 3)
        target = cells[first:last, :height, :span, :width]
        target = target.reshape(last - first, small_h, factor, span, width)
        target[...] = block[:, :, None]
    return canvas


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
    canvas, index, (cols, height, width, block_height, blocks) = _feature_canvas(
        act, channels, cols, normalize, cmap, sort, pad, tile_size)
    image = Image.fromarray(canvas)
    if labels:
        names = [str(int(c)) for c in index]
        step = block_height + (max(2 * pad, 4) if blocks > 1 else 0)
        for sample_index in range(blocks):
            sub = image.crop((0, sample_index * step, image.width,
                              sample_index * step + block_height))
            _draw_labels(sub, names, cols, height, width, pad)
            image.paste(sub, (0, sample_index * step))
    return image


@torch.no_grad()
def feature_grid_array(
    act: torch.Tensor | np.ndarray,
    *,
    channels: ChannelSelection = None,
    cols: int | None = None,
    normalize: Normalize = "channel",
    cmap: str = "viridis",
    sort: Literal["mean", "max"] | None = None,
    pad: int = 1,
    tile_size: int | None = None,
) -> np.ndarray:
    """The pixels of :func:`feature_grid` (same arguments, no labels) as an ``(H, W, 3)``
    uint8 array, for callers that encode them themselves (the explorer's PNG encoder):
    no ``PIL.Image`` to build and read back."""
    return _feature_canvas(act, channels, cols, normalize, cmap, sort, pad, tile_size)[0]


def _feature_canvas(act: torch.Tensor | np.ndarray, channels: ChannelSelection,
                    cols: int | None, normalize: Normalize, cmap: str,
                    sort: Literal["mean", "max"] | None, pad: int, tile_size: int | None
                    ) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int, int]]:
    """The grid's pixels, the drawn channel indices and ``(cols, tile height, tile width,
    block height, blocks)`` for labelling."""
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
    # numpy from here on (see the module doc): the same float32 steps as normalize_maps
    # and torch's repeat_interleave / adaptive_avg_pool2d, on a copy of the chosen channels.
    chosen = np.take(maps.numpy(), index, axis=1)
    normalized, finite = _normalize_array(chosen, normalize)
    values, factor = _tile_values(normalized, tile_size)  # averages: finite stays finite
    height, width = values.shape[-2] * factor, values.shape[-1] * factor
    count = values.shape[1]
    _, cols = _grid_shape(count, cols, height, width)
    words = _colour_words(values, cmap, finite)  # raises for an unknown colour map name
    blocks = [_layout_words(sample, cols, pad, factor) for sample in words]  # one per image
    block_height = blocks[0].shape[0]
    if len(blocks) > 1:
        gap = np.empty((max(2 * pad, 4), blocks[0].shape[1]), dtype=np.uint32)
        gap.fill(_words(np.asarray([PAD_COLOR], dtype=np.uint8))[0])
        joined = np.concatenate([part for block in blocks for part in (block, gap)][:-1])
    else:
        joined = blocks[0]
    return words_to_rgb(joined), index, (cols, height, width, block_height, len(blocks))


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
