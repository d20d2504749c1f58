"""Everything about one channel in one object: the data behind the channel page.

The explorer's channel panel, the atlas's channel pages and the report all show the same
things about a channel: its feature visualisation, its top-k dataset examples, the filter
that produces it (first layer) or a summary of its incoming weights, its statistics (dead,
sparsity) and where it fires on the current image. :func:`channel_summary` computes them
once, from the model, an optional :class:`~convscope.atlas.Atlas` and an optional image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..methods.common import borrowed, model_device, normalize, upsample
from .objectives import Channel, ObjectiveError
from .render import Visualization, _probe, _resolve_one, _run, _unpack, _Watch, visualize


@dataclass
class ChannelSummary:
    """What the channel page shows about channel ``channel`` of ``layer`` (``channels`` in
    all). Fields that need an input not given (atlas, image, visualisation) are None.

    - ``visualization``: one image maximising the channel's mean activation.
    - ``weights``: ``{"kind": "filter", "conv", "filter": (3, kh, kw)}`` for a first-layer
      conv, ``{"kind": "incoming", "conv", "norms": (C_in,), "top": [(input, norm), ...]}``
      (L2 norm of the kernel from each input channel) otherwise, ``"depthwise"`` with the
      channel's own ``(kh, kw)`` kernel for a depthwise conv; None when no conv produces it.
    - ``dataset_stats``: the atlas's numbers (count, mean, std, max, frac_positive, dead,
      saturated) plus ``sparsity`` = 1 - frac_positive.
    - ``examples``: the atlas's top-k images, best first: ``{"image", "index", "value",
      "location" (row, col in the layer map), "box" (top, left, bottom, right input px)}``;
      ``crops`` the path of their strip inside the atlas folder; ``top_classes`` the classes
      the model predicts most often for them.
    - ``activation`` ``(h, w)`` raw map on the image, ``heatmap`` ``(H, W)`` in [0, 1] at the
      input size, ``overlay`` a ``PIL.Image`` of the heatmap over the photo, and
      ``image_stats`` (mean, std, min, max, frac_positive, frac_zero) on the image.
    """

    layer: str
    channel: int
    channels: int
    visualization: Visualization | None = None
    weights: dict[str, Any] | None = None
    dataset_stats: dict[str, float] | None = None
    examples: list[dict[str, Any]] | None = None
    crops: str | None = None
    top_classes: list[tuple[str, int]] | None = None
    activation: torch.Tensor | None = None
    heatmap: torch.Tensor | None = None
    overlay: Any = None
    image_stats: dict[str, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready numbers and paths (tensors as lists; images left out)."""
        weights = None
        if self.weights is not None:
            weights = {k: (v.tolist() if isinstance(v, torch.Tensor) else v)
                       for k, v in self.weights.items()}
        vis = None
        if self.visualization is not None:
            vis = {"objective": self.visualization.names[0],
                   "value": float(self.visualization.values[0]),
                   "settings": self.visualization.settings}
        return {
            "layer": self.layer, "channel": self.channel, "channels": self.channels,
            "visualization": vis, "weights": weights, "dataset_stats": self.dataset_stats,
            "examples": self.examples, "crops": self.crops, "top_classes": self.top_classes,
            "image_stats": self.image_stats,
            "activation": None if self.activation is None else self.activation.tolist(),
        }


def _weights(module: nn.Module, layer: str, channel: int, channels: int) -> dict[str, Any] | None:
    found = producing_conv(module, layer, channels)
    if found is None:
        return None
    name, conv = found
    kernel = conv.weight.detach()[channel].float().cpu()  # (C_in / groups, kh, kw)
    if conv.groups == conv.in_channels and conv.groups > 1:
        return {"kind": "depthwise", "conv": name, "filter": kernel[0]}
    if conv.in_channels == 3 and conv.groups == 1:
        return {"kind": "filter", "conv": name, "filter": kernel}
    norms = kernel.flatten(1).norm(dim=1)
    order = norms.argsort(descending=True)[:8]
    return {"kind": "incoming", "conv": name, "norms": norms,
            "top": [(int(i), float(norms[i])) for i in order]}


def producing_conv(module: nn.Module, layer: str, channels: int) -> tuple[str, nn.Conv2d] | None:
    """The convolution that produces the layer's channels: the layer itself when it is a
    ``Conv2d``, else the last ``Conv2d`` with ``channels`` outputs among the modules up to
    the end of ``layer``'s subtree in module order (a block's projection conv, the conv
    before a BatchNorm or an activation)."""
    target = dict(module.named_modules()).get(layer)
    if isinstance(target, nn.Conv2d):
        return layer, target
    found: tuple[str, nn.Conv2d] | None = None
    passed = False
    for name, sub in module.named_modules():
        inside = name == layer or name.startswith(layer + ".")
        if passed and not inside:
            break
        passed = passed or inside
        if isinstance(sub, nn.Conv2d) and sub.out_channels == channels:
            found = (name, sub)
    return found


