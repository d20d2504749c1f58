"""Feature visualisation: objectives rise, values match an independent forward pass,
results are deterministic whatever the batching, the caller's model is untouched, and bad
input gives one clear error. Tiny models, 32-64 px, a few steps."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from convscope.errors import UnknownClassError, UnknownLayerError
from convscope.featvis import (
    NoSpatialReadingError,
    ObjectiveError,
    OptimizationError,
    Visualization,
    channel,
    class_logit,
    direction,
    diversity,
    neuron,
    visualize,
)
from convscope.featvis.objectives import Context

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _net() -> nn.Module:
    """conv(3->6) -> ReLU(inplace) -> conv(6->5) -> ReLU -> pool -> fc(5->4); fixed weights."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(6, 5, 3, padding=1, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4),
    ).eval()


def _norm(images: torch.Tensor) -> torch.Tensor:
    return (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _vis(model, objectives, **kwargs) -> Visualization:
    settings = {"steps": 12, "size": 32, "progress": False, "transform": (MEAN, STD)}
    return visualize(model, objectives, **{**settings, **kwargs})


def test_channel_objective_rises_and_value_matches_an_independent_forward():
    model = _net()
    vis = _vis(model, ["0:2", "2:1"], steps=25)
    assert vis.images.shape == (2, 3, 32, 32)
    assert vis.names == ["0:2", "2:1"]
    assert float(vis.images.min()) >= 0 and float(vis.images.max()) <= 1
    # Independent: normalise by hand, run the modules directly. "0" is followed by an
    # in-place ReLU: the objective reads the conv output, negative values included.
    x = _norm(vis.images)
    with torch.no_grad():
        conv0 = model[0](x)
        conv1 = model[2](torch.relu(conv0))
    expected = torch.stack([conv0[0, 2].mean(), conv1[1, 1].mean()])
    torch.testing.assert_close(vis.values, expected, rtol=1e-4, atol=1e-5)
    # The objective rose: the final values beat the first step's, and the start image's.
    start = _vis(model, ["0:2", "2:1"], steps=1, lr=1e-12)
    assert (vis.values > start.values + 0.05).all(), (vis.values, start.values)
    assert (vis.history[-5:].mean(0) > vis.history[:3].mean(0)).all()


def test_normalisation_is_applied_inside():
    """The same image scores differently with and without the transform; the value with the
    transform is the model's output on the normalised image."""
    model = _net()
    vis = _vis(model, "class:3", steps=8)
    with torch.no_grad():
        logits = model(_norm(vis.images))
        raw = model(vis.images)
    torch.testing.assert_close(vis.values, logits[:, 3], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits[:, 3], raw[:, 3], atol=1e-3)
    # During optimisation too: the same run on a model with the normalisation built in
    # (and no transform) makes the same image.
    built_in = nn.Sequential(_Normalize(), model).eval()
    same = visualize(built_in, "class:3", steps=8, size=32, progress=False)
    torch.testing.assert_close(same.images, vis.images, rtol=0, atol=1e-4)


class _Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _norm(x)


def test_unit_and_range_and_star_objectives_expand_per_channel():
    model = _net()
    vis = _vis(model, ["0:1-3", "2:*", "0:4@5,7", "0:*"], steps=2)
    names = vis.names
    assert names[:3] == ["0:1", "0:2", "0:3"]
    assert names[3:8] == [f"2:{c}" for c in range(5)]
    assert names[8] == "0:4@5,7"
    assert len(names) == 3 + 5 + 1 + 6
    with torch.no_grad():
        conv0 = model[0](_norm(vis.images[8:9]))
    torch.testing.assert_close(vis.values[8], conv0[0, 4, 5, 7], rtol=1e-4, atol=1e-5)


def test_sums_weights_and_directions_match_hand_computation():
    model = _net()
    vector = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    objectives = [channel("0", 1) - 0.5 * channel("2", 3), 2 * neuron("0", 0),
                  direction("2", vector)]
    vis = _vis(model, objectives, steps=3)
    assert vis.names[0] == "0:1 - 0.5*2:3"
    x = _norm(vis.images)
    with torch.no_grad():
        c0 = model[0](x)
        c1 = model[2](torch.relu(c0))
    expected = torch.stack([
        c0[0, 1].mean() - 0.5 * c1[0, 3].mean(),
        2 * c0[1, 0, 16, 16],
        (c1[2] * (vector / vector.norm()).view(5, 1, 1)).sum(0).mean(),
    ])
    torch.testing.assert_close(vis.values, expected, rtol=1e-4, atol=1e-5)


def test_diversity_is_minus_the_mean_cosine_of_gram_matrices():
    torch.manual_seed(0)
    maps = torch.randn(3, 4, 5, 5)
    value = diversity("x")(Context({"x": maps}, None))
    grams = [m.flatten(1) @ m.flatten(1).T for m in maps]
    cos = torch.nn.functional.cosine_similarity
    expected = torch.stack([
        -torch.stack([cos(grams[i].flatten(), grams[j].flatten(), dim=0)
                      for j in range(3) if j != i]).mean() for i in range(3)])
    torch.testing.assert_close(value, expected)
    # Several images of one objective: the diversity term keeps them apart.
    model = _net()
    objective = channel("2", 1) + 0.5 * diversity("0")
    vis = _vis(model, objective, images_per_objective=3, steps=4)
    assert vis.images.shape[0] == 3 and len(set(vis.names)) == 1
    assert (vis.images[0] - vis.images[1]).abs().mean() > 1e-3


def test_deterministic_for_a_seed_whatever_the_batch_size():
    model = _net()
    specs = ["0:0", "2:1", "class:2"]
    one = _vis(model, specs, seed=7)
    again = _vis(model, specs, seed=7)
    split = _vis(model, specs, seed=7, batch_size=1)
    other = _vis(model, specs, seed=8)
    assert torch.equal(one.images, again.images)
    torch.testing.assert_close(split.images, one.images, rtol=0, atol=1e-5)
    assert (other.images - one.images).abs().max() > 1e-3
    # Each image is independent of the others: the first objective alone comes out as in
    # the batch (its seed depends on its position and the seed only).
    alone = _vis(model, ["0:0"], seed=7)
    torch.testing.assert_close(alone.images[0], one.images[0], rtol=0, atol=1e-5)
    for param in ("maco", "pixel"):
        a, b = _vis(model, specs, param=param, steps=3), _vis(model, specs, param=param, steps=3)
        assert torch.equal(a.images, b.images)


def test_the_callers_model_is_left_exactly_as_it_was():
    model = _net().train()
    model[2].weight.requires_grad_(False)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="training mode"):
        _vis(model, ["0:1", "class:1"], steps=3)
    assert all(m.training for m in model.modules())
    assert not model[2].weight.requires_grad and model[0].weight.requires_grad
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert model[2].bias.grad is None
    assert all(not m._forward_hooks for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_progress_callback_sees_every_step():
    seen: list[tuple[int, int]] = []
    _vis(_net(), ["0:0", "0:1", "0:2"], steps=4, batch_size=2,
         progress=lambda phase, done, total: seen.append((done, total)))
    assert seen == [(i, 8) for i in range(1, 9)]


def test_unknown_layer_suggests_close_names(tiny_net):
    with pytest.raises(UnknownLayerError, match=r"unknown layer 'features.O'; did you mean .*'features.0'"):
        _vis(tiny_net, "features.O:1")
    with pytest.raises(UnknownLayerError, match=r"did you mean 'features\.3'"):
        _vis(tiny_net, [channel("features.33", 0)])


def test_channel_out_of_range_names_the_layer_and_its_count():
    with pytest.raises(ObjectiveError, match=r"channel 6 is out of range for layer '0', which has 6"):
        _vis(_net(), "0:6")
    with pytest.raises(ObjectiveError, match="out of range"):
        _vis(_net(), "2:2-9")
    with pytest.raises(ObjectiveError, match=r"row 40 is outside"):
        _vis(_net(), "0:1@40,0")
    with pytest.raises(ObjectiveError, match="class 4 is out of range"):
        _vis(_net(), "class:4")
    with pytest.raises(ObjectiveError, match="cannot read"):
        _vis(_net(), "0:x")


def test_class_names_resolve_and_unknown_ones_suggest(lite0):
    with pytest.raises(UnknownClassError, match="Egyptian cat"):
        visualize(lite0, "class:egyptian kat", steps=1, size=32, progress=False)
    vis = visualize(lite0, ["class:Egyptian cat", class_logit(285)], steps=2, size=48,
                    progress=False)
    assert vis.names == ["class:Egyptian cat", "class:285"]
    with torch.no_grad():  # the bundled model's own normalisation (mean = std = 0.5)
        logits = lite0.module((vis.images - 0.5) / 0.5)
    torch.testing.assert_close(vis.values, logits[:, 285], rtol=1e-4, atol=1e-4)


class _Tokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, H*W, C) tokens


