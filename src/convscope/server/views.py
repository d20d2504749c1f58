"""What each explorer view shows, computed with the library functions the CLI uses.

Every function takes the :class:`~convscope.server.state.ServerState` and plain parameters
and returns JSON-ready data or a ``PIL.Image``; the routes only translate HTTP.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConvscopeError
from .encode import png_bytes
from .jobs import JobCancelledError
from .state import ForwardResult, ServerState, UnknownChannelError, run_apart, run_small

#: Width in pixels the automatic tile size aims the feature grid at.
GRID_WIDTH = 640


from ..spatial import NoSpatialMapError  # noqa: E402  (the one error for "no map to draw")


class CamUnavailableError(ConvscopeError):
    """CAM is not part of this installation (the attribution module is missing)."""


class JobRequiredError(ConvscopeError):
    """An expensive view that is not computed yet: it runs as a job (HTTP 202)."""

    def __init__(self, message: str, job: dict[str, Any]):
        super().__init__(message)
        self.job = job


#: Module types hidden from the layer tree unless asked: they copy or pad their input,
#: so their maps repeat a neighbour's.
HIDDEN_TYPES = ("Identity", "ZeroPad2d", "ConstantPad2d", "ReflectionPad2d",
                "ReplicationPad2d", "CircularPad2d", "Dropout", "Dropout2d", "Flatten")


@dataclass(frozen=True)
class GridParams:
    """Feature-grid controls shared by the JSON and PNG routes."""

    normalize: str = "channel"
    cmap: str = "viridis"
    sort: str | None = None
    count: int = 64
    tile: int | None = None


def models_view(state: ServerState) -> list[dict[str, Any]]:
    """The served models (loading none of them)."""
    rows = []
    for name, entry in state.models.entries.items():
        loaded = entry.loaded
        rows.append({
            "name": name,
            "label": loaded.name if loaded is not None else str(getattr(entry.spec, "name",
                                                                        entry.spec)),
            "loaded": loaded is not None,
            "default": name == state.models.default,
            # True/False once loaded when the loader knows; None: unknown (not loaded, or
            # a module given as is). False means random weights: maps show no learning.
            "pretrained": getattr(loaded, "pretrained", None) if loaded is not None else None,
        })
    return rows


def layers_view(state: ServerState, model: str) -> list[dict[str, Any]]:
    """The layer table: name, type, output shape, receptive field, and whether the layer
    can be drawn (``spatial``) and has filters (``conv``)."""
    from ..spatial import spatial_layout

    entry = state.models[model]
    loaded = entry.get()
    modules = entry.modules()
    hints = entry.hints()
    rows = []
    for info in entry.layer_table():
        row = info.as_dict()
        shape = info.output_shape
        try:  # the same reading as every view: conv maps, channels-last, patch tokens
            spatial_layout((1, *shape), model=hints, module=modules.get(info.name),
                           input_hw=loaded.input_size[-2:], batch_size=1, name=info.name)
            row["spatial"] = True
        except (NoSpatialMapError, TypeError):
            row["spatial"] = False
        row["conv"] = _is_conv(modules.get(info.name))
        row["parent"] = info.name.rsplit(".", 1)[0] if "." in info.name else ""
        row["hidden"] = info.type in HIDDEN_TYPES
        rows.append(row)
    return rows


def _is_conv(module: Any) -> bool:
    weight = getattr(module, "weight", None)
    return weight is not None and hasattr(weight, "dim") and weight.dim() == 4


def predictions_view(state: ServerState, model: str, image: str, k: int,
                     layer: str | None = None) -> list[dict]:
    """Top-``k`` classes from the cached forward pass; a new pass also captures ``layer``
    (the layer the page shows next), so the first view costs one pass."""
    result = state.forward(model, image, layer or None)
    return [{"index": p.index, "label": p.label, "probability": p.probability}
            for p in result.predictions[:k]]


def activation(state: ServerState, model: str, image: str, layer: str
               ) -> tuple[ForwardResult, Any]:
    """The cached ``(C, H, W)`` activation of ``layer`` (404 with suggestions if unknown)."""
    entry = state.models[model]
    entry.layer_info(layer)  # raises UnknownLayerError for a wrong name
    result, act = state.activation(model, image, layer)
    if act is None:
        info = entry.layer_info(layer)
        raise NoSpatialMapError(
            f"layer {layer!r} ({info.type}) produced no tensor output to draw"
        )
    if act.dim() != 3:
        raise NoSpatialMapError(
            f"layer {layer!r} outputs a flat vector {tuple(act.shape)}, not a (C, H, W) map; "
            "pick a convolutional layer"
        )
    return result, act


def _order(result: ForwardResult, layer: str, act: Any, sort: str | None) -> list[int]:
    from ..stats import channel_order

    return result.memo(("order", layer, sort), lambda: channel_order(act, sort))


def grid_layout(result: ForwardResult, layer: str, act: Any, params: GridParams
                ) -> dict[str, Any]:
    """Channels shown (in drawing order), columns and tile size of a feature grid, so the
    browser can map a click on the image back to a channel."""
    channels, height, width = act.shape
    order = _order(result, layer, act, params.sort)[: max(1, min(params.count, channels))]
    count = len(order)
    cols = max(1, min(count, math.ceil(math.sqrt(count * height / max(width, 1)))))
    tile = params.tile or max(8, min(max(height, width) * 8, GRID_WIDTH // cols))
    return {"channels": order, "cols": cols, "rows": math.ceil(count / cols), "pad": 1,
            "tile_size": tile, "map_size": [height, width], "total_channels": channels}


def grid_view(state: ServerState, model: str, image: str, layer: str, params: GridParams
              ) -> dict[str, Any]:
    """Layout and layer statistics of the feature grid (JSON)."""
    from ..stats import layer_summary

    result, act = activation(state, model, image, layer)
    info = grid_layout(result, layer, act, params)
    info["layer"] = layer
    info["stats"] = result.memo(("summary", layer), lambda: layer_summary(act))
    return info


def grid_image(state: ServerState, model: str, image: str, layer: str, params: GridParams
               ) -> Any:
    """The pixels of the feature grid of ``layer`` (``feature_grid`` with the controls) as
    an ``(H, W, 3)`` uint8 array, which :func:`png_bytes` encodes as is."""
    from ..render.grid import feature_grid_array

    result, act = activation(state, model, image, layer)
    info = grid_layout(result, layer, act, params)
    return feature_grid_array(act, channels=info["channels"], cols=info["cols"],
                              normalize=params.normalize, cmap=params.cmap, pad=info["pad"],
                              tile_size=info["tile_size"])


def _check_channel(act: Any, layer: str, channel: int) -> None:
    count = act.shape[0]
    if not 0 <= channel < count:
        raise UnknownChannelError(
            str(channel), [], hint=f"layer {layer!r} has {count} channels, 0..{count - 1}"
        )


def channel_view(state: ServerState, model: str, image: str, layer: str, channel: int
                 ) -> dict[str, Any]:
    """Statistics of one channel, its rank in the layer, and whether it has a filter."""
    from ..stats import as_floats, channel_stats

    result, act = activation(state, model, image, layer)
    _check_channel(act, layer, channel)
    entry = state.models[model]
    info = entry.layer_info(layer)
    module = entry.modules().get(layer)
    one = act[channel:channel + 1]
    stats = as_floats(run_small(lambda: channel_stats(one), one.nelement()), 0)
    rank = _order(result, layer, act, "mean").index(channel)
    out: dict[str, Any] = {
        "layer": layer, "channel": channel, "type": info.type,
        "map_size": list(act.shape[1:]), "stats": stats, "rank_by_mean": rank,
        # One image says only that the channel is not active here; whether it is dead is
        # a dataset question, answered by the atlas's statistics when one is loaded.
        "inactive": stats["max"] <= 0, "conv": _is_conv(module),
        "receptive_field": info.as_dict()["receptive_field"],
    }
    if state.atlas is not None:
        out["atlas"] = atlas_view(state, layer, channel)
    return out


def channel_image(state: ServerState, model: str, image: str, layer: str, channel: int,
                  cmap: str, size: int, over_input: bool = False, alpha: float = 0.5) -> Any:
    """One channel drawn large (``feature_grid`` with ``channels=[c]``, as pixels), or
    upsampled over the input as the model sees it (``overlay``), to show where on the
    image it fires."""
    from ..render.grid import feature_grid_array

    result, act = activation(state, model, image, layer)
    _check_channel(act, layer, channel)
    if not over_input:
        return feature_grid_array(act, channels=[channel], normalize="channel", cmap=cmap,
                                  pad=0, tile_size=size)
    from ..render.overlay import overlay

    def draw() -> Any:  # a bilinear resize to the input's size: large torch work
        values = act[channel].float()
        low, high = values.min(), values.max()
        scaled = (values - low) / (high - low) if high > low else values * 0
        return overlay(result.display, scaled, alpha=alpha, cmap=cmap)

    return run_apart(draw)


def filter_image(state: ServerState, model: str, layer: str, channel: int | None,
                 count: int, tile: int) -> Any:
    """Filters of a conv layer: the whole grid, or one output channel's kernel."""
    import torch

    from ..filters import conv_filters
    from ..render.grid import filter_grid

    entry = state.models[model]
    loaded = entry.get()
    modules = entry.modules()
    if layer not in modules or not layer:
        entry.layer_info(layer)  # raises with suggestions
    module = modules[layer]
    if channel is None or not _is_conv(module):
        weights = run_apart(lambda: conv_filters(loaded.module, layer))  # or its error
        if channel is None:
            return run_apart(lambda: filter_grid(weights, max_filters=count, tile_size=tile))
    else:  # conv_filters(...)[channel:channel + 1] without copying the whole kernel
        weights = module.weight.detach()
    if not 0 <= channel < weights.shape[0]:
        raise UnknownChannelError(
            str(channel), [],
            hint=f"layer {layer!r} has {weights.shape[0]} filters, 0..{weights.shape[0] - 1}",
        )
    # A float CPU copy of one kernel (never a view of the model's parameter).
    kernel = weights[channel:channel + 1].detach().to(device="cpu", dtype=torch.float32).clone()
    inputs = kernel.shape[1]
    if inputs in (1, 3):
        return filter_grid(kernel, tile_size=tile * 2)
    return filter_grid(kernel, mode="channels", max_channels=64, cols=min(16, inputs),
                       tile_size=tile)


