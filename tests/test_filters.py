"""conv_filters reads the state_dict; errors name the valid conv layers."""

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