class _Sequence(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2)[:, :, :7]  # (N, C, 7): seven positions, no 2-D grid


def test_token_layers_are_read_as_their_patch_grid():
    """A transformer-style (N, T, D) output is read through convscope.spatial as maps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), _Tokens()).eval()
    model.num_prefix_tokens = 0  # as timm models say; without it the grid is ambiguous
    vis = visualize(model, ["1:2", "1:0@3,5"], steps=4, size=32, progress=False)
    with torch.no_grad():
        conv = model[0](vis.images)  # (N, 4, 8, 8): the same numbers as a grid
    torch.testing.assert_close(vis.values, torch.stack([conv[0, 2].mean(), conv[1, 0, 3, 5]]))


def test_layer_without_spatial_reading_is_refused_clearly():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _Sequence()).eval()
    with pytest.raises(NoSpatialReadingError, match=r"layer '1'.*\(1, 4, 7\).*spatial reading"):
        visualize(model, "1:0", steps=1, size=32, progress=False)


class _Explodes(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x - 2.0)  # NaN wherever the input is below 2


def test_nan_stops_and_names_the_objective():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), _Explodes()).eval()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.fill_(0.0)
    with pytest.raises(OptimizationError, match=r"objective '1:1'.*NaN"):
        visualize(model, ["1:1"], steps=3, size=16, progress=False)


class _Constant(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(x.shape[0], 2, 4, 4)


def test_objective_that_ignores_the_image_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), _Constant()).eval()
    with pytest.raises(OptimizationError, match=r"'1:1' do not depend on the image"):
        visualize(model, "1:1", steps=2, size=16, progress=False)


def test_save_writes_grid_pngs_values_and_index(tmp_path):
    vis = _vis(_net(), ["0:0", "class:1"], steps=2)
    folder = vis.save(tmp_path / "out")
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["000_0_0.png", "001_class_1.png", "grid.png", "index.html", "values.json"]
    values = json.loads((folder / "values.json").read_text())
    assert [r["objective"] for r in values["images"]] == ["0:0", "class:1"]
    assert values["images"][0]["value"] == pytest.approx(float(vis.values[0]))
    assert 'src="001_class_1.png"' in (folder / "index.html").read_text()
    grid = vis.grid(labels=False)
    assert grid.size == (2 + 2 * 34, 2 + 34)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert vis.image(1).size == (32, 32)


def test_channel_selections_and_objective_syntax():
    from convscope.featvis.objectives import expand_channels, parse_objective

    assert expand_channels("8-", 10, "x") == [8, 9]
    assert expand_channels("1,3-4,1", 10, "x") == [1, 3, 4]
    assert expand_channels("*", 3, "x") == [0, 1, 2]
    spec = parse_objective("layer4.0.conv1:7@c,3")
    assert (spec.layer, spec.channels, spec.y, spec.x, spec.unit) == ("layer4.0.conv1", "7", None, 3, True)
    assert parse_objective("class:Egyptian cat").channels == "Egyptian cat"
    for bad in ("layer4", "layer4:", "layer4:3@1", ":3"):
        with pytest.raises(ObjectiveError, match="cannot read"):
            parse_objective(bad)
