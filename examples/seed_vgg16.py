"""The seed tutorial ("understanding how a CNN learns") on VGG16, with convscope.

Reproduces the tutorial's code path: a forward hook through ``LayerActivations`` on
``vgg.features``, the first 30 channels of several layers, and the first conv layer's
filters read from ``state_dict()``. Uses torchvision's pretrained VGG16 when its weights are
available (internet or a filled torch hub cache) and random weights otherwise, and says so.

    python examples/seed_vgg16.py [--out seed-out] [--image sample:chelsea]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torchvision import models

import convscope
from convscope import LayerActivations


def load_vgg16() -> tuple[torch.nn.Module, str]:
    """Pretrained VGG16 if its weights can be had, else random init (reported)."""
    try:
        return models.vgg16(weights=models.VGG16_Weights.IMAGENET1K_V1), "pretrained (ImageNet)"
    except Exception as error:
        print(f"pretrained VGG16 weights unavailable ({type(error).__name__}); "
              "using RANDOM weights: the pictures show structure, not learned features")
        return models.vgg16(weights=None), "random weights"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="seed-out")
    parser.add_argument("--image", default="sample:chelsea")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    vgg, weights = load_vgg16()
    vgg = vgg.to(device).eval()
    preprocess = convscope.models.Preprocess()  # ImageNet resize/crop/normalise
    img = preprocess(convscope.load_image(args.image)).unsqueeze(0)

    # The tutorial's workflow, as written (OCR errors fixed): hook, run, remove, read.
    for layer_num, title in [(0, "first conv"), (1, "after the first ReLU"),
                             (10, "fifth conv"), (28, "last conv")]:
        conv_out = LayerActivations(vgg.features, layer_num)
        with torch.no_grad():
            o = vgg(img.to(device))
        conv_out.remove()
        act = conv_out.features
        path = out / f"features.{layer_num}.png"
        convscope.feature_grid(act[0], channels=30, cols=5, labels=True, tile_size=112).save(path)
        print(f"{title:22s} features.{layer_num:<3d} {tuple(act.shape)} -> {path}")

    # The tutorial's weights: vgg.state_dict()['features.0.weight'].
    cnn_weights = vgg.state_dict()["features.0.weight"].cpu()
    path = out / "filters.features.0.png"
    convscope.filter_grid(cnn_weights, tile_size=48, cols=8).save(path)
    print(f"first-layer filters    {tuple(cnn_weights.shape)} -> {path}")
    top = torch.softmax(o, 1)[0].topk(3)
    labels = convscope.models.imagenet_classes()
    print(f"VGG16 ({weights}) top-3:",
          ", ".join(f"{labels[int(i)]} {float(p):.1%}" for p, i in zip(top.values, top.indices)))


if __name__ == "__main__":
    main()
