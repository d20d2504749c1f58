"""Atlas examples in the explorer (``convscope serve --atlas DIR``)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

#: A Host the explorer answers when bound to loopback (TestClient sends "testserver").
LOCAL = "http://localhost"


@pytest.fixture(scope="module")
def atlas_dir(tiny_loaded, image_dir, tmp_path_factory):
    from convscope.atlas import build
    from convscope.images import load_image

    data = tmp_path_factory.mktemp("atlas-data")
    for name in ("chelsea", "coffee", "rocket"):
        load_image(f"sample:{name}").save(data / f"{name}.png")
    out = tmp_path_factory.mktemp("atlas") / "out"
    build(tiny_loaded, str(data), ["features.0", "features.2"], topk=2, out=out, html=False,
          crop_size=16)
    return out


@pytest.fixture(scope="module")
def atlas_client(tiny_loaded, atlas_dir):
    from fastapi.testclient import TestClient

    from convscope.server import Settings, create_app

    app = create_app(Settings(models={"tiny": tiny_loaded}, atlas=atlas_dir))
    with TestClient(app, base_url=LOCAL) as client:
        yield client


def test_channel_view_carries_the_atlas(atlas_client, atlas_dir):
    from convscope.atlas import Atlas

    atlas = Atlas.load(atlas_dir)
    index, value, _ = atlas.topk("features.2")
    info = atlas_client.get("/api/channel", params={"image": "sample:chelsea",
                                                    "layer": "features.2", "channel": 3}).json()
    shown = info["atlas"]
    assert shown["available"] is True
    assert [row["value"] for row in shown["topk"]] == pytest.approx(value[3].tolist())
    names = [atlas.images[i].rsplit("/", 1)[-1] for i in index[3]]
    assert [row["image"] for row in shown["topk"]] == names
    assert shown["stats"]["max"] == pytest.approx(float(atlas.stats("features.2")["max"][3]))
    assert shown["crops"] is True
    # The layer's dead count over the dataset, next to "inactive on this image".
    dead = atlas.stats("features.2")["dead"]
    assert shown["layer_dead_count"] == int(sum(bool(v) for v in dead))
    assert info["inactive"] == (info["stats"]["max"] <= 0)
    crops = atlas_client.get("/api/atlas/crops.jpg", params={"layer": "features.2",
                                                             "channel": 3})
    assert crops.status_code == 200
    picture = np.asarray(Image.open(io.BytesIO(crops.content)))
    assert picture.shape[:2] == (16, 32)  # k=2 crops of 16 px side by side


def test_atlas_requests_stay_inside(atlas_client):
    not_recorded = atlas_client.get("/api/channel", params={
        "image": "sample:chelsea", "layer": "features.3", "channel": 0}).json()
    assert not_recorded["atlas"]["available"] is False
    for layer in ("../features.2", "features.2/../../x", "features.3"):
        response = atlas_client.get("/api/atlas/crops.jpg", params={"layer": layer,
                                                                    "channel": 0})
        assert response.status_code == 404
    assert atlas_client.get("/api/atlas/crops.jpg", params={"layer": "features.2",
                                                            "channel": 99}).status_code == 404
