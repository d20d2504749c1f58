"""The HTML report: self-contained, and its numbers and pictures are the library's."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from convscope.filters import conv_filters
from convscope.hooks import capture
from convscope.layers import list_layers
from convscope.render.grid import filter_grid
from convscope.report import ReportOptions, build_report, default_layers


class Collector(HTMLParser):
    """Every tag with its attributes, and the summaries' text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.summaries: list[str] = []
        self.figcaptions: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag in ("summary", "figcaption"):
            self._in = tag

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None

    def handle_data(self, data):
        if self._in == "summary":
            self.summaries.append(data)
        elif self._in == "figcaption":
            self.figcaptions.append(data)


def decode(src: str) -> np.ndarray:
    header, payload = src.split(",", 1)
    assert header.startswith("data:image/")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB"))


@pytest.fixture(scope="module")
def report(lite0, chelsea):
    options = ReportOptions(layers=["_blocks.3", "_blocks.11"], cam_topk=3)
    return build_report(lite0, chelsea, options)


@pytest.fixture(scope="module")
def parsed(report):
    collector = Collector()
    collector.feed(report)
    return collector


def test_default_layers_are_conv_blocks(lite0, vgg16, resnet18):
    table = list_layers(lite0.module)
    assert default_layers(lite0.module, table) == (
        ["_conv_stem"] + [f"_blocks.{i}" for i in range(16)] + ["_conv_head"])
    vgg_convs = [f"features.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)]
    assert default_layers(vgg16, list_layers(vgg16)) == vgg_convs
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert default_layers(resnet18, list_layers(resnet18)) == ["conv1", *blocks]


def test_report_is_self_contained(report, parsed):
    sources = [attrs.get("src", "") for tag, attrs in parsed.tags if tag == "img"]
    assert len(sources) >= 2 + 2 + 1 + 3  # input x2, two grids, filters, three CAMs
    assert all(src.startswith("data:image/") for src in sources)
    for tag, attrs in parsed.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed")
        for name in ("src", "href", "action", "srcset"):
            assert not attrs.get(name, "data:").startswith(("http:", "https:", "//"))
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", report)
    assert "@import" not in report
    assert sum(1 for tag, _ in parsed.tags if tag == "details") >= 6


def test_report_numbers_are_the_models(report, parsed, lite0, chelsea):
    x = lite0.preprocess(chelsea)
    top = lite0.predict(x, k=5)[0]
    for p in top:
        assert f"<td>{p.label}</td>" in report
        assert f"{100 * p.probability:.2f}%" in report
    with torch.no_grad(), capture(lite0.module, ["_blocks.11"]) as acts:
        lite0.module(x)
    act = acts["_blocks.11"][0].numpy()
    dead = int((act.reshape(act.shape[0], -1).max(1) <= 0).sum())
    zero = 100 * float((act == 0).mean())
    row = re.search(r"<tr><td>_blocks\.11</td><td>192×7×7</td>(.*?)</tr>", report).group(1)
    cells = re.findall(r">([^<]*)</td>", row)
    assert cells[0] == f"{zero:.1f}%"
    assert int(cells[2]) == dead
    assert any(s.startswith("_blocks.11 — 192×7×7") for s in parsed.summaries)
    # CAM captions name the top-3 classes in order.
    cam_captions = [c for c in parsed.figcaptions if "%)" in c]
    assert [c.split(" (")[0] for c in cam_captions] == [p.label for p in top[:3]]


def test_embedded_filters_are_filter_grid(parsed, lite0):
    images = [attrs["src"] for tag, attrs in parsed.tags if tag == "img"
              and attrs.get("alt") == "filters of _conv_stem"]
    assert len(images) == 1
    expected = np.asarray(filter_grid(conv_filters(lite0.module, "_conv_stem"), tile_size=32))
    np.testing.assert_array_equal(decode(images[0]), expected)


def test_embedded_input_is_what_the_model_sees(parsed, lite0, chelsea):
    src = next(attrs["src"] for tag, attrs in parsed.tags
               if tag == "img" and attrs.get("alt") == "model input")
    x = lite0.preprocess(chelsea)[0]
    expected = (lite0.transform.to_display(x).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(decode(src), expected)


@pytest.mark.slow
def test_default_report_size_is_reasonable(lite0, chelsea):
    html = build_report(lite0, chelsea)
    size = len(html.encode("utf-8"))
    assert 200_000 < size < 6_000_000
    assert html.count("<details") >= 18 + 4


def test_small_model_and_options(tiny_net):
    from convscope.errors import ConvscopeError, UnknownLayerError
    from convscope.models import load_model

    loaded = load_model(tiny_net, device="cpu")
    html = build_report(loaded, "sample:rocket", ReportOptions(
        image_format="png", channels=2, cam_topk=2, topk=3, title="tiny <report>"))
    assert "tiny &lt;report&gt;" in html
    assert "features.0 — 4×224×224" in html
    assert "first 2 shown" in html
    with pytest.raises(UnknownLayerError, match="did you mean"):
        build_report(loaded, "sample:rocket", ReportOptions(layers=["features.9"]))
    with pytest.raises(ConvscopeError, match="jpeg, png or webp"):
        build_report(loaded, "sample:rocket", ReportOptions(image_format="gif"))


def test_cam_failure_leaves_the_rest(tiny_net):
    from convscope.models import load_model

    loaded = load_model(tiny_net, device="cpu")
    html = build_report(loaded, "sample:rocket", ReportOptions(cam_method="no-such-cam"))
    assert "CAM could not be computed" in html
    assert "features.0 — 4×224×224" in html


def test_random_weights_are_said_in_the_header_and_token_layers_are_drawn():
    """A torchvision model without weights says so; a ViT block (tokens) is drawn as maps
    through the one spatial reading, never skipped or drawn as a 197x768 picture."""
    from convscope import build_report, load_model
    from convscope.report import ReportOptions

    loaded = load_model("timm:vit_tiny_patch16_224", model_kwargs={"img_size": 64, "depth": 2})
    assert loaded.pretrained is False
    page = build_report(loaded, "sample:coffee", ReportOptions(layers=["blocks.1"], cam_topk=1))
    assert "random weights" in page
    assert "blocks.1 — 192×4×4" in page


def test_feature_visualisation_grids_are_off_by_default_and_embedded_when_asked(tiny_net):
    """--visualize: one grid per drawn layer of its first channels (fewer when the layer has
    fewer), embedded; tiles and stated values checked against an independent forward."""
    from convscope.featvis import visualize
    from convscope.models import load_model

    loaded = load_model(tiny_net, device="cpu")
    options = dict(layers=["features.0", "features.3"], image_format="png", cam_topk=0)
    plain = build_report(loaded, "sample:rocket", ReportOptions(**options))
    assert "Feature visualisations" not in plain
    page = build_report(loaded, "sample:rocket", ReportOptions(
        **options, visualize=True, vis_channels=3, vis_steps=6, vis_size=32))
    assert "Feature visualisations of 2 layer(s)" in page
    assert "6 steps at 32 px" in page
    parsed = Collector()
    parsed.feed(page)
    grids = {tag[1]["alt"]: tag[1]["src"] for tag in parsed.tags
             if tag[0] == "img" and tag[1].get("alt", "").startswith("feature visualisations")}
    assert set(grids) == {"feature visualisations of features.0",
                          "feature visualisations of features.3"}
    assert "features.0 — channels 0–2" in parsed.summaries
    assert "features.3 — channels 0–1" in parsed.summaries  # the layer has only 2
    # The same optimisation run on its own (deterministic for a seed on the CPU).
    alone = visualize(loaded, ["features.0:0-2", "features.3:0-1"], steps=6, size=32,
                      progress=False)
    grid = decode(grids["feature visualisations of features.0"])
    assert grid.shape == (32 + 4, 3 * 32 + 4 * 2, 3)
    for i in range(3):  # the lower half of each tile (the label covers the top)
        tile = grid[2 + 16: 2 + 32, 2 + i * 34: 2 + i * 34 + 32].astype(int)
        expected = np.floor(alone.images[i].permute(1, 2, 0).numpy()[16:] * 255 + 0.5)
        assert np.abs(tile - expected).max() <= 1
    # Stated values: the channel means of those images, by an independent forward.
    norm = loaded.transform
    x = (alone.images - torch.tensor(norm.mean).view(1, 3, 1, 1)) / torch.tensor(
        norm.std).view(1, 3, 1, 1)
    with torch.no_grad():
        first = tiny_net.features[0](x[:3])
        second = tiny_net.features[:4](x[3:])
    means = [float(first[c, c].mean()) for c in range(3)] + [
        float(second[c, c].mean()) for c in range(2)]
    stated = [float(v) for v in re.findall(r"\d+: (-?[\d.e+-]+)", " ".join(
        t for t in re.findall(r"Mean activation reached per channel: ([^<]*)", page)))]
    np.testing.assert_allclose(stated, means, rtol=6e-3, atol=1e-4)  # 3 digits
