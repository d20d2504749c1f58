"""Explorer fixtures: one app per session over the pretrained Lite0 and a tiny model."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("fastapi")
with warnings.catch_warnings():
    # Starlette's test client announces a future switch of HTTP library; not our concern.
    warnings.simplefilter("ignore")
    import fastapi.testclient  # noqa: F401


#: A Host the explorer answers when bound to loopback (TestClient sends "testserver").
LOCAL = "http://localhost"


class SmallNet(nn.Module):
    """conv(3->6) -> ReLU -> conv(6->4, stride 2) -> ReLU -> pool -> fc(4->5)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
            nn.Conv2d(6, 4, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@pytest.fixture(scope="session")
def tiny_loaded():
    """SmallNet (random fixed weights) as a LoadedModel at 32x32 input: fast forward passes."""
    from convscope.models import Preprocess, load_model

    torch.manual_seed(0)
    loaded = load_model(SmallNet().eval(), device="cpu")
    loaded.transform = Preprocess(resize=32, crop=32)
    return loaded


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    """A folder offered with --image: two images and a file outside it that must stay private."""
    root = tmp_path_factory.mktemp("served")
    folder = root / "images"
    folder.mkdir()
    from convscope.images import load_image

    load_image("sample:coffee").resize((200, 150)).save(folder / "coffee.png")
    Image.new("RGB", (64, 48), (200, 30, 30)).save(folder / "red.jpg")
    (root / "secret.png").write_bytes(b"not for you")
    return folder


@pytest.fixture(scope="session")
def app(lite0, tiny_loaded, image_dir):
    from convscope.server import Settings, create_app

    settings = Settings(models={"efficientnet_lite0": lite0, "tiny": tiny_loaded},
                        images=[image_dir], cache_entries=4)
    return create_app(settings)


@pytest.fixture(scope="session")
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app, base_url=LOCAL) as test_client:
        yield test_client
