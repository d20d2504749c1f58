"""The explorer in a real browser: Debian's chromium driven by Playwright.

The server runs in a thread on a free loopback port and is stopped at the end.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="/usr/bin/chromium missing (apt-get install -y chromium; "
                              "`make test` installs it)"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(lite0, image_dir):
    import uvicorn

    from convscope.server import Settings, create_app

    app = create_app(Settings(models={"efficientnet_lite0": lite0}, images=[image_dir]))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the explorer server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as p:
        instance = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )
        yield instance
        instance.close()


def wait_image(page, element_id: str, contains: str = "") -> None:
    """Wait until ``<img id=element_id>`` finished loading a URL containing ``contains``."""
    page.wait_for_function(
        """([id, needle]) => { const img = document.getElementById(id);
             return img && img.dataset.loaded === '1' && (img.dataset.url || '').includes(needle)
               && img.naturalWidth > 0; }""",
        arg=[element_id, contains], timeout=30_000,
    )


def shot(page, selector: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.locator(selector).screenshot())).convert("RGB"),
                      dtype=np.float64)


def hash_state(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlparse(url).fragment).items()}


def test_explore_share_and_reload(browser, server_url, tmp_path):
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server_url + "/")
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    assert page.locator("#predictions li").count() == 5

    # Choose a sample image: predictions and input follow.
    page.select_option("#image", "sample:coffee")
    wait_image(page, "input-img", "sample%3Acoffee")
    page.wait_for_function("document.querySelector('#predictions li') && "
                           "!document.querySelector('#predictions li').textContent.includes('cat')")

    # Select a layer with the mouse, then move with the keyboard.
    page.locator("#layers tr[data-name='_blocks.2']").click()
    wait_image(page, "grid-img", "layer=_blocks.2")
    page.keyboard.press("ArrowDown")
    page.wait_for_function("location.hash.includes('layer=_blocks.2._expand_conv')")
    page.locator("#layers tr[data-name='_blocks.3']").click()
    wait_image(page, "grid-img", "layer=_blocks.3")
    grid = shot(page, "#grid-img")
    assert grid.std() > 20, "the grid image is blank"
    assert "selected" in page.locator("#layers tr[data-name='_blocks.3']").get_attribute("class")

    # Click the tile of the 6th shown channel; the page must pick that channel.
    info = page.evaluate("fetch('/api/grid?' + new URLSearchParams({image: 'sample:coffee', "
                         "layer: '_blocks.3'})).then(r => r.json())")
    box = page.locator("#grid-img").bounding_box()
    natural = page.evaluate("[document.getElementById('grid-img').naturalWidth, "
                            "document.getElementById('grid-img').naturalHeight]")
    scale = box["width"] / natural[0]
    pad, cols = info["pad"], info["cols"]
    tile_w = (natural[0] - pad) / cols - pad
    tile_h = (natural[1] - pad) / info["rows"] - pad
    index = 5
    row, col = divmod(index, cols)
    x = (pad + col * (tile_w + pad) + tile_w / 2) * scale
    y = (pad + row * (tile_h + pad) + tile_h / 2) * scale
    page.locator("#grid-img").click(position={"x": x, "y": y})
    channel = info["channels"][index]
    wait_image(page, "channel-img", f"channel={channel}")
    assert page.locator("#channel-title").text_content().endswith(f"channel {channel}")
    assert shot(page, "#channel-img").std() > 10
    assert page.locator("#channel-stats tr").count() >= 6

    # Switch to CAM: overlay drawn; another class gives another overlay.
    page.click("#tab-cam")
    wait_image(page, "cam-img", "cam.png")
    first = shot(page, "#cam-img")
    assert first.std() > 10
    options = page.locator("#cam-target option").evaluate_all("os => os.map(o => o.value)")
    page.select_option("#cam-target", options[3])
    wait_image(page, "cam-img", f"target={options[3]}")
    second = shot(page, "#cam-img")
    assert np.abs(first - second).mean() > 2, "the CAM overlay did not change with the class"

    # The URL holds the view: reload it in a fresh page and get the same view back.
    shared = page.url
    state = hash_state(shared)
    assert state["image"] == "sample:coffee"
    assert state["layer"] == "_blocks.3"
    assert state["channel"] == str(channel)
    assert state["tab"] == "cam"
    assert state["target"] == options[3]
    cam_url = page.locator("#cam-img").get_attribute("data-url")
    other = browser.new_page(viewport={"width": 1500, "height": 1000})
    other.goto(shared)
    other.wait_for_selector("body[data-ready='1']", timeout=30_000)
    wait_image(other, "cam-img", f"target={options[3]}")
    wait_image(other, "channel-img", f"channel={channel}")
    assert other.locator("#image").input_value() == "sample:coffee"
    assert other.locator("#cam-img").get_attribute("data-url") == cam_url
    assert other.locator("#channel-title").text_content().endswith(f"channel {channel}")
    assert "selected" in other.locator("#layers tr[data-name='_blocks.3']").get_attribute("class")
    assert np.abs(shot(other, "#cam-img") - second).mean() < 1.0
    other.close()

    # Compare two layers side by side, then upload an image through the page.
    page.click("#tab-compare")
    page.select_option("#layer2", "_blocks.10")
    wait_image(page, "cmp1-img", "layer=_blocks.3")
    wait_image(page, "cmp2-img", "layer=_blocks.10")
    upload = tmp_path / "up.png"
    Image.new("RGB", (80, 60), (20, 120, 220)).save(upload)
    page.set_input_files("#upload", str(upload))
    page.wait_for_function("location.hash.includes('image=upload')", timeout=30_000)
    wait_image(page, "input-img", "upload")
    assert page.locator("#error").is_hidden()
    assert errors == []
    page.close()


def test_errors_are_shown_and_session_survives(browser, server_url):
    page = browser.new_page()
    page.goto(server_url + "/#image=sample:chelsea&layer=_blocks.3&channel=999")
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    page.wait_for_selector("#error:not([hidden])")
    assert "channel" in page.locator("#error").text_content()
    page.locator("#layers tr[data-name='_blocks.4']").click()
    wait_image(page, "grid-img", "layer=_blocks.4")
    page.close()
