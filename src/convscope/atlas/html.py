"""Static pages to browse an atlas: ``index.html`` (layers, dead channels, skipped files)
and ``layers/<layer>.html`` (per channel: top-k crops, statistics, predicted classes, and
the channel's feature visualisation when ``convscope atlas --visualize`` made one, with a
grid of them all at the top of the layer page).

Self-contained: no script, no network; images load lazily from ``crops/``.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

import numpy as np

from .atlas import Atlas
from .crops import crop_path

_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{padding:3px 8px;border-bottom:1px solid #ddd;
text-align:left;vertical-align:middle}th{background:#f4f4f4}
.dead{color:#b00}.num{text-align:right;font-variant-numeric:tabular-nums}
img{image-rendering:auto;display:block}small{color:#666}
.vis{width:96px;height:96px}.visgrid{display:flex;flex-wrap:wrap;gap:3px}
.visgrid a{position:relative;display:block}.visgrid img{width:64px;height:64px}
.visgrid span{position:absolute;left:1px;top:0;font-size:10px;background:#000;color:#fff}
"""


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}"
            f"</title><style>{_STYLE}</style></head><body>{body}</body></html>\n")


def write_html(atlas: Atlas, folder: Path) -> Path:
    """Write the browsable pages into ``folder``; returns the index path."""
    from ..featvis.atlas import read_manifest

    folder = Path(folder)
    (folder / "layers").mkdir(parents=True, exist_ok=True)
    meta = atlas.meta
    visualizations = read_manifest(folder)
    rows = []
    for layer in atlas.layers:
        stats = atlas.stats(layer)
        info = meta["layers"][layer]
        dead = atlas.dead(layer)
        rf = info.get("receptive_field")
        rows.append(
            f"<tr><td><a href='layers/{escape(layer)}.html'>{escape(layer)}</a></td>"
            f"<td>{escape(info['type'])}</td><td>{' x '.join(map(str, info['shape']))}</td>"
            f"<td>{rf['size'][0] if rf else '?'}</td>"
            f"<td class='num'>{len(dead)}</td>"
            f"<td class='num'>{int(stats['saturated'].sum())}</td>"
            f"<td><small>{escape(', '.join(map(str, dead[:40])))}"
            f"{' ...' if len(dead) > 40 else ''}</small></td></tr>"
        )
        _write_layer(atlas, folder, layer, visualizations)
    skipped = "".join(f"<li>{escape(s['path'])}: <small>{escape(s['error'])}</small></li>"
                      for s in atlas.skipped)
    dataset = meta["dataset"]
    body = (
        f"<h1>Atlas of {escape(meta['model'])}</h1>"
        f"<p>{dataset['images']} images from {escape(dataset['source'])}; "
        f"{dataset['skipped']} skipped; top-{meta['settings']['topk']} by "
        f"{escape(', '.join(atlas.rankings))}.</p>"
        + _vis_note(visualizations)
        + "<table><tr><th>layer</th><th>type</th><th>output</th><th>receptive field</th>"
        "<th>dead</th><th>saturated</th><th>dead channels</th></tr>"
        + "".join(rows) + "</table>"
        + (f"<h2>Skipped files ({len(atlas.skipped)})</h2><ul>{skipped}</ul>"
           if atlas.skipped else "")
    )
    index = folder / "index.html"
    index.write_text(_page(f"Atlas: {meta['model']}", body))
    return index


def _vis_note(manifest: dict | None) -> str:
    if not manifest:
        return ""
    settings = manifest["settings"]
    count = sum(len(entry["channels"]) for entry in manifest["layers"].values())
    per_layer = settings.get("channels_per_layer")
    scope = "every channel" if per_layer is None else f"the first {per_layer} channels"
    return (f"<p>Feature visualisations of {scope} of each layer ({count} in all): "
            f"{settings['steps']} steps at {settings['size']} px, {escape(settings['param'])} "
            f"parameterisation, seed {settings['seed']}.</p>")


def _vis_grid(layer: str, done: dict[int, float]) -> str:
    """All of a layer's visualisations, each linking to its channel's row."""
    if not done:
        return ""
    from ..featvis.atlas import vis_path

    tiles = "".join(
        f"<a href='#c{c}' title='channel {c}: {_fmt(value)}'><img loading='lazy' "
        f"src='../{escape(vis_path(layer, c))}' alt='channel {c}'><span>{c}</span></a>"
        for c, value in sorted(done.items()))
    return (f"<h2>Feature visualisations ({len(done)} channels)</h2>"
            "<p>Images synthesised to maximise each channel's mean activation "
            "(convscope.visualize); click one for its row.</p>"
            f"<div class='visgrid'>{tiles}</div>")


def _write_layer(atlas: Atlas, folder: Path, layer: str,
                 visualizations: dict | None = None) -> None:
    from ..featvis.atlas import vis_path, visualized

    done = visualized(visualizations, layer)
    stats = atlas.stats(layer)
    by = atlas.rankings[0]
    index, value, _ = atlas.topk(layer, by)
    has_crops = "crops" in atlas.meta
    rows = []
    for c in range(index.shape[0]):
        classes = ", ".join(f"{escape(name)} ({n})" for name, n in atlas.top_classes(layer, c))
        names = " | ".join(escape(Path(atlas.images[i]).name) for i in index[c][:3])
        crops = (f"<img loading='lazy' src='../{escape(crop_path(layer, c))}' "
                 f"title='{names}' alt='top-{index.shape[1]} crops of channel {c}'>"
                 if has_crops else "")
        cls = " class='dead'" if stats["dead"][c] else ""
        vis = ""
        if done:
            vis = (f"<td><img class='vis' loading='lazy' src='../{escape(vis_path(layer, c))}' "
                   f"alt='feature visualisation of channel {c}'><small>{_fmt(done[c])}</small>"
                   "</td>" if c in done else "<td><small>not visualised</small></td>")
        rows.append(
            f"<tr id='c{c}'><td{cls}>{c}{' dead' if stats['dead'][c] else ''}</td>{vis}"
            f"<td>{crops}<small>{classes}</small></td>"
            f"<td class='num'>{_fmt(stats['max'][c])}</td>"
            f"<td class='num'>{_fmt(stats['mean'][c])}</td>"
            f"<td class='num'>{_fmt(stats['std'][c])}</td>"
            f"<td class='num'>{100 * float(stats['frac_positive'][c]):.1f}%</td>"
            f"<td class='num'>{_fmt(value[c, -1])}</td></tr>"
        )
    body = (
        f"<p><a href='../index.html'>all layers</a></p><h1>{escape(layer)}</h1>"
        f"<p>Top-{index.shape[1]} images per channel by spatial {escape(by)}; each crop "
        "is the receptive field of the channel's maximum.</p>"
        + _vis_grid(layer, done)
        + "<table><tr><th>channel</th>"
        + ("<th>visualisation (value)</th>" if done else "")
        + "<th>top examples (predicted classes)</th><th>max</th>"
        "<th>mean</th><th>std</th><th>positive</th><th>k-th value</th></tr>"
        + "".join(rows) + "</table>"
    )
    (folder / "layers" / f"{layer}.html").write_text(_page(f"{layer}: atlas", body))


def _fmt(value: float | np.floating) -> str:
    return f"{float(value):.3g}"
