"""The seed tutorial's figures for one image, written as PNGs plus an index.html.

The seed (a PyTorch book's "understanding how a CNN learns") drew the first conv layer's
activations, a middle and the last conv layer's, a post-ReLU layer's, and the first-layer
filters. :func:`write_demo` produces those views for any model with the library's own
capture and render functions.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .filters import conv_filters
from .hooks import capture
from .images import load_image
from .layers import LayerCall, list_layers, overview_layers
from .models import LoadedModel, Prediction, logits_of
from .render.convert import to_pil
from .render.grid import feature_grid, filter_grid

_CAPTIONS = {
    "first_conv": "First convolution: edge, colour and line detectors (seed figure 5.22).",
    "first_activation": "After the first activation function: negative responses cut to "
                        "zero, so only the detected patterns remain.",
    "middle_conv": "A middle convolution: textures and parts combine the early edges "
                   "(seed figure 5.23).",
    "last_conv": "The last convolution: high-level, less interpretable features at coarse "
                 "resolution (seed figure 5.24).",
}


@dataclass
class DemoResult:
    """What :func:`write_demo` produced."""

    model_name: str
    predictions: list[Prediction]
    figures: dict[str, Path]
    index_html: Path


def _steps_or_none(steps: Any, what: str) -> Any:
    from contextlib import nullcontext

    return steps.step(what) if steps is not None else nullcontext()


def write_demo(model: LoadedModel, image: Any, out: Path, *, channels: int = 64,
               steps: Any = None) -> DemoResult:
    """Write the demo figures and ``index.html`` into ``out``; return the top-5."""
    out.mkdir(parents=True, exist_ok=True)
    with _steps_or_none(steps, "loading image"):
        picture = load_image(image)
        batch = model.preprocess(picture)
    with _steps_or_none(steps, "finding the first, middle and last conv layers"):
        picked = overview_layers(model.module, batch)
        table = {row.name: row for row in list_layers(model.module, example_input=batch)}
    with _steps_or_none(steps, f"forward pass, capturing {len(picked)} layers"), torch.no_grad():
        with capture(model.module, sorted({c.name for c in picked.values()})) as acts:
            logits = logits_of(model.module(batch))
        probs = torch.softmax(logits.float(), 1)[0]
        top = probs.topk(5)
        predictions = [Prediction(int(i), model.label(int(i)), float(p))
                       for p, i in zip(top.values, top.indices)]
    figures: dict[str, Path] = {}
    captions: dict[str, str] = {}
    with _steps_or_none(steps, "rendering figures"):
        display = model.transform.to_display(batch[0].cpu())
        figures["input"] = out / "input.png"
        to_pil(display).save(figures["input"])
        captions["input"] = f"The input as the model sees it ({display.shape[-1]} px crop)."
        for role, call in picked.items():
            act = acts.calls(call.name)[call.call][0]
            tile = max(64, min(112, act.shape[-1]))
            figures[role] = out / f"activations_{role}.png"
            feature_grid(act, channels=channels, labels=True, tile_size=tile,
                         cols=8).save(figures[role])
            captions[role] = _caption(role, call, table, act.shape[0], channels)
        first = picked["first_conv"].name
        figures["filters"] = out / "filters_first_conv.png"
        weights = conv_filters(model.module, first)
        filter_grid(weights, tile_size=48, cols=8).save(figures["filters"])
        captions["filters"] = (
            f"Filters of {first} {tuple(weights.shape)} from state_dict(), drawn as colour "
            "patches on one symmetric scale (mid-grey is zero) (seed figure 5.25)."
        )
    with _steps_or_none(steps, "writing index.html"):
        index = out / "index.html"
        index.write_text(_html(model.name, image, predictions, figures, captions))
    return DemoResult(model.name, predictions, figures, index)


def _caption(role: str, call: LayerCall, table: dict, count: int, shown: int) -> str:
    row = table.get(call.name)
    rf = row.call_fields[call.call] if row is not None and call.call < len(row.call_fields) else None
    where = f"{call.name} ({call.type}"
    if call.call:
        where += f", call {call.call + 1}"
    where += ")"
    shape = "x".join(map(str, call.output_shape or ()))
    field = f", receptive field {rf.size[0]} px, stride {rf.stride[0]}" if rf else ""
    return (f"{_CAPTIONS[role]} Layer {where}, output {shape}{field}; "
            f"first {min(shown, count)} of {count} channels, each scaled to its own range.")


def _html(model_name: str, image: Any, predictions: list[Prediction],
          figures: dict[str, Path], captions: dict[str, str]) -> str:
    rows = "".join(
        f"<tr><td>{p.probability:.1%}</td><td>{html.escape(p.label)}</td><td>{p.index}</td></tr>"
        for p in predictions
    )
    order = ["input", "first_conv", "first_activation", "middle_conv", "last_conv", "filters"]
    blocks = "".join(
        f'<figure><img src="{figures[key].name}" alt="{key}">'
        f"<figcaption>{html.escape(captions[key])}</figcaption></figure>"
        for key in order if key in figures
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>convscope demo: {html.escape(model_name)}</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
figure {{ margin: 2em 0; }} img {{ max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }}
figcaption {{ color: #555; margin-top: .4em; }} table {{ border-collapse: collapse; }}
td {{ padding: .15em .8em; border-bottom: 1px solid #eee; }}
</style></head><body>
<h1>What {html.escape(model_name)} sees</h1>
<p>Image: <code>{html.escape(str(image))}</code>. Made by <code>convscope demo</code>.</p>
<h2>Top-5 predictions</h2><table>{rows}</table>
<h2>Activations and filters</h2>{blocks}
</body></html>
"""
