"""Feature visualisations for an atlas's channel pages (``convscope atlas ... --visualize``).

For every layer of an atlas, the first ``channels`` channels (all with ``channels=None``)
each get one image that maximises the channel's mean activation, saved as
``crops/<layer>/vis_<channel>.png`` next to the channel's crops; ``visualizations.json``
records the settings, the value each image reached and which channels are done.

The channels are cut into fixed chunks of ``batch_size`` objectives, each optimised as one
batch and written as a whole, so an interrupted run resumes at the first unfinished chunk
and ends with the same images as an uninterrupted one. A manifest made with other settings
or for another atlas (its fingerprint covers the model and the data) is started afresh.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..progress import ProgressCallback
from .objectives import ObjectiveError
from .render import visualize

#: The manifest written into the atlas folder.
MANIFEST = "visualizations.json"
#: The phase name the atlas's visualisation step reports progress under.
PHASE = "atlas: visualisations"
#: Defaults of ``convscope atlas --visualize``: one batch of 16 channels per layer, 128
#: steps at 128 px (a late EfficientNet-Lite0 block: 22 s per channel measured on one
#: thread of a busy 2-core machine, so a few minutes per layer on a CPU).
DEFAULT_STEPS = 128
DEFAULT_SIZE = 128
DEFAULT_CHANNELS = 16
DEFAULT_BATCH = 16


def vis_path(layer: str, channel: int) -> str:
    """Path of a channel's visualisation inside the atlas folder (next to its crops)."""
    return f"crops/{layer}/vis_{channel}.png"


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The atlas folder's visualisation manifest, or None when it has none."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())


def planned_channels(atlas: Any, channels: int | None) -> list[tuple[str, int]]:
    """``(layer, channel)`` of every visualisation: the first ``channels`` channels of each
    atlas layer (all of them for None), in layer order."""
    if channels is not None and channels < 1:
        raise ObjectiveError(f"channels per layer must be at least 1 (or None for all); "
                             f"got {channels}")
    out = []
    for layer in atlas.layers:
        count = int(atlas.meta["layers"][layer]["shape"][0])
        out.extend((layer, c) for c in range(count if channels is None else min(channels, count)))
    return out


def visualize_atlas(
    model: Any,
    atlas: Any,
    folder: str | os.PathLike | None = None,
    *,
    channels: int | None = DEFAULT_CHANNELS,
    steps: int = DEFAULT_STEPS,
    size: int = DEFAULT_SIZE,
    batch_size: int = DEFAULT_BATCH,
    seed: int = 0,
    param: str = "fft",
    transforms: str = "standard",
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Visualise the channels of an atlas and save them into its folder; returns the
    manifest (``{"settings", "layers": {layer: {"channels": [...], "values": [...]}}}``).

    ``atlas`` is an :class:`~convscope.atlas.Atlas` (with ``folder``) or an atlas folder;
    ``model`` the :class:`~convscope.models.LoadedModel` the atlas was made with.
    ``channels`` bounds the work: the first ``channels`` channels of every layer (None: all).
    Finished chunks of an earlier run with the same settings are kept, not redone.
    ``progress(phase, done_steps, total_steps)`` follows :mod:`convscope.progress`.
    Call :func:`convscope.atlas.html.write_html` afterwards to show them on the pages.
    """
    from ..atlas import Atlas

    if not isinstance(atlas, Atlas):
        folder = Path(atlas) if folder is None else Path(folder)
        atlas = Atlas.load(folder)
    if folder is None:
        raise ObjectiveError("visualize_atlas needs the atlas folder to write into (folder=)")
    if batch_size < 1:
        raise ObjectiveError(f"batch_size must be at least 1, got {batch_size}")
    folder = Path(folder)
    plan = planned_channels(atlas, channels)
    settings = {"steps": int(steps), "size": int(size), "seed": int(seed), "param": param,
                "transforms": transforms, "batch_size": int(batch_size),
                "channels_per_layer": channels, "model": atlas.meta.get("model"),
                "fingerprint": atlas.meta.get("fingerprint")}
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("settings") != settings:
        manifest = {"settings": settings, "layers": {}}
    done = {(layer, int(c)) for layer, entry in manifest["layers"].items()
            for c in entry["channels"]}
    chunks = [plan[i:i + batch_size] for i in range(0, len(plan), batch_size)]
    pending = [(k, chunk) for k, chunk in enumerate(chunks)
               if not all((item in done and (folder / vis_path(*item)).exists())
                          for item in chunk)]
    total = len(pending) * steps
    if progress is not None:
        progress(PHASE, 0, total)
    for position, (k, chunk) in enumerate(pending):
        offset = position * steps

        def forward(_phase: str, step: int, _total: int | None, offset: int = offset) -> None:
            if progress is not None:
                progress(PHASE, offset + step, total)

        vis = visualize(model, [f"{layer}:{c}" for layer, c in chunk], steps=steps, size=size,
                        seed=seed + k, batch_size=batch_size, param=param,
                        transforms=transforms, progress=forward)
        for index, (layer, c) in enumerate(chunk):
            path = folder / vis_path(layer, c)
            path.parent.mkdir(parents=True, exist_ok=True)
            vis.image(index).save(path)
            entry = manifest["layers"].setdefault(layer, {"channels": [], "values": []})
            if c in entry["channels"]:
                entry["values"][entry["channels"].index(c)] = float(vis.values[index])
            else:
                entry["channels"].append(c)
                entry["values"].append(float(vis.values[index]))
        _write_manifest(folder, manifest)  # after the chunk's images: a crash keeps the rest
    if not pending:
        _write_manifest(folder, manifest)
    return manifest


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)


def visualized(manifest: dict[str, Any] | None, layer: str) -> dict[int, float]:
    """``{channel: value}`` of the visualised channels of ``layer`` in a manifest."""
    if not manifest or layer not in manifest.get("layers", {}):
        return {}
    entry = manifest["layers"][layer]
    return {int(c): float(v) for c, v in zip(entry["channels"], entry["values"], strict=True)}


__all__: Sequence[str] = ["DEFAULT_BATCH", "DEFAULT_CHANNELS", "DEFAULT_SIZE", "DEFAULT_STEPS",
                          "MANIFEST", "PHASE", "planned_channels", "read_manifest", "vis_path",
                          "visualize_atlas", "visualized"]
