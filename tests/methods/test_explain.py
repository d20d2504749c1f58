"""explain(): cam()'s maps with what they explain, displayed in a notebook."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import convscope
from convscope.errors import ConvscopeError


@pytest.fixture(scope="module")
def lite0():
    return convscope.load_model("efficientnet_lite0")


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=7).eval()


@pytest.mark.slow
def test_topk_classes_maps_and_probabilities_match_cam_and_predict(lite0):
    x = lite0.preprocess("sample:coffee")
    explanation = convscope.explain(lite0, "sample:coffee", topk=3)
    top = lite0.predict(x, k=3)[0]
    assert explanation.targets == [p.index for p in top]
    assert explanation.labels == [p.label for p in top]
    assert explanation.probabilities == pytest.approx([p.probability for p in top], abs=1e-6)
    expected = convscope.cam(lite0, x.expand(3, -1, -1, -1), target=explanation.targets,
                             layer=explanation.layer)
    assert torch.equal(explanation.maps, expected)
    assert explanation.maps.shape == (3, 224, 224)
    # the display images undo the model's own normalisation (mean = std = 0.5)
    assert torch.allclose(explanation.images[0], (x[0] * 0.5 + 0.5).clamp(0, 1), atol=1e-6)


def test_named_target_and_reprs(lite0):
    explanation = convscope.explain(lite0, "sample:chelsea", target="tabby", method="layercam")
    assert explanation.targets == [281] and explanation.method == "layercam"
    assert "tabby" in repr(explanation) and explanation.layer in repr(explanation)
    page = explanation._repr_html_()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 1 and "tabby (" in page and "layercam at" in page
    picture = Image.open(io.BytesIO(base64.b64decode(images[0])))
    assert picture.size == (224, 224)
    # the notebook shows exactly the overlay of the map over the image
    assert np.array_equal(np.asarray(picture), np.asarray(explanation.overlay(0)))
    strip = Image.open(io.BytesIO(explanation._repr_png_()))
    assert strip.size == (224, 224)


def test_bare_module_with_several_images_and_min_max_display(resnet, tmp_path):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 96) * 3 + 1  # non-square, not in [0, 1]
    explanation = convscope.explain(resnet, x, target=[2, 5], layer="layer3")
    assert explanation.targets == [2, 5] and explanation.labels == ["class 2", "class 5"]
    assert torch.equal(explanation.maps, convscope.cam(resnet, x, target=[2, 5], layer="layer3"))
    assert explanation.images.shape == (2, 3, 64, 96)
    for image in explanation.images:
        assert image.min() == 0 and image.max() == 1
    with torch.no_grad():
        probabilities = torch.softmax(resnet(x), dim=1)
    assert explanation.probabilities == pytest.approx(
        [float(probabilities[0, 2]), float(probabilities[1, 5])], abs=1e-6)
    strip = Image.open(io.BytesIO(explanation._repr_png_()))
    assert strip.size == (2 * 96, 64)
    paths = explanation.save(tmp_path)
    assert [p.name for p in paths] == ["00_gradcam_2.png", "01_gradcam_5.png"]
    assert Image.open(paths[1]).size == (96, 64)


def test_default_target_is_each_images_top_class(resnet):
    torch.manual_seed(2)
    x = torch.randn(3, 3, 64, 64)
    explanation = convscope.explain(resnet, x)
    assert explanation.targets == resnet(x).argmax(dim=1).tolist()


def test_model_state_is_left_as_it_was(resnet):
    resnet.train()
    try:
        with pytest.warns(UserWarning, match="training mode"):
            convscope.explain(resnet, torch.randn(1, 3, 64, 64))
        assert resnet.training and all(m.training for m in resnet.modules())
        assert not resnet._forward_hooks and all(p.grad is None for p in resnet.parameters())
    finally:
        resnet.eval()


def test_mixed_training_flags_come_back_module_by_module(resnet):
    resnet.train()
    resnet.layer2.eval()  # a frozen stage: explain must not switch it back to training
    try:
        with pytest.warns(UserWarning, match="training mode"):
            convscope.explain(resnet, torch.randn(1, 3, 64, 64))
        assert resnet.training and not resnet.layer2.training
        assert not any(m.training for m in resnet.layer2.modules())
        assert resnet.layer3.training
    finally:
        resnet.eval()


@pytest.mark.parametrize(("call", "message"), [
    (lambda m: convscope.explain(m, torch.randn(2, 3, 64, 64), topk=2), "one image"),
    (lambda m: convscope.explain(m, torch.randn(1, 3, 64, 64), target="cat"), "no class names"),
    (lambda m: convscope.explain(m, torch.randn(2, 3, 64, 64), target=[1]), "one per image"),
    (lambda m: convscope.explain(m, torch.randn(1, 3, 64, 64), method="guided_gradcam"),
     "pixel attribution"),
    (lambda m: convscope.explain(m, torch.randn(1, 3, 64, 64), topk=0), "topk"),
])
def test_bad_input_is_refused_clearly(resnet, call, message):
    with pytest.raises((ConvscopeError, ValueError), match=message):
        call(resnet)
