"""Layer resolution and the layer table (shapes, parameters, receptive fields)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convscope.errors import UnknownLayerError
from convscope.layers import list_layers, overview_layers, resolve_layers


def test_resolve_every_selector_kind(tiny_net):
    conv0 = tiny_net.features[0]
    assert list(resolve_layers(tiny_net, "features.0")) == ["features.0"]
    assert list(resolve_layers(tiny_net, "features.0.weight")) == ["features.0"]
    assert list(resolve_layers(tiny_net, "features.*")) == [f"features.{i}" for i in range(5)]
    assert list(resolve_layers(tiny_net, nn.Conv2d)) == ["features.0", "features.3"]
    assert resolve_layers(tiny_net, conv0) == {"features.0": conv0}
    assert list(resolve_layers(tiny_net.features, 0)) == ["0"]
    assert list(resolve_layers(tiny_net, ["fc", nn.ReLU, "features.0"])) == [
        "features.0", "features.1", "features.4", "fc"]
    assert len(resolve_layers(tiny_net, "all")) == 8


def test_unknown_names_raise_with_suggestions(resnet18):
    with pytest.raises(UnknownLayerError) as info:
        resolve_layers(resnet18, "layer4.1.conv3")
    assert "layer4.1.conv2" in info.value.suggestions
    assert "layer4.1.conv1" in info.value.suggestions
    with pytest.raises(UnknownLayerError, match="conv"):
        resolve_layers(resnet18, "conv")  # substring matches are offered too
    with pytest.raises(UnknownLayerError, match="no module of this type"):
        resolve_layers(resnet18, nn.LSTM)
    with pytest.raises(UnknownLayerError, match="not part of the model"):
        resolve_layers(resnet18, nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError):
        resolve_layers(resnet18, 3.5)
    with pytest.raises(ValueError, match="empty"):
        resolve_layers(resnet18, [])


def test_table_rows_of_tiny_net(tiny_net):
    rows = {row.name: row for row in list_layers(tiny_net, (3, 8, 8))}
    assert rows["features.0"].output_shape == (4, 8, 8)
    assert rows["features.0"].params == 4 * 3 * 3 * 3 + 4
    assert rows["features.2"].output_shape == (4, 4, 4)
    assert rows["features.3"].params == 2 * 4 * 9 + 2
    assert rows["fc"].output_shape == (3,)
    assert rows["fc"].receptive_field is None
    assert rows["features"].params == sum(p.numel() for p in tiny_net.features.parameters())
    # Receptive fields worked out by hand: 3x3 conv (pad 1) -> 3 px, stride 1, centred at 0;
    # 2x2 max pool -> 4 px, stride 2, centred at 0.5; 3x3 conv -> 4 + 2*2 = 8 px.
    conv0 = rows["features.0"].receptive_field
    assert (conv0.size, conv0.stride, conv0.start) == ((3, 3), (1, 1), (0.0, 0.0))
    pool = rows["features.2"].receptive_field
    assert (pool.size, pool.stride, pool.start) == ((4, 4), (2, 2), (0.5, 0.5))
    conv3 = rows["features.3"].receptive_field
    assert (conv3.size, conv3.stride, conv3.start) == ((8, 8), (2, 2), (0.5, 0.5))
    assert rows["features.4"].receptive_field == conv3
    assert conv3.box(0, 0, 8, 8) == (0, 0, 5, 5)
    assert conv3.box(3, 3, 8, 8) == (3, 3, 8, 8)
    out_rows, out_cols = [[0, 3], [1, 2]], [[0, 3], [2, 1]]
    vectorised = conv3.boxes(out_rows, out_cols, 8, 8)
    for i in range(2):
        for j in range(2):
            assert tuple(vectorised[i][j]) == conv3.box(out_rows[i][j], out_cols[i][j], 8, 8)
    assert rows["features.0"].as_dict()["receptive_field"]["size"] == [3, 3]


def test_vgg16_receptive_fields_match_published_values(vgg16):
    rows = {row.name: row for row in list_layers(vgg16)}
    # Araujo, Norris & Sim, "Computing receptive fields of CNNs" (Distill 2019): VGG16
    # conv5_3 (features.28) sees 196 px with stride 16; pool5 212 px with stride 32.
    assert rows["features.28"].receptive_field.size == (196, 196)
    assert rows["features.28"].receptive_field.stride == (16, 16)
    assert rows["features.30"].receptive_field.size == (212, 212)
    assert rows["features.30"].receptive_field.stride == (32, 32)
    assert rows["features.28"].output_shape == (512, 14, 14)


def _support_box(model: nn.Module, size: int, row: int, col: int) -> tuple[int, int, int, int]:
    """Input pixels that influence output (row, col), found by back-propagation."""
    x = torch.ones(1, 1, size, size, requires_grad=True)
    model(x)[0, 0, row, col].backward()
    rows, cols = torch.nonzero(x.grad[0, 0], as_tuple=True)
    return (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)


def test_receptive_field_equals_gradient_support():
    """Independent check: with positive weights and average pooling every input pixel in
    the theoretical field has a non-zero gradient, and none outside it does."""
    net = nn.Sequential(
        nn.Conv2d(1, 1, 3, padding=1), nn.AvgPool2d(2), nn.Conv2d(1, 1, 5, stride=2, padding=2),
        nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(1, 1, 3, dilation=2, stride=1),
    )
    for conv in net:
        if isinstance(conv, nn.Conv2d):
            nn.init.constant_(conv.weight, 1.0)
            nn.init.zeros_(conv.bias)
    size = 40
    rf = list_layers(net, (1, size, size))[-1].receptive_field
    out_hw = net(torch.zeros(1, 1, size, size)).shape[-2:]
    assert rf.box(2, 3, size, size) == _support_box(net, size, 2, 3)
    assert rf.box(1, 1, size, size) == _support_box(net, size, 1, 1)
    # At the border some taps fall on padding: the true support is inside the box.
    for row, col in [(0, 0), (out_hw[0] - 1, out_hw[1] - 1)]:
        top, left, bottom, right = rf.box(row, col, size, size)
        s_top, s_left, s_bottom, s_right = _support_box(net, size, row, col)
        assert top <= s_top and left <= s_left and s_bottom <= bottom and s_right <= right


def test_same_padding_offsets_in_pretrained_lite0(lite0):
    """TF-style 'same' padding pads right/bottom only at stride 2: output (0, 0) of the
    stem sees input rows/cols 0..2, the last output (111) sees 222, 223 and the padding."""
    rows = {row.name: row for row in list_layers(lite0.module)}
    stem = rows["_conv_stem"].receptive_field
    assert stem.box(0, 0, 224, 224) == (0, 0, 3, 3)
    assert stem.box(111, 111, 224, 224) == (222, 222, 224, 224)
    assert rows["_conv_head"].receptive_field.stride == (32, 32)
    assert rows["_swish"].calls == 2
    assert rows["_swish"].call_fields[0] == stem
    assert rows["_fc"].output_shape == (1000,)


def test_overview_layers_follow_execution_order(vgg16, lite0):
    picked = overview_layers(vgg16, torch.zeros(1, 3, 64, 64))
    assert picked["first_conv"].name == "features.0"
    assert picked["first_activation"].name == "features.1"
    assert picked["last_conv"].name == "features.28"
    assert picked["middle_conv"].name == "features.14"
    picked = overview_layers(lite0.module, torch.zeros(1, 3, 224, 224))
    assert picked["first_conv"].name == "_conv_stem"
    assert (picked["first_activation"].name, picked["first_activation"].call) == ("_swish", 0)
    assert picked["last_conv"].name == "_conv_head"


def test_layer_table_is_a_list_and_a_notebook_table(resnet18):
    from convscope.layers import list_layers

    table = list_layers(resnet18, (3, 64, 48))
    assert isinstance(table, list) and len(table) == len(list(resnet18.named_modules())) - 1
    rows = {row.name: row for row in table}
    page = table._repr_html_()
    assert page.count("<tr>") == len(table) + 1
    rf = rows["layer4"].receptive_field
    assert "<code>layer4</code></td><td>Sequential</td><td>512×2×2</td>" in page
    assert f"<td>{rf.size[0]}×{rf.size[1]}</td><td>32×32</td>" in page
    assert f"{rows['fc'].params:,}" in page