def input_image(state: ServerState, model: str, image: str) -> Any:
    """The input as the model sees it (resized, cropped, normalisation undone)."""
    return state.forward(model, image).display


def cam_methods() -> list[str]:
    """CAM method names the attribution module offers (empty when it is missing)."""
    try:
        from ..methods.cam import METHODS
    except ImportError:
        return []
    return list(METHODS)


def cam_image(state: ServerState, model: str, image: str, method: str, target: int | None,
              layer: str | None, alpha: float, cmap: str) -> Any:
    """``convscope.overlay`` of ``convscope.cam`` for one class on the displayed input."""
    from ..render.overlay import overlay

    result, heatmap = cam_heatmap(state, model, image, method, target, layer)
    return run_apart(lambda: overlay(result.display, heatmap, alpha=alpha, cmap=cmap))


def is_expensive(method: str) -> bool:
    """Whether a CAM method runs many forward passes (then it runs as a job)."""
    try:
        from ..methods.cam import SCORE_METHODS, method_name
    except ImportError:
        return False
    return method_name(method) in SCORE_METHODS


def cam_heatmap(state: ServerState, model: str, image: str, method: str, target: int | None,
                layer: str | None, client: str = "", job: bool = False,
                cancelled: Callable[[], bool] | None = None,
                progress: Callable[[str, int, int | None], None] | None = None,
                ) -> tuple[ForwardResult, Any]:
    """The cached ``convscope.cam`` map of one class, computed here for cheap methods.

    An expensive method (Score-CAM, Ablation-CAM) that is not cached yet is queued as a
    job and :class:`JobRequiredError` raised (``job=True``: computed here, from the job).
    ``cancelled`` is asked once the model is free, just before the library call: a job
    cancelled while it waited for the model never runs (the call itself cannot stop).
    """
    try:
        from ..methods.cam import cam, method_name
    except ImportError as error:
        raise CamUnavailableError(f"CAM is not available in this installation ({error})"
                                  ) from error
    method = method_name(method)  # unknown names raise with suggestions
    result = state.forward(model, image)
    entry = state.models[model]
    loaded = entry.get()
    if target is None:
        target = result.predictions[0].index
    classes = len(loaded.class_names) if loaded.class_names else None
    if target < 0 or (classes is not None and target >= classes):
        from ..errors import TargetError

        raise TargetError(f"target class {target} is out of range 0..{(classes or 1) - 1}")
    if layer:
        entry.layer_info(layer)

    def run_cam() -> Any:
        if cancelled is not None and cancelled():
            raise JobCancelledError("cancelled before it started")
        return cam(loaded, result.x, layer=layer or None, target=target,
                   method=method, progress=progress)[0].detach().cpu()

    def compute() -> Any:
        return entry.run(run_cam)

    key = (model, image, method, layer, target)
    found = state.cams.get(key)
    if found is not None:
        return result, found
    if is_expensive(method) and not job:
        params = {"model": model, "image": image, "method": method, "target": target,
                  "layer": layer or ""}

        made: dict[str, Any] = {}

        def work() -> None:
            cam_heatmap(state, model, image, method, target, layer, job=True,
                        cancelled=lambda: made.get("job") is not None
                        and made["job"].cancel_requested,
                        progress=lambda *step: made["job"].report(*step))

        queued = made["job"] = state.jobs.submit(client, "cam", key, params, work)
        raise JobRequiredError(f"{method} runs as a job: poll /api/jobs/{queued.id}",
                               queued.as_dict())
    return result, state.cams.get_or_compute(key, compute)


