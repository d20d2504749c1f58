"""The explorer on a vision transformer: token layers are drawn through the one spatial
reading (acts.maps), listed as drawable, and the random weights are said."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

LOCAL = "http://localhost"
timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def vit_app():
    from fastapi.testclient import TestClient

    from convscope import load_model
    from convscope.server import Settings, create_app

    torch.manual_seed(0)
    loaded = load_model("timm:vit_tiny_patch16_224", model_kwargs={"img_size": 64, "depth": 2})
    app = create_app(Settings(models={"vit": loaded}))
    with TestClient(app, base_url=LOCAL) as client:
        yield loaded, client


def test_token_layers_are_drawable_and_drawn_as_patch_maps(vit_app):
    from convscope import capture
    from convscope.render.grid import feature_grid

    loaded, client = vit_app
    rows = {row["name"]: row for row in client.get("/api/layers").json()}
    assert rows["blocks.1"]["spatial"] is True  # (17, 192) tokens: a 4x4 patch grid
    assert rows["head"]["spatial"] is False
    params = {"image": "sample:coffee", "layer": "blocks.1", "count": 8, "cols": 4}
    layout = client.get("/api/grid", params=params).json()
    response = client.get("/api/grid.png", params=params)
    assert response.status_code == 200, response.text
    got = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
    x = loaded.preprocess("sample:coffee")
    with torch.no_grad(), capture(loaded.module, "blocks.1") as acts:
        loaded.module(x)
    maps = acts.maps("blocks.1")[0]
    assert maps.shape == (192, 4, 4)
    expected = feature_grid(maps, channels=layout["channels"], cols=layout["cols"],
                            pad=layout["pad"], tile_size=layout["tile_size"])
    assert np.abs(got.astype(int) - np.asarray(expected).astype(int)).max() <= 1
    flat = client.get("/api/grid.png", params={**params, "layer": "head"})
    assert flat.status_code == 422 or flat.status_code == 400
    assert "spatial" in flat.text or "map" in flat.text


def test_gradcam_on_the_vit_uses_its_last_norm1(vit_app):
    _, client = vit_app
    response = client.get("/api/cam.png", params={"image": "sample:coffee", "target": 1})
    assert response.status_code == 200, response.text
