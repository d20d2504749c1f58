"""The explorer's JSON + PNG API, checked against the library computed independently."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from convscope.filters import conv_filters
from convscope.hooks import capture
from convscope.images import load_image
from convscope.render.grid import feature_grid, filter_grid

CHELSEA = "sample:chelsea"
RAW = {"Content-Type": "application/octet-stream"}


#: A Host the explorer answers when bound to loopback (TestClient sends "testserver").
LOCAL = "http://localhost"


def png(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


@pytest.fixture(scope="module")
def lite0_acts(lite0, chelsea):
    """Every layer of Lite0 on chelsea, captured here without the server."""
    x = lite0.preprocess(chelsea)
    with torch.no_grad(), capture(lite0.module, ["_blocks.3", "_blocks.1._expand_conv",
                                                 "_conv_stem", "_conv_head"]) as acts:
        lite0.module(x)
    return {name: acts[name][0] for name in acts}


def test_models_and_images_are_listed(client):
    models = client.get("/api/models").json()
    assert [m["name"] for m in models] == ["efficientnet_lite0", "tiny"]
    assert models[0]["default"] is True
    ids = {row["id"]: row for row in client.get("/api/images").json()}
    assert {"sample:chelsea", "sample:coffee", "sample:rocket", "sample:astronaut"} <= set(ids)
    assert ids["file:coffee.png"]["kind"] == "file"
    assert ids["file:red.jpg"]["kind"] == "file"
    assert "file:secret.png" not in ids


def test_predictions_are_the_models(client, lite0, chelsea):
    rows = client.get("/api/predict", params={"image": CHELSEA, "k": 5}).json()
    expected = lite0.predict(lite0.preprocess(chelsea), k=5)[0]
    assert [r["index"] for r in rows] == [p.index for p in expected]
    # Egyptian cat (0.378) and tiger cat (0.376) are 0.002 apart: the order may follow BLAS.
    assert {r["label"] for r in rows[:2]} == {"Egyptian cat", "tiger cat"}
    assert rows[0]["probability"] == pytest.approx(0.378, abs=4e-3)
    assert [r["probability"] for r in rows] == pytest.approx([p.probability for p in expected],
                                                             abs=1e-5)


def test_layer_table_is_list_layers(client, lite0):
    from convscope.layers import list_layers

    rows = client.get("/api/layers").json()
    expected = [info.as_dict() for info in list_layers(lite0.module)]
    assert [r["name"] for r in rows] == [e["name"] for e in expected]
    by_name = {r["name"]: r for r in rows}
    assert by_name["_blocks.3"]["output_shape"] == [40, 28, 28]
    assert by_name["_blocks.3"]["receptive_field"] == next(
        e["receptive_field"] for e in expected if e["name"] == "_blocks.3")
    assert by_name["_conv_stem"]["conv"]
    assert not by_name["_blocks.3"]["conv"]
    assert by_name["_blocks.3"]["spatial"]
    assert not by_name["_fc"]["spatial"]


def test_grid_png_equals_feature_grid(client, lite0_acts):
    act = lite0_acts["_blocks.3"]
    params = {"image": CHELSEA, "layer": "_blocks.3", "sort": "max", "count": 12,
              "normalize": "layer", "cmap": "magma"}
    info = client.get("/api/grid", params=params).json()
    # Independent sort: descending spatial max, stable.
    maxima = act.flatten(1).amax(1).numpy()
    expected_order = sorted(range(40), key=lambda c: (-maxima[c], c))[:12]
    assert info["channels"] == expected_order
    expected = feature_grid(act, channels=expected_order, cols=info["cols"], normalize="layer",
                            cmap="magma", tile_size=info["tile_size"])
    got = png(client.get("/api/grid.png", params=params))
    np.testing.assert_array_equal(got, np.asarray(expected))
    # Layer statistics by hand.
    values = act.numpy()
    assert info["stats"]["frac_zero"] == pytest.approx(float((values == 0).mean()))
    dead = [c for c in range(40) if values[c].max() <= 0]
    assert info["stats"]["dead_channels"] == dead


def test_grid_click_geometry_matches_image(client):
    params = {"image": CHELSEA, "layer": "_conv_head", "count": 30}
    info = client.get("/api/grid", params=params).json()
    image = png(client.get("/api/grid.png", params=params))
    pad, cols, rows = info["pad"], info["cols"], info["rows"]
    tile_w = (image.shape[1] - pad) / cols - pad
    tile_h = (image.shape[0] - pad) / rows - pad
    assert tile_w == int(tile_w)
    assert tile_h == int(tile_h)
    assert rows * cols >= 30 > (rows - 1) * cols


def test_channel_view_values(client, lite0_acts):
    act = lite0_acts["_blocks.1._expand_conv"]
    channel = 7
    info = client.get("/api/channel", params={"image": CHELSEA, "layer": "_blocks.1._expand_conv",
                                              "channel": channel}).json()
    values = act[channel].numpy().astype(np.float64)
    stats = info["stats"]
    assert stats["mean"] == pytest.approx(values.mean(), rel=1e-4, abs=1e-6)
    assert stats["std"] == pytest.approx(values.std(), rel=1e-4)
    assert stats["max"] == pytest.approx(values.max())
    assert stats["min"] == pytest.approx(values.min())
    assert stats["frac_positive"] == pytest.approx((values > 0).mean())
    assert stats["frac_zero"] == pytest.approx((values == 0).mean())
    means = act.flatten(1).mean(1).numpy()
    assert info["rank_by_mean"] == int((means > means[channel]).sum())
    assert info["conv"] is True
    assert info["map_size"] == [112, 112]
    big = png(client.get("/api/channel.png", params={
        "image": CHELSEA, "layer": "_blocks.1._expand_conv", "channel": channel, "size": 224}))
    expected = feature_grid(act, channels=[channel], pad=0, tile_size=224)
    np.testing.assert_array_equal(big, np.asarray(expected))
    assert big.shape == (224, 224, 3)


def test_filter_views_equal_filter_grid(client, lite0):
    weights = conv_filters(lite0.module, "_conv_stem")
    got = png(client.get("/api/filters.png", params={"layer": "_conv_stem", "tile": 24}))
    np.testing.assert_array_equal(got, np.asarray(filter_grid(weights, max_filters=64,
                                                              tile_size=24)))
    one = png(client.get("/api/filters.png", params={"layer": "_conv_stem", "channel": 3,
                                                     "tile": 24}))
    np.testing.assert_array_equal(one, np.asarray(filter_grid(weights[3:4], tile_size=48)))


def test_filter_count_is_honoured_beyond_the_default(client, lite0):
    """A layer with more filters (96) than the default count (64): count=80 draws 80."""
    weights = conv_filters(lite0.module, "_blocks.1._depthwise_conv")
    assert weights.shape[0] == 96
    params = {"layer": "_blocks.1._depthwise_conv", "tile": 8}
    got = png(client.get("/api/filters.png", params={**params, "count": 80}))
    np.testing.assert_array_equal(got, np.asarray(filter_grid(weights, max_filters=80,
                                                              tile_size=8)))
    default = png(client.get("/api/filters.png", params=params))
    np.testing.assert_array_equal(default, np.asarray(filter_grid(weights, max_filters=64,
                                                                  tile_size=8)))
    assert got.shape != default.shape
    every = png(client.get("/api/filters.png", params={**params, "count": 500}))
    np.testing.assert_array_equal(every, np.asarray(filter_grid(weights, max_filters=96,
                                                                tile_size=8)))


def test_switching_views_reuses_the_forward_pass(app, client, lite0_acts):
    """The first view captures only the shown layer (one pass); the first switch to another
    layer captures all of them (one more pass); later switches reuse it."""
    state = app.state.convscope
    image = "sample:rocket"
    before = state.forward_count
    client.get("/api/predict", params={"image": image, "layer": "_blocks.0"})
    assert state.forward_count == before + 1
    result = state.forwards.get(("efficientnet_lite0", image))
    assert list(result.acts) == ["_blocks.0"] and not result.complete
    key = ("efficientnet_lite0", image)
    first_bytes = state.forwards.size_of(key)
    assert first_bytes == result.acts["_blocks.0"].nelement() * 4 + result.x.nelement() * 4
    client.get("/api/grid.png", params={"image": image, "layer": "_blocks.0", "count": 8})
    client.get("/api/channel", params={"image": image, "layer": "_blocks.0", "channel": 1})
    assert state.forward_count == before + 1
    for layer in ("_blocks.5", "_conv_head", "_blocks.9._bn1", "_blocks.0"):
        assert client.get("/api/grid.png", params={"image": image, "layer": layer,
                                                   "count": 8}).status_code == 200
        client.get("/api/channel", params={"image": image, "layer": layer, "channel": 1})
    client.get("/api/input.png", params={"image": image})
    assert state.forward_count == before + 2
    assert result.complete and len(result.acts) > 100
    # A stale layer hint does not stop the predictions.
    stale = client.get("/api/predict", params={"image": "sample:astronaut", "layer": "nope"})
    assert stale.status_code == 200
    assert state.forwards.get(("efficientnet_lite0", "sample:astronaut")).acts == {}
    # The cache counts the grown entry's bytes.
    assert state.forwards.size_of(key) == sum(
        t.nelement() * t.element_size() for t in result.acts.values()) + first_bytes - \
        result.acts["_blocks.0"].nelement() * 4
    assert state.forwards.size_of(key) > 10 * first_bytes
    # The lazily captured layers are the layers' true outputs.
    chelsea = client.get("/api/grid", params={"image": CHELSEA, "layer": "_blocks.3"}).json()
    assert chelsea["total_channels"] == 40
    full = state.forwards.get(("efficientnet_lite0", CHELSEA))
    for name, expected in lite0_acts.items():
        torch.testing.assert_close(full.acts[name], expected, rtol=0, atol=0)


def test_concurrent_first_requests_compute_once(app, client):
    state = app.state.convscope
    before = state.forward_count
    statuses: list[int] = []

    def hit(i: int) -> None:
        layer = ["features.0", "features.2", "features.3"][i % 3]
        response = client.get("/api/grid.png", params={
            "model": "tiny", "image": "file:red.jpg", "layer": layer})
        statuses.append(response.status_code)

    threads = [threading.Thread(target=hit, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 12
    # One pass for whichever layer came first, one pass capturing all layers for the rest:
    # twelve concurrent requests never run more.
    assert state.forward_count == before + 2


def test_cache_is_bounded_lru(tiny_loaded):
    from fastapi.testclient import TestClient

    from convscope.server import Settings, create_app

    app = create_app(Settings(models={"tiny": tiny_loaded}, cache_entries=2))
    state = app.state.convscope
    with TestClient(app, base_url=LOCAL) as c:
        for image in ("sample:chelsea", "sample:coffee", "sample:chelsea", "sample:rocket"):
            assert c.get("/api/predict", params={"image": image}).status_code == 200
        assert state.forward_count == 3  # the second chelsea was a hit
        assert len(state.forwards) == 2
        assert ("tiny", "sample:coffee") not in state.forwards  # least recently used
        c.get("/api/predict", params={"image": "sample:coffee"})
        assert state.forward_count == 4


def test_upload_roundtrip(client, chelsea):
    buffer = io.BytesIO()
    chelsea.save(buffer, format="PNG")
    data = buffer.getvalue()
    response = client.post("/api/images", content=data, headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("upload:")
    assert (body["width"], body["height"]) == chelsea.size
    again = client.post("/api/images", content=data, headers={"Content-Type": "image/png"})
    assert again.json()["id"] == body["id"]
    uploaded = client.get("/api/predict", params={"image": body["id"]}).json()
    sample = client.get("/api/predict", params={"image": CHELSEA}).json()
    assert uploaded == sample  # PNG is lossless: same pixels, same predictions
    assert body["id"] in {row["id"] for row in client.get("/api/images").json()}


def test_served_file_is_read(client):
    image = png(client.get("/api/input.png", params={"model": "tiny", "image": "file:red.jpg"}))
    assert image.shape == (32, 32, 3)
    assert abs(int(image[..., 0].mean()) - 200) <= 3
    assert int(image[..., 1].mean()) < 45


@pytest.mark.parametrize(("params", "needle"), [
    ({"image": CHELSEA, "layer": "_blocks.3x"}, "_blocks.3"),
    ({"image": "sample:chelse", "layer": "_blocks.3"}, "sample:chelsea"),
    ({"image": CHELSEA, "layer": "_blocks.3", "model": "efficientnet_lite"},
     "efficientnet_lite0"),
])
def test_unknown_names_404_with_suggestions(client, params, needle):
    response = client.get("/api/grid", params=params)
    assert response.status_code == 404
    body = response.json()
    assert needle in body["suggestions"]
    assert "did you mean" in body["detail"]


def test_bad_channel_and_layer_kinds(client):
    response = client.get("/api/channel", params={"image": CHELSEA, "layer": "_blocks.3",
                                                  "channel": 40})
    assert response.status_code == 404
    assert "40 channels" in response.json()["detail"]
    flat = client.get("/api/grid.png", params={"image": CHELSEA, "layer": "_fc"})
    assert flat.status_code == 422
    assert "flat vector" in flat.json()["detail"]
    not_conv = client.get("/api/filters.png", params={"layer": "_blocks.3"})
    assert not_conv.status_code == 422
    assert "no weight" in not_conv.json()["detail"]
    bad_cmap = client.get("/api/grid.png", params={"image": CHELSEA, "layer": "_blocks.3",
                                                   "cmap": "virdis"})
    assert bad_cmap.status_code == 404
    assert "viridis" in bad_cmap.json()["suggestions"]


@pytest.mark.parametrize("image_id", [
    "file:../secret.png", "file:..%2Fsecret.png", "file:/etc/passwd", "../secret.png",
    "file:images/../secret.png", "upload:0000000000000000",
])
def test_image_names_cannot_escape(client, image_id):
    response = client.get("/api/input.png", params={"model": "tiny", "image": image_id})
    assert response.status_code == 404


def test_bad_uploads_get_clear_4xx(app, client, chelsea):
    not_image = client.post("/api/images", content=b"hello, I am text", headers=RAW)
    assert not_image.status_code == 415
    assert "not a readable image" in not_image.json()["detail"]
    buffer = io.BytesIO()
    chelsea.save(buffer, format="PNG")
    truncated = client.post("/api/images", content=buffer.getvalue()[:5000], headers=RAW)
    assert truncated.status_code == 415
    limit = app.state.convscope.settings.max_upload_bytes
    too_big = client.post("/api/images", content=b"\0" * (limit + 1), headers=RAW)
    assert too_big.status_code == 413
    assert "limit" in too_big.json()["detail"]
    empty = client.post("/api/images", content=b"", headers=RAW)
    assert empty.status_code == 400
    # The session still works after every failure.
    assert client.get("/api/predict", params={"image": CHELSEA}).status_code == 200


def test_streamed_upload_over_limit_and_pixel_limit(tiny_loaded):
    from fastapi.testclient import TestClient

    from convscope.server import Settings, create_app

    app = create_app(Settings(models={"tiny": tiny_loaded}, max_upload_bytes=1000,
                              max_pixels=100 * 100))

    def chunks():
        for _ in range(5):
            yield b"x" * 400

    big = Image.new("RGB", (101, 100), (1, 2, 3))
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    with TestClient(app, base_url=LOCAL) as c:
        streamed = c.post("/api/images", content=chunks(),  # no Content-Length: chunked
                          headers=RAW)
        assert streamed.status_code == 413
        pixels = c.post("/api/images", content=buffer.getvalue(), headers=RAW)
        assert pixels.status_code == 413
        assert "pixels" in pixels.json()["detail"]


def test_cam_overlay_is_the_library_overlay(client, lite0, chelsea):
    import convscope.methods.cam as cam_module  # convscope's own module: never skipped
    from convscope.render.overlay import overlay

    top = client.get("/api/predict", params={"image": CHELSEA}).json()
    assert "gradcam" in client.get("/api/cam/methods").json()
    first = png(client.get("/api/cam.png", params={"image": CHELSEA, "target": top[0]["index"]}))
    other = png(client.get("/api/cam.png", params={"image": CHELSEA, "target": 999}))
    x = lite0.preprocess(chelsea)
    heatmap = cam_module.cam(lite0, x, target=top[0]["index"])[0]
    display = Image.fromarray((lite0.transform.to_display(x[0]).permute(1, 2, 0).numpy() * 255
                               + 0.5).clip(0, 255).astype(np.uint8))
    expected = np.asarray(overlay(display, heatmap, alpha=0.5, cmap="jet").convert("RGB"))
    assert np.abs(first.astype(int) - expected.astype(int)).max() <= 1
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 5  # another class, another map
    assert client.get("/api/cam.png", params={"image": CHELSEA, "method": "nope"}).status_code == 404
    assert client.get("/api/cam.png", params={"image": CHELSEA, "target": 5000}).status_code == 422


def test_docs_and_index(client):
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "/api/grid.png" in schema["paths"]
    page = client.get("/")
    assert page.status_code == 200
    assert "app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    reference = client.get("/api")
    assert reference.status_code == 200
    assert "GET /api/grid.png" in reference.text
    assert "<code>channel</code> (required)" in reference.text
    assert "http" not in reference.text.replace("href='/openapi.json'", "")
    # Path traversal is tested with raw paths against a live server in test_security.py
    # (the test client would normalise "/static/../state.py" before sending it).


def test_load_image_used_for_files(image_dir):
    # The served file is the one on disk (sanity for the fixture itself).
    assert load_image(image_dir / "red.jpg").size == (64, 48)


def test_served_model_is_left_as_it_was(app, client, lite0):
    """After forward passes, CAMs and failures, no hook is left on the model and its flags
    and parameters are as they were."""
    module = lite0.module
    flags = [p.requires_grad for p in module.parameters()]
    client.get("/api/predict", params={"image": "sample:astronaut"})
    client.get("/api/cam.png", params={"image": "sample:astronaut", "method": "gradcam"})
    client.get("/api/cam.png", params={"image": "sample:astronaut", "layer": "_fc"})
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                for m in module.modules())
    assert hooks == 0
    assert not any(m.training for m in module.modules())
    assert [p.requires_grad for p in module.parameters()] == flags
    assert all(p.grad is None for p in module.parameters())
    entry = app.state.convscope.models["efficientnet_lite0"]
    assert entry._executor is not None  # forward passes ran on the model's own thread


def test_one_filter_of_a_wide_conv_is_conv_filters_slice(client, lite0):
    """One output channel's kernel is sliced from the parameter (not a copy of the whole
    kernel): the same picture as conv_filters(...)[c:c + 1]."""
    layer, channel = "_blocks.15._expand_conv", 5
    weights = conv_filters(lite0.module, layer)
    got = png(client.get("/api/filters.png", params={"layer": layer, "channel": channel}))
    expected = filter_grid(weights[channel:channel + 1], mode="channels", max_channels=64,
                           cols=16, tile_size=24)
    np.testing.assert_array_equal(got, np.asarray(expected))
    missing = client.get("/api/filters.png", params={"layer": layer, "channel": 5000})
    assert missing.status_code == 404 and "1152 filters" in missing.json()["detail"]


def test_switch_json_is_what_fastapi_would_send(app, client):
    """/api/grid and /api/channel answer their own JSON (no second pass through FastAPI's
    response validation): the same document FastAPI's encoder makes, typed JSON."""
    from fastapi.encoders import jsonable_encoder

    from convscope.server.views import GridParams, channel_view, grid_view

    state = app.state.convscope
    params = {"image": CHELSEA, "layer": "_blocks.3", "sort": "mean", "count": 12}
    answer = client.get("/api/grid", params=params)
    assert answer.headers["content-type"] == "application/json"
    expected = grid_view(state, "efficientnet_lite0", CHELSEA, "_blocks.3",
                         GridParams(sort="mean", count=12))
    assert answer.json() == jsonable_encoder(expected)
    answer = client.get("/api/channel", params={"image": CHELSEA, "layer": "_blocks.3",
                                                "channel": 2})
    assert answer.json() == jsonable_encoder(
        channel_view(state, "efficientnet_lite0", CHELSEA, "_blocks.3", 2))
