"""Image crops of every channel's top-k examples: one JPEG strip per channel.

Crops come from the same preprocessed view the model saw (resized, centre-cropped, then
un-normalised for display), cut at the receptive-field box of the example's maximum.
Memory stays bounded: layers are processed in groups whose strips fit a fixed budget, and
each image of a group is decoded once (DataLoader workers decode in parallel).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from convscope.progress import ProgressCallback, report

from .atlas import Atlas

log = logging.getLogger(__name__)

#: Bytes of strip buffers held at once.
BUFFER_BYTES = 64 * 2**20


def crop_path(layer: str, channel: int | str) -> str:
    """Path of a channel's strip inside the atlas folder."""
    return f"crops/{layer}/{channel}.jpg"


def write_crops(atlas: Atlas, folder: Path, dataset: Any, original: Sequence[int],
                to_display: Callable[[torch.Tensor], torch.Tensor], *, crop_size: int = 64,
                workers: int = 0, by: str | None = None,
                progress: ProgressCallback | None = None) -> None:
    """Write ``crops/<layer>/<channel>.jpg``: the channel's k crops side by side, each
    scaled to fit ``crop_size`` x ``crop_size`` (centred on black). ``dataset[original[i]]``
    gives ``(tensor, ...)`` for atlas image ``i``. ``progress`` hears
    ``("atlas crops", done, total)``: one unit per image read and per strip written."""
    by = by or atlas.rankings[0]
    size = int(crop_size)
    groups: list[list[str]] = [[]]
    used = 0
    for layer in atlas.layers:
        channels, k = atlas.topk(layer, by)[0].shape
        need = channels * k * size * size * 3
        if groups[-1] and used + need > BUFFER_BYTES:
            groups.append([])
            used = 0
        groups[-1].append(layer)
        used += need
    total = 0
    for group in groups:
        wanted = {int(i) for layer in group for i in atlas.topk(layer, by)[0].ravel()}
        total += len(wanted) + sum(atlas.topk(layer, by)[0].shape[0] for layer in group)
    step = _Steps(progress, total)
    for group in groups:
        _write_group(atlas, folder, group, dataset, original, to_display, size, workers, by,
                     step)


class _Steps:
    """Counts the crop phase's units and reports them as ``("atlas crops", done, total)``."""

    def __init__(self, progress: ProgressCallback | None, total: int):
        self.progress, self.total, self.done = progress, total, 0
        report(progress, "atlas crops", 0, total)

    def __call__(self) -> None:
        self.done += 1
        report(self.progress, "atlas crops", self.done, self.total)


def _write_group(atlas: Atlas, folder: Path, layers: list[str], dataset: Any,
                 original: Sequence[int], to_display: Callable[[torch.Tensor], torch.Tensor],
                 size: int, workers: int, by: str, step: Callable[[], None]) -> None:
    requests: dict[int, list[tuple[str, int, int, tuple[int, ...]]]] = defaultdict(list)
    strips: dict[str, np.ndarray] = {}
    for layer in layers:
        index = atlas.topk(layer, by)[0]
        boxes = atlas.boxes(layer, by)
        channels, k = index.shape
        strips[layer] = np.zeros((channels, size, k * size, 3), dtype=np.uint8)
        for c in range(channels):
            for j in range(k):
                requests[int(index[c, j])].append((layer, c, j, tuple(map(int, boxes[c, j]))))
    wanted = sorted(requests)
    subset = torch.utils.data.Subset(dataset, [int(original[i]) for i in wanted])
    loader = torch.utils.data.DataLoader(subset, batch_size=None, num_workers=workers)
    for image_index, item in zip(wanted, loader, strict=False):
        step()
        tensor = item[0] if isinstance(item, (tuple, list)) else item
        if tensor is None:
            log.warning("image %s became unreadable; its crops stay black",
                        atlas.images[image_index])
            continue
        view = (to_display(tensor.float()).permute(1, 2, 0).numpy() * 255 + 0.5)
        view = view.astype(np.uint8)
        tiles: dict[tuple[int, int, int, int], np.ndarray] = {}  # deep layers share boxes
        for layer, c, j, box in requests[image_index]:
            if box not in tiles:
                top, left, bottom, right = box
                tiles[box] = _fit(view[top:bottom, left:right], size)
            strips[layer][c, :, j * size:(j + 1) * size] = tiles[box]
    for layer, strip in strips.items():
        target = folder / "crops" / layer
        target.mkdir(parents=True, exist_ok=True)
        for c in range(strip.shape[0]):
            Image.fromarray(strip[c]).save(target / f"{c}.jpg", quality=88)
            step()


def _fit(region: np.ndarray, size: int) -> np.ndarray:
    """``region`` scaled to fit a ``size`` square (aspect kept), centred on black."""
    tile = np.zeros((size, size, 3), dtype=np.uint8)
    height, width = region.shape[:2]
    if height == 0 or width == 0:
        return tile
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    resized = np.asarray(Image.fromarray(region).resize((new_w, new_h), Image.BILINEAR))
    top, left = (size - new_h) // 2, (size - new_w) // 2
    tile[top:top + new_h, left:left + new_w] = resized
    return tile
