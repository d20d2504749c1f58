"""``channel_summary``: the channel page's data, checked against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from convscope.featvis import ObjectiveError, channel_summary, visualize


def _net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=6),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    ).eval()


def test_weights_image_and_visualisation_parts():
    model = _net()
    torch.manual_seed(0)
    x = torch.rand(1, 3, 40, 40)
    summary = channel_summary(model, "1", 2, image=x, steps=3, size=32)
    assert (summary.layer, summary.channel, summary.channels) == ("1", 2, 4)
    # The BatchNorm's channel comes from the first conv: an RGB filter.
    assert summary.weights["kind"] == "filter" and summary.weights["conv"] == "0"
    torch.testing.assert_close(summary.weights["filter"], model[0].weight[2])
    # Incoming-weight summary of a later conv: L2 norm of the kernel per input channel.
    later = channel_summary(model, "3", 5, visualization=False)
    norms = model[3].weight[5].detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(later.weights["norms"], norms)
    assert later.weights["top"][0] == (int(norms.argmax()), pytest.approx(float(norms.max())))
    depthwise = channel_summary(model, "5", 1, visualization=False)
    assert depthwise.weights["kind"] == "depthwise"
    torch.testing.assert_close(depthwise.weights["filter"], model[5].weight[1, 0])
    # Where it fires on the image: the BN output (before the in-place-free ReLU) at 40 px.
    with torch.no_grad():
        expected = model[1](model[0](x))[0, 2]
    torch.testing.assert_close(summary.activation, expected)
    assert summary.heatmap.shape == (40, 40)
    assert float(summary.heatmap.min()) == 0 and float(summary.heatmap.max()) == pytest.approx(1)
    assert summary.overlay.size == (40, 40)
    assert summary.image_stats["max"] == pytest.approx(float(expected.max()), rel=1e-5)
    assert summary.image_stats["frac_positive"] == pytest.approx(float((expected > 0).float().mean()))
    # The visualisation is the channel's own, and the same as visualize() gives.
    direct = visualize(model, "1:2", steps=3, size=32, progress=False)
    torch.testing.assert_close(summary.visualization.images, direct.images)
    assert summary.as_dict()["visualization"]["objective"] == "1:2"
    # A ready visualisation is reused, not recomputed.
    cached = channel_summary(model, "1", 2, visualization=direct)
    assert cached.visualization is direct


def test_atlas_part_reads_the_atlas(tmp_path):
    from convscope.atlas import build

    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    model = _net()
    atlas = build(model, tmp_path, ["3"], topk=3, html=False, crops=False)
    summary = channel_summary(model, "3", 4, atlas=atlas, visualization=False)
    index, value, _ = atlas.topk("3")
    assert [e["index"] for e in summary.examples] == index[4].tolist()
    assert [e["value"] for e in summary.examples] == pytest.approx(value[4].tolist())
    assert summary.examples[0]["image"] == atlas.images[int(index[4, 0])]
    stats = atlas.stats("3")
    assert summary.dataset_stats["sparsity"] == pytest.approx(1 - float(stats["frac_positive"][4]))
    assert summary.dataset_stats["dead"] == float(stats["dead"][4])
    assert summary.crops == "crops/3/4.jpg"


def test_channel_out_of_range_and_unknown_layer():
    with pytest.raises(ObjectiveError, match="channel 4 is out of range for layer '1'"):
        channel_summary(_net(), "1", 4, visualization=False)
    from convscope.errors import UnknownLayerError

    with pytest.raises(UnknownLayerError):
        channel_summary(_net(), "12", 0, visualization=False)
