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
def served(lite0, tiny_loaded, image_dir):
    """``(url, app)`` of the explorer running in a thread of this process."""
    import dataclasses

    import uvicorn

    from convscope.server import Settings, create_app

    random = dataclasses.replace(tiny_loaded, pretrained=False)
    app = create_app(Settings(models={"efficientnet_lite0": lite0, "random": random},
                              images=[image_dir]))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the explorer server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def server_url(served):
    return served[0]


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


def watch_errors(page) -> list[str]:
    """Uncaught exceptions, console errors (CSP violations, a missing favicon) and failed
    requests of ``page``."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}")
            if r.status >= 400 else None)
    return errors


def test_explore_share_and_reload(browser, server_url, tmp_path):
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    errors = watch_errors(page)
    page.goto(server_url + "/")
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    assert page.locator("#predictions li").count() == 5

    # Choose a sample image: predictions and input follow.
    page.select_option("#image", "sample:coffee")
    wait_image(page, "input-img", "sample%3Acoffee")
    page.wait_for_function("() => document.querySelector('#predictions li') && "
                           "!document.querySelector('#predictions li').textContent.includes('cat')")

    # Select a layer with the mouse, then move with the keyboard.
    page.locator("#layers tr[data-name='_blocks.2']").click()
    wait_image(page, "grid-img", "layer=_blocks.2")
    page.keyboard.press("ArrowRight")  # open the block in the layer tree
    page.wait_for_selector("#layers tr[data-name='_blocks.2._expand_conv']")
    page.keyboard.press("ArrowDown")
    page.wait_for_function("() => location.hash.includes('layer=_blocks.2._expand_conv')")
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
    page.wait_for_function("() => location.hash.includes('image=upload')", timeout=30_000)
    wait_image(page, "input-img", "upload")
    assert page.locator("#error").is_hidden()
    # Sent as a form: the file's name is listed (to this browser only).
    page.wait_for_function("() => Array.from(document.querySelectorAll('#image option'))"
                           ".some(o => o.textContent.startsWith('up.png'))")
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


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    errors = watch_errors(page)
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    return page, errors


def layer_rows(page) -> list[str]:
    return page.locator("#layers tbody tr").evaluate_all("rs => rs.map(r => r.dataset.name)")


def test_layer_tree_search_and_hidden_modules(browser, server_url):
    page, errors = open_page(browser, server_url + "/#image=sample:chelsea")
    rows = layer_rows(page)
    # Grouped: top level plus the open ModuleList's blocks, not all 184 rows.
    assert "_blocks" in rows and "_blocks.3" in rows and "_conv_head" in rows
    assert "_blocks.3._expand_conv" not in rows
    assert len(rows) < 40
    # Open a module: its children appear, padding/identity modules stay hidden.
    page.locator("#layers tr[data-name='_blocks.1'] .toggle").click()
    page.wait_for_selector("#layers tr[data-name='_blocks.1._expand_conv']")
    rows = layer_rows(page)
    assert "_blocks.1._bn0" in rows
    assert not any(name.endswith("static_padding") for name in rows)
    page.check("#show-hidden")
    page.locator("#layers tr[data-name='_blocks.1._expand_conv'] .toggle").click()
    page.wait_for_selector("#layers tr[data-name='_blocks.1._expand_conv.static_padding']")
    assert "all=1" in page.url
    page.uncheck("#show-hidden")
    page.wait_for_selector("#layers tr[data-name='_blocks.1._expand_conv.static_padding']",
                           state="detached")
    # Search: the matches with their ancestors, and the query lands in the URL.
    page.fill("#layer-filter", "depthwise")
    page.wait_for_function("() => location.hash.includes('q=depthwise')")
    rows = layer_rows(page)
    matches = [name for name in rows if name.endswith("_depthwise_conv")]
    assert len(matches) == 16
    assert set(rows) == set(matches) | {"_blocks"} | {m.rsplit(".", 1)[0] for m in matches}
    page.locator("#layers tr[data-name='_blocks.7._depthwise_conv']").click()
    wait_image(page, "grid-img", "layer=_blocks.7._depthwise_conv")
    shared = page.url
    other, other_errors = open_page(browser, shared)
    assert other.locator("#layer-filter").input_value() == "depthwise"
    assert "selected" in other.locator(
        "#layers tr[data-name='_blocks.7._depthwise_conv']").get_attribute("class")
    other.close()
    assert errors == [] and other_errors == []
    page.close()


def test_channel_panel_keys_and_controls(browser, server_url):
    page, errors = open_page(browser, server_url +
                             "/#image=sample:chelsea&layer=_blocks.3&sort=max&count=12")
    wait_image(page, "grid-img", "layer=_blocks.3")
    order = page.evaluate("fetch('/api/grid?' + new URLSearchParams({image: 'sample:chelsea', "
                          "layer: '_blocks.3', sort: 'max', count: 12})).then(r => r.json())"
                          )["channels"]
    page.locator("#grid-img").click(position={"x": 3, "y": 3})  # the first tile
    wait_image(page, "channel-img", f"channel={order[0]}")
    # The channel upsampled over the input, as the library's overlay draws it.
    wait_image(page, "channel-over", f"channel={order[0]}")
    over = shot(page, "#channel-over")
    assert over.std() > 10
    assert page.evaluate("document.getElementById('channel-over').naturalWidth") == 224
    # Right/left arrows walk the channels in the grid's order; up/down walk the layers.
    page.keyboard.press("ArrowRight")
    page.wait_for_function(f"() => location.hash.includes('channel={order[1]}')")
    page.keyboard.press("ArrowRight")
    page.wait_for_function(f"() => location.hash.includes('channel={order[2]}')")
    page.keyboard.press("ArrowLeft")
    page.wait_for_function(f"() => location.hash.includes('channel={order[1]}')")
    wait_image(page, "channel-img", f"channel={order[1]}")
    page.keyboard.press("ArrowDown")
    page.wait_for_function("() => location.hash.includes('layer=_blocks.4')")
    page.keyboard.press("ArrowUp")
    page.wait_for_function("() => /layer=_blocks\\.3(&|$)/.test(location.hash)")
    # Controls appear only where they apply.
    assert page.locator("#normalize").is_visible()
    page.click("#tab-filters")
    assert not page.locator("#normalize").is_visible()
    assert page.locator("#count").is_visible()
    page.click("#tab-cam")
    assert not page.locator("#normalize").is_visible()
    assert not page.locator("#count").is_visible()
    assert errors == []
    page.close()


def test_expensive_cam_job_and_random_weights_warning(browser, server_url):
    page, errors = open_page(browser, server_url + "/#image=sample:chelsea&tab=cam")
    assert page.locator("#warning").is_hidden()
    wait_image(page, "cam-img", "method=gradcam")
    page.select_option("#cam-method", "fasterscorecam")
    wait_image(page, "cam-img", "method=fasterscorecam")
    assert page.locator("#cam-job").is_hidden()
    assert shot(page, "#cam-img").std() > 10
    status = page.evaluate("fetch('/api/status').then(r => r.json())")
    assert status["jobs"]["completed"] >= 1
    # A model with random weights says so.
    page.select_option("#model", "random")
    page.wait_for_selector("#warning:not([hidden])")
    assert "random weights" in page.locator("#warning").text_content()
    page.select_option("#model", "efficientnet_lite0")
    page.wait_for_selector("#warning[hidden]", state="attached")
    assert errors == []
    page.close()


def test_job_progress_and_cancel(browser, served):
    """While the model is busy, a Score-CAM request shows its state and can be cancelled."""
    import threading

    url, app = served
    entry = app.state.convscope.models["efficientnet_lite0"]
    page, errors = open_page(browser, url + "/#image=sample:rocket&tab=cam&method=gradcam")
    wait_image(page, "cam-img", "method=gradcam")
    gate = threading.Event()
    holder = threading.Thread(target=entry.run, args=(lambda: gate.wait(60),))
    holder.start()
    try:
        page.select_option("#cam-method", "scorecam")
        page.wait_for_selector("#cam-job:not([hidden])", timeout=60_000)
        page.wait_for_function("() => /running|waiting/.test("
                               "document.getElementById('cam-job-text').textContent)",
                               timeout=60_000)
        page.click("#cam-cancel")
    finally:
        gate.set()
        holder.join()
    page.wait_for_function("() => document.getElementById('cam-job-text').textContent"
                           ".includes('cancelled')", timeout=120_000)
    assert "method=scorecam" not in (page.locator("#cam-img").get_attribute("data-url") or "")
    assert errors == []
    page.close()


def test_channel_visualisation_button(browser, server_url):
    """The channel panel's 'Visualise' runs a job, then shows the library's picture; the
    next visit to that channel shows it at once."""
    page, errors = open_page(browser, server_url +
                             "/#model=random&image=sample:chelsea&layer=features.0")
    wait_image(page, "grid-img", "layer=features.0")
    page.locator("#grid-img").click(position={"x": 3, "y": 3})
    page.wait_for_selector("#vis-box:not([hidden])")
    assert page.locator("#vis-img").is_hidden()
    page.click("#vis-run")
    wait_image(page, "vis-img", "layer=features.0")
    assert shot(page, "#vis-img").std() > 5
    channel = page.evaluate("new URLSearchParams(location.hash.slice(1)).get('channel')")
    cached = page.evaluate(
        "fetch('/api/visualization.png?' + new URLSearchParams({model: 'random', "
        f"layer: 'features.0', channel: '{channel}', start: 'false'}})).then(r => r.status)")
    assert cached == 200
    page.reload()
    wait_image(page, "vis-img", f"channel={channel}")  # known: shown without the button
    assert errors == []
    page.close()


def test_late_grid_reply_is_dropped(browser, server_url):
    """A grid layout that arrives after the view moved on (here: another model) neither
    overwrites the new layer's statistics nor asks for a picture without a layer."""
    page, errors = open_page(browser, server_url + "/#image=sample:chelsea&layer=_blocks.3")
    wait_image(page, "grid-img", "layer=_blocks.3")
    page.wait_for_function("() => document.getElementById('layer-stats').textContent"
                           ".startsWith('_blocks.3: 40 channels')")
    held = []

    def hold(route) -> None:  # the next layout request waits until released below
        if held:
            route.continue_()
        else:
            held.append(route)

    page.route("**/api/grid?*", hold)
    page.select_option("#normalize", "layer")
    page.wait_for_function("() => location.hash.includes('normalize=layer')")
    deadline = time.monotonic() + 10
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(20)
    assert held, "the page asked for no grid layout"
    page.select_option("#model", "random")
    wait_image(page, "grid-img", "model=random")
    stats = page.locator("#layer-stats")
    page.wait_for_function("() => document.getElementById('layer-stats').textContent"
                           ".startsWith('features: 4 channels')")
    held[0].continue_()  # the stale Lite0 layout arrives now
    page.wait_for_timeout(500)
    assert stats.text_content().startswith("features: 4 channels")
    assert "model=random" in page.locator("#grid-img").get_attribute("src")
    assert errors == []
    page.close()
