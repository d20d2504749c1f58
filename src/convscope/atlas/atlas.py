"""The :class:`Atlas` result object and its on-disk format (see docs/atlas.md).

A saved atlas is a folder with ``atlas.json`` (metadata, image list, skipped files) and
``atlas.npz`` (plain numpy arrays, keys ``"<layer>/<ranking>/<field>"`` and
``"<layer>/stats/<name>"``), plus ``crops/`` and ``index.html`` for browsing.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from convscope.errors import UnknownLayerError

from .errors import AtlasError

FORMAT = "convscope-atlas"
FORMAT_VERSION = 1


class Atlas:
    """Per-channel statistics and top-k examples of some layers over a dataset.

    >>> atlas = Atlas.load("out/")
    >>> index, value, location = atlas.topk("_blocks.15")   # (C, k), (C, k), (C, k, 2)
    >>> atlas.images[index[7, 0]]                         # best image of channel 7
    >>> atlas.stats("_blocks.15")["dead"].sum()
    """

    def __init__(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]):
        self.meta = meta
        self._arrays = arrays
        #: The folder the atlas was saved to or loaded from (crops live there), or None.
        self.folder: Path | None = None

    # ------------------------------------------------------------------ contents

    @property
    def images(self) -> list[str]:
        """Ordered paths (or names) of the images the atlas indexes into."""
        return list(self.meta["images"])

    @property
    def layers(self) -> list[str]:
        """Recorded layer names, in model order."""
        return list(self.meta["layers"])

    @property
    def skipped(self) -> list[dict[str, str]]:
        """Files that were not used: ``{"path", "error"}`` each."""
        return list(self.meta.get("skipped", []))

    @property
    def labels(self) -> list[str | None] | None:
        """ImageFolder class of each image (sub-folder name), or None."""
        return self.meta.get("labels")

    @property
    def rankings(self) -> list[str]:
        """Rankings with top-k lists: ``"max"`` and/or ``"mean"``."""
        return list(self.meta["settings"]["rank_by"])

    @property
    def predictions(self) -> np.ndarray:
        """Top-1 predicted class of every image (-1 when the model is not a classifier)."""
        return self._arrays["predictions/class"]

    @property
    def histogram_edges(self) -> np.ndarray:
        """Fixed edges of ``stats(layer)["histogram"]``: bin j holds edges[j-1] < x <= edges[j]."""
        return self._arrays["histogram_edges"]

    def _layer(self, layer: str) -> str:
        if layer not in self.meta["layers"]:
            raise UnknownLayerError(layer, self.layers, hint="atlas.layers lists the recorded ones")
        return layer

    def topk(self, layer: str, by: str = "max") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(index [C,k], value [C,k], location [C,k,2])`` of the ``k`` images that excite
        each channel most, by spatial ``by`` ("max" or "mean"), sorted by value descending
        (ties: lower image index first). ``location`` is the (row, col) of the channel's
        maximum in the layer output for that image."""
        self._layer(layer)
        if by not in self.rankings:
            raise AtlasError(f"this atlas has no top-k by {by!r}; it has {self.rankings}")
        prefix = f"{layer}/{by}/"
        return (self._arrays[prefix + "index"], self._arrays[prefix + "value"],
                self._arrays[prefix + "location"])

    def stats(self, layer: str) -> dict[str, np.ndarray]:
        """Per-channel statistics, ``[C]`` arrays: ``count`` (values seen), ``mean``,
        ``std``, ``max``, ``frac_positive``, ``dead`` (never positive) and ``saturated``
        (always positive: the non-linearity never gates it)."""
        prefix = f"{self._layer(layer)}/stats/"
        return {key[len(prefix):]: value for key, value in self._arrays.items()
                if key.startswith(prefix) and key != prefix + "histogram"}

    def histogram(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """``(counts [C, bins], edges [bins - 1])``: every activation value of each channel
        counted into fixed bins; bin j holds ``edges[j-1] < x <= edges[j]``."""
        return self._arrays[f"{self._layer(layer)}/stats/histogram"], self.histogram_edges

    def boxes(self, layer: str, by: str = "max") -> np.ndarray:
        """``[C, k, 4]`` input-pixel boxes (top, left, bottom, right; exclusive ends) of the
        receptive field of each example's location, clipped to the model input."""
        from convscope.layers import ReceptiveField

        _, _, location = self.topk(layer, by)
        info = self.meta["layers"][layer]
        height, width = self.meta["input_size"][-2:]
        out = np.empty((*location.shape[:2], 4), dtype=np.int32)
        rf = info.get("receptive_field")
        if rf is None:
            out[...] = (0, 0, height, width)
            return out
        field = ReceptiveField(tuple(rf["size"]), tuple(rf["stride"]), tuple(rf["start"]))
        out[...] = field.boxes(location[..., 0], location[..., 1], height, width)
        return out

    def top_classes(self, layer: str, channel: int, n: int = 3, by: str = "max"
                    ) -> list[tuple[str, int]]:
        """The classes the model predicts most often for a channel's top-k images."""
        index, _, _ = self.topk(layer, by)
        classes = self.predictions[index[channel]]
        names = self.meta.get("class_names")
        counts = Counter(int(c) for c in classes if c >= 0).most_common(n)
        return [(names[c] if names and c < len(names) else f"class {c}", count)
                for c, count in counts]

    def dead(self, layer: str) -> list[int]:
        """Channels never positive over the whole dataset."""
        return [int(c) for c in np.flatnonzero(self.stats(layer)["dead"])]

    # ------------------------------------------------------------------ files

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``atlas.json`` and ``atlas.npz`` into ``directory`` (created)."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "atlas.tmp.npz"
        np.savez(tmp, **self._arrays)
        os.replace(tmp, folder / "atlas.npz")
        (folder / "atlas.json").write_text(json.dumps(self.meta, indent=1))
        self.folder = folder
        return folder

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Atlas:
        """Read an atlas folder written by :meth:`save` (or ``convscope atlas``)."""
        folder = Path(directory)
        meta_path, array_path = folder / "atlas.json", folder / "atlas.npz"
        if not meta_path.exists() or not array_path.exists():
            raise FileNotFoundError(f"{folder} holds no atlas (atlas.json + atlas.npz)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise AtlasError(f"{meta_path} is not a convscope atlas")
        if int(meta.get("version", 0)) > FORMAT_VERSION:
            raise AtlasError(
                f"{meta_path} has format version {meta['version']}; this convscope reads "
                f"up to {FORMAT_VERSION}"
            )
        with np.load(array_path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        atlas = cls(meta, arrays)
        atlas.folder = folder
        return atlas

    #: Most layer rows and crop strips :meth:`_repr_html_` shows.
    REPR_LAYERS = 12
    REPR_STRIPS = 3

    def _repr_html_(self) -> str:
        """A compact notebook summary: model, images, reduction, then one row per layer
        (type, shape, dead / saturated channels, mean fraction of positive values, max)
        and, when the atlas was saved with crops, the top-k crop strips of the
        :data:`REPR_STRIPS` channels with the highest max of the last layer, inline."""
        from html import escape

        settings = self.meta.get("settings", {})
        rows = []
        for layer in self.layers[:self.REPR_LAYERS]:
            stats = self.stats(layer)
            info = self.meta["layers"][layer]
            channels = len(stats["dead"])
            rows.append(
                f"<tr><td><code>{escape(layer)}</code></td><td>{escape(str(info.get('type')))}"
                f"</td><td>{'x'.join(str(v) for v in info.get('shape', []))}</td>"
                f"<td>{int(stats['dead'].sum())} / {channels}</td>"
                f"<td>{int(stats['saturated'].sum())}</td>"
                f"<td>{float(np.mean(stats['frac_positive'])):.3f}</td>"
                f"<td>{float(np.max(stats['max'])) if channels else float('nan'):.3g}</td>"
                "</tr>")
        more = len(self.layers) - self.REPR_LAYERS
        if more > 0:
            rows.append(f"<tr><td colspan=7>... {more} more layers</td></tr>")
        head = (f"<b>Atlas</b> of <code>{escape(str(self.meta.get('model')))}</code>: "
                f"{len(self.images)} images ({len(self.skipped)} skipped), "
                f"{len(self.layers)} layers, top-{settings.get('topk', '?')} by "
                f"{', '.join(self.rankings)}, {escape(str(settings.get('reduction', '?')))} "
                "reduction")
        table = ("<table><tr><th>layer</th><th>type</th><th>C x H x W</th><th>dead</th>"
                 "<th>saturated</th><th>mean frac. positive</th><th>max</th></tr>"
                 + "".join(rows) + "</table>")
        return f"<div>{head}{table}{self._repr_strips()}</div>"

    def _repr_strips(self) -> str:
        """Inline ``<img>`` of a few crop strips of the last layer (empty without crops)."""
        import base64

        crops = self.meta.get("crops")
        if self.folder is None or not crops or not self.layers:
            return ""
        layer = self.layers[-1]
        maxima = np.nan_to_num(self.stats(layer)["max"], nan=-np.inf)
        parts = []
        for channel in np.argsort(-maxima, kind="stable")[:self.REPR_STRIPS]:
            path = self.folder / crops["pattern"].format(layer=layer, channel=int(channel))
            if not path.is_file():
                continue
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            parts.append(f"<div>channel {int(channel)}<br><img src=\"data:image/jpeg;base64,"
                         f"{data}\" style=\"height:{int(crops.get('size', 64))}px\"></div>")
        if not parts:
            return ""
        return (f"<p>Top crops of <code>{layer}</code> (channels with the highest max):</p>"
                + "".join(parts))

    def __repr__(self) -> str:
        return (f"Atlas({self.meta['model']!r}, {len(self.images)} images, "
                f"layers={self.layers})")
