"""``convscope.show(model, image)``: an interactive view inline in a notebook.

The view is one self-contained HTML page (no server, no requests, no widget framework):
the top-5, the input, a Grad-CAM overlay of the top class, and for every chosen layer a
feature grid; a layer menu switches grids, clicking a tile (or the arrow keys) shows that
channel large. Everything is computed here by the library (capture, ``acts.maps``,
``feature_grid``, ``cam``); the page only picks among the pictures. In Jupyter it is shown
in a sandboxed ``<iframe srcdoc>``, so it works in JupyterLab, Notebook 7 and VS Code
without a kernel extension; :meth:`InlineView.save` writes the same page to a file.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Most layers a view embeds (each is one grid image).
MAX_LAYERS = 24
#: Longer side of a grid tile in pixels.
TILE = 56


@dataclass
class InlineView:
    """The page :func:`show` built; Jupyter displays it through ``_repr_html_``."""

    page: str
    layers: list[str] = field(default_factory=list)
    height: int = 620

    def _repr_html_(self) -> str:
        return (f'<iframe srcdoc="{html.escape(self.page, quote=True)}" '
                f'style="width:100%;height:{self.height}px;border:1px solid #ddd" '
                'sandbox="allow-scripts"></iframe>')

    def save(self, path: str | Path) -> Path:
        """Write the standalone page (open it in any browser)."""
        path = Path(path)
        path.write_text(self.page, encoding="utf-8")
        return path


def show(model: Any, image: Any, *, layers: Any = None, channels: int = 32,
         cam_method: str = "gradcam") -> InlineView:
    """An interactive inline view of ``image`` through ``model``.

    ``model``: a :class:`~convscope.models.LoadedModel`, a name :func:`load_model` accepts,
    or an ``nn.Module`` (ImageNet preprocessing assumed). ``image``: anything
    :func:`convscope.load_image` takes. ``layers``: any selector (default: every conv block,
    as the report picks them, at most :data:`MAX_LAYERS`); token and channels-last layers
    are drawn through :meth:`Activations.maps`. ``channels``: tiles per grid.
    """
    import torch

    from .hooks import capture
    from .images import load_image
    from .layers import list_layers, resolve_layers
    from .methods.cam import cam
    from .models import LoadedModel, load_model
    from .render.convert import to_pil
    from .render.grid import feature_grid
    from .render.overlay import overlay
    from .report import _encode, default_layers
    from .spatial import NoSpatialMapError

    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    picture = load_image(image)
    x = loaded.preprocess(picture)
    if layers is None:
        table = list_layers(loaded.module, example_input=x)
        names = default_layers(loaded.module, table)
    else:
        names = list(resolve_layers(loaded.module, layers))
    names = names[:MAX_LAYERS]
    with torch.no_grad(), capture(loaded.module, names) as acts:
        predictions = loaded.predict(x, k=5)[0]
    display = loaded.transform.to_display(x[0].detach().cpu())
    grids = []
    for name in names:
        try:
            maps = acts.maps(name)[0]
        except (NoSpatialMapError, KeyError):
            continue
        count = min(channels, maps.shape[0])
        grid = feature_grid(maps, channels=count, cols=8, tile_size=TILE, pad=1)
        one = feature_grid(maps, channels=[0], tile_size=TILE, pad=0)  # one tile's size
        grids.append({
            "name": name, "shape": list(maps.shape), "count": count, "cols": 8, "pad": 1,
            "tile": [one.size[1], one.size[0]], "src": _encode(grid, "png", 0),
        })
    if not grids:
        raise NoSpatialMapError("none of the chosen layers has a spatial map to draw")
    heat = cam(loaded, x, target=predictions[0].index, method=cam_method)[0]
    payload = {
        "model": loaded.name,
        "random": getattr(loaded, "pretrained", None) is False,
        "predictions": [{"label": p.label, "index": p.index, "probability": p.probability}
                        for p in predictions],
        "input": _encode(to_pil(display), "png", 0),
        "cam": _encode(overlay(display, heat, alpha=0.5), "png", 0),
        "cam_method": cam_method,
        "layers": grids,
    }
    return InlineView(page=_page(payload), layers=[g["name"] for g in grids])


def _page(payload: dict[str, Any]) -> str:
    data = json.dumps(payload).replace("</", "<\\/")
    return _TEMPLATE.replace("__DATA__", data)


_TEMPLATE = """<!doctype html>
<html><head><meta charset="utf-8"><title>convscope</title>
<link rel="icon" href="data:,">
<style>
body{font:13px system-ui,sans-serif;margin:8px;color:#222}
.row{display:flex;gap:12px;flex-wrap:wrap;align-items:flex-start}
img.small{width:160px;image-rendering:auto}
#grid{image-rendering:pixelated;cursor:crosshair;max-width:100%}
#channel{image-rendering:pixelated;border:1px solid #ccc}
.warn{color:#a00;font-weight:bold}
table{border-collapse:collapse}td{padding:0 6px}
</style></head><body>
<div id="head"></div>
<div class="row">
 <div><div>input</div><img id="input" class="small" alt="input"></div>
 <div><div id="camlabel"></div><img id="cam" class="small" alt="class activation map"></div>
 <table id="top"></table>
</div>
<p><label>layer <select id="layer"></select></label> <span id="shape"></span>
 <span id="picked"></span></p>
<div class="row"><img id="grid" alt="feature grid"><canvas id="channel" width="192" height="192"></canvas></div>
<script>
const data = __DATA__;
const $ = (id) => document.getElementById(id);
let current = 0, channel = 0;
const image = new Image();
$("head").innerHTML = "";
const title = document.createElement("b");
title.textContent = data.model;
$("head").appendChild(title);
if (data.random) {
  const warn = document.createElement("span");
  warn.className = "warn";
  warn.textContent = " random weights: this model was not trained";
  $("head").appendChild(warn);
}
$("input").src = data.input;
$("cam").src = data.cam;
$("camlabel").textContent = data.cam_method + ": " + data.predictions[0].label;
for (const p of data.predictions) {
  const tr = document.createElement("tr");
  for (const text of [p.label, (100 * p.probability).toFixed(1) + "%"]) {
    const td = document.createElement("td");
    td.textContent = text;
    tr.appendChild(td);
  }
  $("top").appendChild(tr);
}
data.layers.forEach((layer, i) => {
  const option = document.createElement("option");
  option.value = i;
  option.textContent = layer.name;
  $("layer").appendChild(option);
});
function drawChannel() {
  const layer = data.layers[current];
  const [th, tw] = layer.tile;
  const row = Math.floor(channel / layer.cols), col = channel % layer.cols;
  const top = layer.pad + row * (th + layer.pad), left = layer.pad + col * (tw + layer.pad);
  const canvas = $("channel"), ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const scale = Math.min(canvas.width / tw, canvas.height / th);
  ctx.drawImage(image, left, top, tw, th, 0, 0, tw * scale, th * scale);
  $("picked").textContent = "channel " + channel;
  document.body.dataset.channel = String(channel);
}
function showLayer(i) {
  current = i;
  channel = 0;
  const layer = data.layers[i];
  $("layer").value = String(i);
  $("shape").textContent = layer.shape.join("×") + " (first " + layer.count + " channels)";
  image.onload = () => { $("grid").src = image.src; drawChannel();
                         document.body.dataset.layer = layer.name; };
  image.src = layer.src;
}
$("layer").addEventListener("change", (e) => showLayer(Number(e.target.value)));
$("grid").addEventListener("click", (e) => {
  const layer = data.layers[current], img = $("grid");
  const x = (e.offsetX * img.naturalWidth) / img.clientWidth;
  const y = (e.offsetY * img.naturalHeight) / img.clientHeight;
  const col = Math.floor((x - layer.pad) / (layer.tile[1] + layer.pad));
  const row = Math.floor((y - layer.pad) / (layer.tile[0] + layer.pad));
  const picked = row * layer.cols + col;
  if (col >= 0 && col < layer.cols && picked >= 0 && picked < layer.count) {
    channel = picked;
    drawChannel();
  }
});
document.addEventListener("keydown", (e) => {
  const layer = data.layers[current];
  if (e.key === "ArrowRight" && channel + 1 < layer.count) { channel += 1; drawChannel(); }
  else if (e.key === "ArrowLeft" && channel > 0) { channel -= 1; drawChannel(); }
  else if (e.key === "ArrowDown" && current + 1 < data.layers.length) showLayer(current + 1);
  else if (e.key === "ArrowUp" && current > 0) showLayer(current - 1);
});
showLayer(0);
</script></body></html>
"""
