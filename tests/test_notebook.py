"""convscope.show(): the inline view, driven headless in chromium.

The page must load without a console error, show the top-5 and the random-weights
warning when it applies, switch layers from the menu and the keyboard, and draw the clicked
channel: the enlarged channel equals that tile of the library's own feature grid.
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def view():
    from convscope import load_model, show

    torch.manual_seed(0)
    loaded = load_model("resnet18")  # random weights: the page must say so
    return loaded, show(loaded, "sample:coffee", layers=["layer1", "layer2.0.conv1", "fc"],
                        channels=12)


def test_view_holds_the_library_grids_and_an_iframe(view):
    from convscope import capture
    from convscope.render.grid import feature_grid

    loaded, shown = view
    assert shown.layers == ["layer1", "layer2.0.conv1"]  # fc has no spatial map: left out
    cell = shown._repr_html_()
    assert cell.startswith("<iframe srcdoc=") and 'sandbox="allow-scripts"' in cell
    assert html.unescape(re.search(r'srcdoc="([^"]*)"', cell).group(1)) == shown.page
    x = loaded.preprocess("sample:coffee")
    with torch.no_grad(), capture(loaded.module, "layer1") as acts:
        loaded.module(x)
    expected = feature_grid(acts.maps("layer1")[0], channels=12, cols=8, tile_size=56, pad=1)
    data = re.search(r'"src": "data:image/png;base64,([^"]+)"', shown.page).group(1)
    got = Image.open(io.BytesIO(base64.b64decode(data)))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium missing (make test installs it)")
def test_inline_view_in_chromium(view, tmp_path):
    playwright_api = pytest.importorskip("playwright.sync_api")
    _, shown = view
    path = shown.save(tmp_path / "view.html")
    errors: list[str] = []
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(path.as_uri())
            page.wait_for_function("document.body.dataset.layer === 'layer1'")
            assert "random weights" in page.inner_text("#head")
            assert page.locator("#top tr").count() == 5
            # Click the tile of channel 9 (row 1, col 1): the canvas shows that tile.
            grid = page.locator("#grid")
            box = grid.bounding_box()
            natural = page.evaluate("[document.getElementById('grid').naturalWidth, "
                                    "document.getElementById('grid').naturalHeight]")
            scale = box["width"] / natural[0]
            tile_h, tile_w = (int(v) for v in re.search(
                r'"tile": \[(\d+), (\d+)\]', shown.page).groups())
            grid.click(position={"x": (1 + (tile_w + 1) + tile_w / 2) * scale,
                                 "y": (1 + (tile_h + 1) + tile_h / 2) * scale})
            assert page.evaluate("document.body.dataset.channel") == "9"
            pixels = page.evaluate("""() => { const c = document.getElementById('channel');
                return Array.from(c.getContext('2d').getImageData(0, 0, 1, 1).data); }""")
            grid_png = Image.open(io.BytesIO(base64.b64decode(re.search(
                r'"src": "data:image/png;base64,([^"]+)"', shown.page).group(1)))).convert("RGB")
            expected = grid_png.getpixel((1 + tile_w + 1, 1 + tile_h + 1))
            assert tuple(pixels[:3]) == expected
            page.keyboard.press("ArrowRight")
            assert page.evaluate("document.body.dataset.channel") == "10"
            page.keyboard.press("ArrowDown")
            page.wait_for_function("document.body.dataset.layer === 'layer2.0.conv1'")
            page.select_option("#layer", "0")
            page.wait_for_function("document.body.dataset.layer === 'layer1'")
        finally:
            browser.close()
    assert errors == []