def sanity_view(state: ServerState, model: str, image: str, method: str,
                target: int | None, steps: int,
                cancelled: Callable[[], bool] | None = None,
                progress: Callable[[str, int, int | None], None] | None = None,
                ) -> dict[str, Any]:
    """``convscope.sanity_check`` of a method on one image, as JSON (run from a job)."""
    from ..methods.sanity import sanity_check

    result = state.forward(model, image)
    entry = state.models[model]
    loaded = entry.get()
    if target is None:
        target = result.predictions[0].index
    def run() -> Any:
        if cancelled is not None and cancelled():
            raise JobCancelledError("cancelled before it started")
        return sanity_check(loaded, result.x, method=method, target=target, steps=steps,
                            progress=progress)

    report = entry.run(run)
    return report.as_dict()


def atlas_view(state: ServerState, layer: str, channel: int) -> dict[str, Any]:
    """Top-k dataset examples and dataset-wide statistics of a channel from the atlas
    given at start (``convscope serve --atlas DIR``)."""
    atlas = state.atlas
    if layer not in atlas.layers:
        return {"available": False, "reason": f"the atlas did not record {layer!r}; it has "
                                              + ", ".join(atlas.layers[:8])}
    index, value, location = atlas.topk(layer)
    if not 0 <= channel < index.shape[0]:
        return {"available": False, "reason": f"the atlas has {index.shape[0]} channels"}
    rows = [{"image": Path(str(atlas.images[int(i)])).name, "value": float(v),
             "location": [int(loc[0]), int(loc[1])]}
            for i, v, loc in zip(index[channel], value[channel], location[channel],
                                 strict=True)]
    layer_stats = atlas.stats(layer)
    stats = {name: _plain(values[channel]) for name, values in layer_stats.items()}
    out_dead = ({"layer_dead_count": int(sum(bool(_plain(v)) for v in layer_stats["dead"]))}
                if "dead" in layer_stats else {})
    return {
        "available": True, "model": atlas.meta.get("model"), "images": len(atlas.images),
        "topk": rows, "stats": stats, **out_dead,
        "top_classes": [[name, count] for name, count in atlas.top_classes(layer, channel)],
        "crops": atlas_crops_path(state, layer, channel) is not None,
    }


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def atlas_crops_path(state: ServerState, layer: str, channel: int) -> Path | None:
    """The file of a channel's top-k crops inside the atlas folder, or None.

    The path is built only from a recorded layer name and an int, then checked to lie
    inside the atlas folder, so a request cannot read anything else.
    """
    atlas = state.atlas
    if atlas is None or layer not in atlas.layers or channel < 0:
        return None
    pattern = (atlas.meta.get("crops") or {}).get("pattern")
    if not pattern:
        return None
    root = Path(str(state.settings.atlas)).resolve()
    path = (root / pattern.format(layer=layer, channel=int(channel))).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path


