"""A self-contained HTML report of what a CNN sees in one image (``convscope report``).

One HTML file, every image embedded as base64, no scripts and no external requests, so it
can be mailed, archived or attached to a paper. Sections collapse (``<details>``): input
and top-5, the layer table, the activation grid and statistics of every selected layer,
optionally a grid of feature visualisations of each selected layer's first channels
(``ReportOptions(visualize=True)``, ``convscope report --visualize``; off by default for
its CPU cost), the first layer's filters and CAM overlays for the top classes.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

log = logging.getLogger(__name__)

#: Module types whose children are browsed for blocks rather than shown themselves.
_CONTAINERS = ("Sequential", "ModuleList", "ModuleDict")

#: Width in pixels of an activation grid in the report.
GRID_WIDTH = 720


@dataclass
class ReportOptions:
    """What goes into a report, and how big it gets."""

    layers: Any = None  # a layer selector; None: every conv block (see default_layers)
    channels: int = 64  # channels drawn per layer grid (the first ones)
    image_format: str = "jpeg"  # "jpeg" (small), "png" (lossless) or "webp"
    quality: int = 85
    cam_topk: int = 3
    cam_method: str = "gradcam"
    topk: int = 5
    cmap: str = "viridis"
    title: str | None = None
    progress: Callable[[str], Any] | None = field(default=None, repr=False)
    # Feature visualisations (convscope.visualize) of the first ``vis_channels`` channels of
    # every drawn layer (the layers selector), all optimised in shared batches. Off by
    # default: the cost is layers x vis_channels x vis_steps forward+backward passes at
    # vis_size px (EfficientNet-Lite0, 4 layers x 8 channels at the defaults: several
    # minutes on a CPU; 0.17 s per image and step at 128 px on one busy core).
    visualize: bool = False
    vis_channels: int = 8
    vis_steps: int = 128
    vis_size: int = 128
    vis_seed: int = 0
    vis_progress: Any = field(default=None, repr=False)  # a convscope.progress callback


def default_layers(module: Any, table: Sequence[Any]) -> list[str]:
    """Every conv block: convolutions that are not inside a block, and the blocks (modules
    with a spatial output containing a convolution) that containers (``Sequential``,
    ``ModuleList``) hold. VGG gives its 13 convs, ResNet ``conv1`` and its residual blocks,
    EfficientNet-Lite0 its stem, 16 MBConv blocks and head."""
    from torch import nn

    spatial = {row.name for row in table if row.output_shape and len(row.output_shape) == 3}
    picked: list[str] = []

    def has_conv(sub: nn.Module) -> bool:
        return any(isinstance(m, nn.Conv2d) for m in sub.modules())

    def visit(prefix: str, parent: nn.Module) -> None:
        for child_name, child in parent.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, nn.Conv2d):
                if name in spatial:
                    picked.append(name)
            elif type(child).__name__ in _CONTAINERS or name not in spatial:
                visit(name, child)
            elif has_conv(child):
                picked.append(name)

    visit("", module)
    return picked


def _encode(image: Any, fmt: str, quality: int) -> str:
    buffer = io.BytesIO()
    fmt = fmt.lower()
    if fmt in ("jpeg", "jpg"):
        image.convert("RGB").save(buffer, format="JPEG", quality=quality, optimize=True)
        mime = "image/jpeg"
    elif fmt == "webp":
        image.save(buffer, format="WEBP", quality=quality)
        mime = "image/webp"
    elif fmt == "png":
        image.save(buffer, format="PNG", optimize=True)
        mime = "image/png"
    else:
        from ..errors import ConvscopeError

        raise ConvscopeError(f"image format must be jpeg, png or webp; got {fmt!r}")
    return f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(src: str, alt: str, cls: str = "") -> str:
    klass = f' class="{cls}"' if cls else ""
    return f'<img src="{src}" alt="{html.escape(alt)}"{klass}>'


def _section(title: str, body: str, open_: bool = False) -> str:
    flag = " open" if open_ else ""
    return f"<details{flag}><summary>{html.escape(title)}</summary>\n{body}\n</details>\n"


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], numeric: set[int]) -> str:
    out = ["<table><thead><tr>", *(f"<th>{html.escape(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for row in rows:
        cells = "".join(
            f'<td class="num">{html.escape(str(c))}</td>' if i in numeric
            else f"<td>{html.escape(str(c))}</td>"
            for i, c in enumerate(row)
        )
        out.append(f"<tr>{cells}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def build_report(model: Any, image: Any, options: ReportOptions | None = None) -> str:
    """The report's HTML for ``image`` (anything :func:`convscope.load_image` takes) through
    ``model`` (a :class:`~convscope.models.LoadedModel`)."""
    from ..hooks import capture
    from ..images import load_image
    from ..layers import list_layers, resolve_layers
    from ..render.convert import to_pil
    from ..render.grid import feature_grid, filter_grid
    from ..spatial import NoSpatialMapError
    from ..stats import layer_summary

    opts = options or ReportOptions()
    say = opts.progress or (lambda _msg: None)
    pil = load_image(image)
    x = model.preprocess(pil)
    say("layer table")
    table = list_layers(model.module, model.input_size, device=model.device)
    names = (default_layers(model.module, table) if opts.layers is None
             else list(resolve_layers(model.module, opts.layers)))
    say(f"forward pass, capturing {len(names)} layer(s)")
    with capture(model.module, names) as acts:
        predictions = model.predict(x, k=max(opts.topk, opts.cam_topk))[0]
    display = model.transform.to_display(x[0].detach().cpu())
    display_pil = to_pil(display)
    sections = []

    # Input and predictions
    rows = [(i + 1, p.label, p.index, f"{100 * p.probability:.2f}%")
            for i, p in enumerate(predictions[: opts.topk])]
    body = (
        '<div class="cams"><figure>'
        + _img(_encode(pil_thumb(pil), "jpeg", 90), "input image", "photo")
        + "<figcaption>input</figcaption></figure><figure>"
        + _img(_encode(display_pil, "png", 0), "model input", "photo")
        + f"<figcaption>as the model sees it ({display_pil.width}×{display_pil.height})"
          "</figcaption></figure><div>"
        + _table(("rank", "class", "index", "probability"), rows, {0, 2, 3})
        + "</div></div>"
    )
    sections.append(_section(f"Input and top-{opts.topk} predictions", body, open_=True))

    # Layer table
    rows = []
    for row in table:
        if not row.output_shape:
            continue
        rf = row.receptive_field
        rows.append((row.name, row.type, "×".join(map(str, row.output_shape)), f"{row.params:,}",
                     rf.size[0] if rf else "", rf.stride[0] if rf else ""))
    body = '<div class="scroll">' + _table(
        ("layer", "type", "output", "params", "RF", "stride"), rows, {3, 4, 5}) + "</div>"
    sections.append(_section(f"Layer table ({len(rows)} layers with an output)", body))

    # Activation grids and statistics
    summary_rows, parts = [], []
    drawn: dict[str, int] = {}  # drawn layer -> channels of its spatial reading
    for name in names:
        if name not in acts:
            continue
        try:  # conv maps as they are; channels-last and transformer tokens as maps
            act = acts.maps(name)[0]
        except NoSpatialMapError:
            continue
        drawn[name] = int(act.shape[0])
        stats = layer_summary(act)
        channels, height, width = act.shape
        shown = min(opts.channels, channels)
        cols = max(1, math.ceil(math.sqrt(shown * height / max(width, 1))))
        tile = max(8, min(max(height, width) * 8, GRID_WIDTH // cols))
        say(f"grid {name}")
        grid = feature_grid(act, channels=shown, cols=cols, cmap=opts.cmap, tile_size=tile)
        dead = stats["dead_channels"]
        dead_text = (", ".join(map(str, dead[:20])) + (" …" if len(dead) > 20 else "")) or "none"
        summary_rows.append((name, f"{channels}×{height}×{width}", f"{100 * stats['frac_zero']:.1f}%",
                             f"{100 * stats['frac_positive']:.1f}%", stats["dead_count"],
                             f"{stats['mean']:.3g}", f"{stats['max']:.3g}"))
        caption = (f"{channels} channels of {height}×{width}, first {shown} shown; zero "
                   f"activations {100 * stats['frac_zero']:.1f}%; dead channels (never positive): "
                   f"{dead_text}")
        parts.append(_section(
            f"{name} — {channels}×{height}×{width}",
            f'<p class="stats">{html.escape(caption)}</p>'
            + _img(_encode(grid, opts.image_format, opts.quality), f"activations of {name}"),
        ))
    stats_table = _table(("layer", "output", "zero", "positive", "dead channels", "mean", "max"),
                         summary_rows, {2, 3, 4, 5, 6})
    sections.append(_section(
        f"Activations of {len(parts)} layer(s)",
        "<h3>Per-layer statistics</h3>" + stats_table + "\n" + "".join(parts), open_=True))

    # Feature visualisations
    if opts.visualize:
        say(f"feature visualisations of {len(drawn)} layer(s)")
        sections.append(_vis_section(model, drawn, opts))

    # First-layer filters
    first = next(((n, m) for n, m in model.module.named_modules()
                  if getattr(m, "weight", None) is not None and m.weight.dim() == 4), None)
    if first is not None:
        from ..filters import conv_filters

        weights = conv_filters(model.module, first[0])
        grid = filter_grid(weights, tile_size=32)
        sections.append(_section(
            f"First-layer filters: {first[0]} {tuple(weights.shape)}",
            _img(_encode(grid, "png", 0), f"filters of {first[0]}"),
        ))

    # CAM overlays
    sections.append(_cam_section(model, x, display_pil, predictions[: opts.cam_topk], opts, say))

    title = opts.title or f"convscope report: {_image_name(image)} through {model.name}"
    meta = (f"model {html.escape(model.name)} · input {'×'.join(map(str, model.input_size))} · "
            f"{len(names)} layer(s) selected")
    if getattr(model, "pretrained", None) is False:
        meta += (' · <strong class="warning">random weights: this model was not trained, '
                 "so its predictions and maps mean nothing</strong>")
    template = Template(
        (resources.files("convscope.report") / "templates" / "report.html").read_text("utf-8")
    )
    from .. import __version__

    return template.substitute(title=html.escape(title), meta=meta, version=__version__,
                               sections="".join(sections))


def _vis_section(model: Any, layers: dict[str, int], opts: ReportOptions) -> str:
    """One labelled grid per layer of the images that maximise its first channels' mean
    activations, all layers optimised together in shared batches."""
    from ..featvis import Visualization, visualize

    if opts.vis_channels < 1:
        from ..errors import ConvscopeError

        raise ConvscopeError(f"vis_channels must be at least 1, got {opts.vis_channels}")
    if not layers:
        return _section("Feature visualisations", "<p>No layer with a spatial reading.</p>")
    # Names as resolved (no glob characters); a layer with fewer channels gives all of them.
    objectives = [f"{name}:0-{min(opts.vis_channels, channels) - 1}"
                  for name, channels in layers.items()]
    vis = visualize(model, objectives, steps=opts.vis_steps, size=opts.vis_size,
                    seed=opts.vis_seed, progress=opts.vis_progress or False)
    parts, start = [], 0
    for name, channels in layers.items():  # visualize keeps the objectives' order
        count = min(opts.vis_channels, channels)
        index = list(range(start, start + count))
        start += count
        part = Visualization(vis.images[index], [vis.objectives[i] for i in index],
                             vis.values[index], vis.history[:, index], vis.settings)
        values = ", ".join(f"{o.name.rsplit(':', 1)[1]}: {float(v):.3g}"
                           for o, v in zip(part.objectives, part.values, strict=True))
        grid = part.grid(cols=min(8, len(part)))
        parts.append(_section(
            f"{name} — channels 0–{len(part) - 1}",
            f'<p class="stats">Mean activation reached per channel: {html.escape(values)}</p>'
            + _img(_encode(grid, opts.image_format, opts.quality),
                   f"feature visualisations of {name}", "photo")))
    intro = (f"<p class=\"stats\">Images synthesised to maximise the mean activation of each "
             f"channel (convscope.visualize: {opts.vis_steps} steps at {opts.vis_size} px, "
             f"Fourier parameterisation, seed {opts.vis_seed}); what the channel responds to "
             "most, independent of the input image.</p>")
    return _section(f"Feature visualisations of {len(parts)} layer(s)", intro + "".join(parts),
                    open_=True)


def _cam_section(model: Any, x: Any, display: Any, top: Sequence[Any], opts: ReportOptions,
                 say: Callable[[str], Any]) -> str:
    if not top or opts.cam_topk <= 0:
        return ""
    try:
        from ..methods.cam import cam
        from ..render.overlay import overlay
    except ImportError as error:
        return _section("Class activation maps", f"<p>CAM is not available here ({error}).</p>")
    from ..errors import ConvscopeError

    say(f"{opts.cam_method} for the top-{len(top)} classes")
    batch = x.expand(len(top), *x.shape[1:])
    try:
        maps = cam(model, batch, target=[p.index for p in top], method=opts.cam_method)
    except ConvscopeError as error:  # e.g. no spatial layer: the rest of the report stands
        log.warning("CAM failed: %s", error)
        return _section("Class activation maps",
                        f"<p>CAM could not be computed: {html.escape(str(error))}</p>")
    figures = []
    for p, heatmap in zip(top, maps, strict=True):
        picture = overlay(display, heatmap, alpha=0.5)
        caption = f"{p.label} ({100 * p.probability:.1f}%)"
        figures.append("<figure>" + _img(_encode(picture, opts.image_format, opts.quality),
                                         f"{opts.cam_method} for {p.label}", "photo")
                       + f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return _section(f"Class activation maps ({opts.cam_method}, top-{len(top)} classes)",
                    '<div class="cams">' + "".join(figures) + "</div>", open_=True)


def pil_thumb(image: Any, size: int = 448) -> Any:
    """A copy of ``image`` no larger than ``size`` pixels on its longer side."""
    copy = image.copy()
    copy.thumbnail((size, size))
    return copy


def _image_name(image: Any) -> str:
    if isinstance(image, (str, Path)):
        return Path(str(image)).name if not str(image).startswith("sample:") else str(image)
    return type(image).__name__


def write_report(path: str | Path, model: Any, image: Any,
                 options: ReportOptions | None = None) -> Path:
    """Build the report and write it to ``path`` (parent folders are created)."""
    out = Path(path)
    text = build_report(model, image, options)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    log.info("wrote %s (%d bytes)", out, out.stat().st_size)
    return out


__all__ = ["ReportOptions", "build_report", "default_layers", "write_report"]
