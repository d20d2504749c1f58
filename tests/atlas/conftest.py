"""A small image dataset made on the fly and a tiny importable model factory.

The dataset is ImageFolder-style: ``photos/`` holds crops and flips of the scikit-image
photos, ``patterns/`` synthetic images (checkerboard, gradient, stripes, a bright square,
a flat grey), one exact duplicate of the bright square (a top example of many
channels, so ties really happen) and bad files (truncated PNG, text named
.jpg, a README without an image extension).
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FACTORY = '''
import torch
from torch import nn


def build():
    """conv(3->4, 5x5, stride 4) -> ReLU -> maxpool -> conv(4->6) -> ReLU -> pool -> fc(5)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 5, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    ).eval()
'''


def _photos() -> list[np.ndarray]:
    from skimage import data

    out = []
    for name in ("chelsea", "coffee", "rocket", "astronaut"):
        image = getattr(data, name)()
        h, w = image.shape[:2]
        out.append(image[: h // 2, : w // 2])
        out.append(image[h // 3:, w // 4:][:, ::-1])  # crop + horizontal flip
        out.append(image[::-1, ::2])  # vertical flip, squeezed
    return out


def _patterns() -> list[np.ndarray]:
    yy, xx = np.mgrid[0:96, 0:96]
    checker = (((yy // 12) + (xx // 12)) % 2 * 255).astype(np.uint8)
    gradient = (xx * 255 // 95).astype(np.uint8)
    stripes = ((yy // 6) % 2 * 255).astype(np.uint8)
    square = np.zeros((96, 96, 3), np.uint8)
    square[30:60, 50:80] = (255, 40, 10)
    grey = np.full((96, 96), 128, np.uint8)
    return [np.stack([checker] * 3, -1), np.stack([gradient, 255 - gradient, gradient], -1),
            np.stack([stripes] * 3, -1), square, np.stack([grey] * 3, -1)]


def make_dataset(root: Path) -> Path:
    """Write the dataset under ``root`` and return it."""
    photos, patterns = root / "photos", root / "patterns"
    photos.mkdir(parents=True)
    patterns.mkdir()
    for i, image in enumerate(_photos()):
        pil = Image.fromarray(np.ascontiguousarray(image))
        pil.thumbnail((120, 120))
        pil.save(photos / f"p{i:02d}.png")
    for i, image in enumerate(_patterns()):
        Image.fromarray(image).save(patterns / f"s{i:02d}.png")
    (patterns / "s99_duplicate.png").write_bytes((patterns / "s03.png").read_bytes())
    good = (photos / "p00.png").read_bytes()
    (patterns / "broken.png").write_bytes(good[: len(good) // 3])
    (patterns / "fake.jpg").write_text("this is not a JPEG")
    (photos / "README.txt").write_text("not an image")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dataset folder (18 readable images, 2 unreadable, 1 non-image file)."""
    return make_dataset(tmp_path_factory.mktemp("atlas-data") / "data")


@pytest.fixture(scope="session")
def factory_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``tinyatlas.py`` (``tinyatlas:build``) for ``--model`` in CLI runs."""
    folder = tmp_path_factory.mktemp("atlas-factory")
    (folder / "tinyatlas.py").write_text(textwrap.dedent(FACTORY))
    return folder


@pytest.fixture
def tiny_factory(factory_dir: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """``"tinyatlas:build"``, importable in this process."""
    monkeypatch.syspath_prepend(str(factory_dir))
    sys.modules.pop("tinyatlas", None)
    return "tinyatlas:build"


@pytest.fixture
def tiny_loaded(tiny_factory: str):
    """The tiny factory model as a LoadedModel with a small (48 -> 40 px) preprocessing."""
    import dataclasses

    from convscope.models import Preprocess, load_model

    loaded = load_model(tiny_factory, device="cpu")
    return dataclasses.replace(loaded, transform=Preprocess(resize=48, crop=40))