def visualization_png(state: ServerState, model: str, layer: str, channel: int,
                      client: str = "", job: bool = False,
                      progress: Callable[[str, int, int | None], None] | None = None,
                      start: bool = True) -> bytes | None:
    """PNG of the feature visualisation of one channel (``convscope.visualize``), cached.

    Not cached yet: queued as a job and :class:`JobRequiredError` raised (``job=True``:
    computed here, from the job, with ``progress`` hearing of every step; ``start=False``:
    None instead)."""
    from ..featvis import visualize
    from ..spatial import spatial_layout

    settings = state.settings
    key = ("vis", model, layer, channel, settings.vis_steps, settings.vis_size)
    found = state.visuals.get(key)
    if found is not None:
        return found
    entry = state.models[model]
    info = entry.layer_info(layer)  # unknown names raise with suggestions
    loaded = entry.get()
    shape = info.output_shape
    if not shape:
        raise NoSpatialMapError(f"layer {layer!r} produced no tensor output")
    layout = spatial_layout((1, *shape), model=entry.hints(),
                            module=entry.modules().get(layer),
                            input_hw=loaded.input_size[-2:], batch_size=1, name=layer)
    if not 0 <= channel < layout.channels:
        raise UnknownChannelError(
            f"channel {channel} out of range: {layer} has {layout.channels} channels")
    if not start:
        return None
    if not job:
        params = {"model": model, "layer": layer, "channel": channel}
        made: dict[str, Any] = {}

        def work() -> None:
            visualization_png(state, model, layer, channel, job=True,
                              progress=lambda *step: made["job"].report(*step))

        queued = made["job"] = state.jobs.submit(client, "visualize", key, params, work)
        raise JobRequiredError(f"the visualisation runs as a job: poll /api/jobs/{queued.id}",
                               queued.as_dict())

    def run() -> bytes:
        from ..render.convert import to_pil

        result = visualize(loaded, f"{layer}:{channel}", steps=settings.vis_steps,
                           size=settings.vis_size, progress=progress or False)
        return png_bytes(to_pil(result.images[0]), photo=True)

    return state.visuals.get_or_compute(key, lambda: entry.run(run))