def _atlas_part(atlas: Any, layer: str, channel: int, by: str | None
                ) -> tuple[dict[str, float], list[dict[str, Any]], str, list[tuple[str, int]]]:
    from ..atlas import Atlas
    from ..atlas.crops import crop_path

    if isinstance(atlas, (str, os.PathLike)):
        atlas = Atlas.load(atlas)
    stats = atlas.stats(layer)
    count = len(stats["mean"])
    if not 0 <= channel < count:
        raise ObjectiveError(f"channel {channel} is out of range for the atlas's layer {layer!r} "
                             f"({count} channels)")
    numbers = {key: float(value[channel]) for key, value in stats.items()}
    numbers["sparsity"] = 1.0 - numbers["frac_positive"]
    by = by or atlas.rankings[0]
    index, value, location = atlas.topk(layer, by)
    boxes = atlas.boxes(layer, by)
    images = atlas.images
    examples = [
        {"image": images[int(i)], "index": int(i), "value": float(v),
         "location": [int(r), int(c)], "box": [int(b) for b in box]}
        for i, v, (r, c), box in zip(index[channel], value[channel], location[channel],
                                    boxes[channel], strict=True)
    ]
    return numbers, examples, crop_path(layer, channel), atlas.top_classes(layer, channel, by=by)


def channel_summary(
    model: Any,
    layer: str,
    channel: int,
    *,
    atlas: Any = None,
    image: Any = None,
    visualization: bool | Visualization = True,
    steps: int = 256,
    size: int | None = None,
    seed: int = 0,
    progress: Any = False,
    by: str | None = None,
    transform: Any = None,
) -> ChannelSummary:
    """Everything the channel page shows about channel ``channel`` of ``layer``.

    ``model`` is a LoadedModel or an ``nn.Module`` (with ``transform`` for its
    normalisation); ``atlas`` an :class:`~convscope.atlas.Atlas` or its folder; ``image``
    anything ``LoadedModel.preprocess`` reads, or a preprocessed ``(1, 3, H, W)`` tensor;
    ``visualization`` True to compute one (``steps``, ``size`` (default: the model's input
    size), ``seed``, ``progress`` as in :func:`visualize`), a ready
    :class:`Visualization` to reuse (a cache), or False.
    """
    from ..models import LoadedModel

    module, normalizer, _ = _unpack(model, transform)
    name = _resolve_one(module, layer)
    if size is None:
        size = model.input_size[-1] if isinstance(model, LoadedModel) else 224
    device = model_device(module)
    modules = {name: dict(module.named_modules())[name]}
    with borrowed(module, what="channel summary"):
        shapes, calls, _, _, layouts = _probe(module, modules, size, normalizer, device)
    channels = shapes[name][0]
    if not 0 <= int(channel) < channels:
        raise ObjectiveError(f"channel {channel} is out of range for layer {name!r}, which has "
                             f"{channels} channels (0..{channels - 1})")
    summary = ChannelSummary(name, int(channel), channels)
    summary.weights = _weights(module, name, int(channel), channels)
    if atlas is not None:
        (summary.dataset_stats, summary.examples, summary.crops,
         summary.top_classes) = _atlas_part(atlas, name, int(channel), by)
    if image is not None:
        watch = _Watch(modules, calls, need_logits=False, layouts=layouts)
        _image_part(summary, model, module, normalizer, image, watch, device)
    if isinstance(visualization, Visualization):
        summary.visualization = visualization
    elif visualization:
        summary.visualization = visualize(model, Channel(name, int(channel)), steps=steps,
                                          size=size, seed=seed, progress=progress,
                                          transform=transform)
    return summary


def _image_part(summary: ChannelSummary, model: Any, module: nn.Module, normalizer: Any,
                image: Any, watch: _Watch, device: torch.device) -> None:
    from ..models import LoadedModel
    from ..render.overlay import overlay
    from ..stats import as_floats, channel_stats

    if isinstance(image, torch.Tensor):
        x = image if image.ndim == 4 else image.unsqueeze(0)
    elif isinstance(model, LoadedModel):
        x = model.preprocess(image)
    else:
        raise TypeError("with a plain nn.Module, pass the image as a preprocessed tensor")
    x = x[:1].to(device=device, dtype=torch.float32)
    with borrowed(module, what="channel summary"), torch.no_grad():
        ctx = _run(module, x, watch)
    maps = ctx.layer(summary.layer)[0].detach().float().cpu()  # (C, h, w)
    act = maps[summary.channel]
    summary.activation = act
    summary.image_stats = as_floats(channel_stats(maps[None]), summary.channel)
    summary.heatmap = normalize(upsample(act[None], tuple(x.shape[-2:])))[0]
    mean = torch.tensor(normalizer.mean).view(3, 1, 1)
    std = torch.tensor(normalizer.std).view(3, 1, 1)
    shown = (x[0].cpu() * std + mean).clamp(0, 1)
    summary.overlay = overlay(shown, summary.heatmap)
