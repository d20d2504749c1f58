"""conv_filters reads a model's effective conv weights or a state_dict; errors name the valid
conv layers."""

from __future__ import annotations

import pytest
import torch

from convscope import conv_filters
from convscope.errors import NotAConvLayerError, UnknownLayerError


def test_filters_equal_state_dict_entry(vgg16):
    expected = vgg16.state_dict()["features.0.weight"]
    for name in ("features.0", "features.0.weight"):
        weights = conv_filters(vgg16, name)
        torch.testing.assert_close(weights, expected)
        assert weights.data_ptr() != expected.data_ptr()  # a copy: safe to modify
    from_state = conv_filters(vgg16.state_dict(), "features.28")
    assert from_state.shape == (512, 512, 3, 3)


def test_not_a_conv_and_unknown_names(vgg16, resnet18):
    with pytest.raises(NotAConvLayerError, match="Linear"):
        conv_filters(vgg16, "classifier.0")
    with pytest.raises(NotAConvLayerError, match="no weight of its own"):
        conv_filters(vgg16, "features.1")
    with pytest.raises(UnknownLayerError) as info:
        conv_filters(resnet18, "layer1.0.conv")
    assert "layer1.0.conv1" in info.value.suggestions
    with pytest.raises(TypeError):
        conv_filters([1, 2], "x")


def test_parametrized_conv_gives_the_weight_its_forward_uses():
    """Weight norm keeps only ``original0/1`` in the state_dict: the filters are the
    computed kernel, the one that reproduces the conv's output."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(),
                                weight_norm(torch.nn.Conv2d(6, 4, 3)))
    with torch.no_grad():  # make the norm differ from the direction's own norm
        model[2].parametrizations.weight.original0.mul_(3.0)
    assert "2.weight" not in model.state_dict()
    x = torch.randn(2, 3, 9, 7)
    weights = conv_filters(model, "2")
    with torch.no_grad():
        hidden = model[1](model[0](x))
        expected = torch.nn.functional.conv2d(hidden, weights, model[2].bias)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
    assert conv_filters(model, "2.weight").equal(weights)
    assert not weights.requires_grad and weights.grad_fn is None
    with pytest.raises(UnknownLayerError):
        conv_filters(model, "3")
    with pytest.raises(NotAConvLayerError, match="ReLU"):
        conv_filters(model, "1")
