"""Shared fixtures: tiny hand-built models and real networks (built once per session)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

torch.set_num_threads(max(1, torch.get_num_threads()))


class TinyNet(nn.Module):
    """conv(3->4, 3x3) -> ReLU(inplace) -> maxpool -> conv(4->2) -> ReLU -> pool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 2, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture(scope="session")
def vgg16() -> nn.Module:
    """VGG16 with fixed random weights (no download), eval mode. Do not modify it."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.vgg16().eval()


@pytest.fixture(scope="session")
def resnet18() -> nn.Module:
    """ResNet18 with fixed random weights, eval mode. Do not modify it."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


@pytest.fixture(scope="session")
def lite0():
    """The bundled ImageNet-pretrained EfficientNet-Lite0 as a LoadedModel. Do not modify it."""
    from convscope.models import load_model

    return load_model("efficientnet_lite0", device="cpu")


@pytest.fixture(scope="session")
def chelsea():
    """scikit-image's cat photo as a PIL RGB image."""
    from convscope.images import load_image

    return load_image("sample:chelsea")
