"""capture(): values equal independent references, hooks never leak, structure is kept."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from convscope import LayerActivations, capture
from convscope.errors import UnknownLayerError


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _without_inplace(model: nn.Module) -> nn.Module:
    """A copy whose in-place activations write new tensors (the independent reference)."""
    clone = copy.deepcopy(model)
    for module in clone.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    return clone


@pytest.fixture(scope="module")
def image_batch() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 224, 224)


def test_vgg16_conv_outputs_match_feature_extractor_without_inplace(vgg16, image_batch):
    layers = ["features.0", "features.14", "features.28", "features.29", "classifier.0"]
    reference = create_feature_extractor(_without_inplace(vgg16), return_nodes=layers)
    with torch.no_grad():
        expected = reference(image_batch)
        with capture(vgg16, layers) as acts:
            vgg16(image_batch)
    for name in layers:
        torch.testing.assert_close(acts[name], expected[name], rtol=0, atol=0)
    # The stock model's in-place ReLU overwrote its conv output: a naive hook is wrong.
    assert acts["features.28"].min() < 0
    # (the extractor only runs the ReLU when a later node is requested too)
    naive = create_feature_extractor(vgg16, return_nodes=["features.28", "features.30"])
    with torch.no_grad():
        post_relu = naive(image_batch)["features.28"]
    assert (acts["features.28"] - post_relu).abs().max() > 0.1


def test_inplace_relu_case_on_tiny_model(tiny_net):
    x = torch.randn(1, 3, 8, 8)
    conv = tiny_net.features[0]
    with torch.no_grad():
        expected = nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
        with capture(tiny_net, "features.0") as acts:
            tiny_net(x)
    torch.testing.assert_close(acts["features.0"], expected)
    assert (expected < 0).any()


def test_resnet18_layers_including_residual_inplace_add(resnet18, image_batch):
    layers = ["conv1", "layer1.0.conv2", "layer3", "layer4.1.conv2", "avgpool", "fc"]
    reference = create_feature_extractor(_without_inplace(resnet18), return_nodes=layers)
    with torch.no_grad():
        expected = reference(image_batch)
        with capture(resnet18, [*layers, "layer1.0.bn2", "layer1.0"]) as acts:
            resnet18(image_batch)
        for name in layers:
            torch.testing.assert_close(acts[name], expected[name])
        # BasicBlock does `out = bn2(out); out += identity`: bn2's output is rewritten in
        # place. The capture must hold the pre-add value, computed here by hand.
        block = resnet18.layer1[0]
        block_input = resnet18.maxpool(resnet18.relu(resnet18.bn1(resnet18.conv1(image_batch))))
        bn2 = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(block_input)))))
        torch.testing.assert_close(acts["layer1.0.bn2"], bn2)
        torch.testing.assert_close(acts["layer1.0"], torch.relu(bn2 + block_input))


def test_pretrained_lite0_matches_manual_forward(lite0, chelsea):
    model = lite0.module
    x = lite0.preprocess(chelsea)
    with torch.no_grad():
        with capture(model, ["_conv_stem", "_bn0", "_blocks.3", "_conv_head", "_swish"]) as acts:
            model(x)
        stem = model._conv_stem(x)
        bn0 = model._bn0(stem)
        h = model._swish(bn0)
        for index, block in enumerate(model._blocks):
            h = block(h)
            if index == 3:
                block3 = h.clone()
        head = model._conv_head(h)
        swish_head = model._swish(model._bn1(head))
    torch.testing.assert_close(acts["_conv_stem"], stem)
    torch.testing.assert_close(acts["_bn0"], bn0)
    torch.testing.assert_close(acts["_blocks.3"], block3)
    torch.testing.assert_close(acts["_conv_head"], head)
    # `_swish` (one ReLU6 module) runs twice per forward: stem and head.
    calls = acts.calls("_swish")
    assert len(calls) == 2
    torch.testing.assert_close(calls[0], torch.clamp(bn0, 0, 6))
    torch.testing.assert_close(acts["_swish"], swish_head)


def test_hooks_removed_after_normal_exit_and_exception(vgg16, tiny_net):
    before = _hook_count(vgg16)
    with torch.no_grad(), capture(vgg16, "all") as acts:
        vgg16(torch.randn(1, 3, 64, 64))
    assert _hook_count(vgg16) == before == 0
    assert len(acts) == len(list(vgg16.named_modules())) - 1

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom), capture(tiny_net, [nn.Conv2d, "fc"]):
        assert _hook_count(tiny_net) >= 3
        raise Boom
    assert _hook_count(tiny_net) == 0
    # A forward that itself raises (wrong input size) also leaves nothing behind.
    with pytest.raises(RuntimeError), capture(tiny_net, "all"):
        tiny_net(torch.randn(1, 5, 8, 8))
    assert _hook_count(tiny_net) == 0


def test_training_flags_untouched(tiny_net):
    tiny_net.train()
    tiny_net.features[1].eval()
    flags = [m.training for m in tiny_net.modules()]
    with capture(tiny_net, "all"):
        tiny_net(torch.randn(2, 3, 8, 8))
    assert [m.training for m in tiny_net.modules()] == flags


def test_selection_by_glob_type_object_and_mix(vgg16):
    with capture(vgg16, ["features.2?", nn.MaxPool2d, vgg16.classifier[0], "avgpool"]) as acts:
        pass
    expected = {f"features.{i}" for i in range(20, 31)} | {
        "features.4", "features.9", "features.16", "features.23", "features.30",
        "classifier.0", "avgpool",
    }
    assert set(acts.names) == expected
    assert acts.names == sorted(acts.names, key=[n for n, _ in vgg16.named_modules()].index)


def test_unknown_layer_suggests_close_names(vgg16):
    with pytest.raises(UnknownLayerError) as info, capture(vgg16, "feature.28"):
        pass
    assert "features.28" in str(info.value)
    assert "list_layers" in str(info.value)
    assert isinstance(info.value, ValueError)
    assert _hook_count(vgg16) == 0
    with pytest.raises(UnknownLayerError, match="matched no layer"):
        resolve = capture(vgg16, "layer4.*")
        resolve.__enter__()


def test_structured_outputs_and_repeated_calls():
    class Pair(nn.Module):
        def forward(self, x):
            return x * 2, {"neg": -x}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()
            self.act = nn.ReLU()

        def forward(self, x):
            doubled, extra = self.pair(x)
            return self.act(self.act(doubled) - 1) + extra["neg"]

    net = Net()
    x = torch.tensor([[1.0, -2.0, 0.25]])
    with capture(net, ["pair", "act"]) as acts:
        net(x)
    doubled, extra = acts["pair"]
    torch.testing.assert_close(doubled, x * 2)
    torch.testing.assert_close(extra["neg"], -x)
    first, second = acts.calls("act")
    torch.testing.assert_close(first, torch.tensor([[2.0, 0.0, 0.5]]))
    torch.testing.assert_close(second, torch.tensor([[1.0, 0.0, 0.0]]))
    assert acts["act"] is not first
    with pytest.raises(KeyError, match="did you mean 'pair'"):
        acts["pairs"]


def test_only_requested_layers_held_and_fp16_halves_memory(vgg16):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), capture(vgg16, "features.*") as full:
        vgg16(x)
    with torch.no_grad(), capture(vgg16, "features.*", dtype=torch.float16) as half:
        vgg16(x)
    assert set(full) == {f"features.{i}" for i in range(31)}
    assert half.nbytes() * 2 == full.nbytes()
    assert half["features.0"].dtype == torch.float16
    torch.testing.assert_close(half["features.0"].float(), full["features.0"], atol=2e-3, rtol=1e-3)
    assert all(value.device.type == "cpu" for value in full.values())
    full.clear()
    assert full.nbytes() == 0


def test_captured_tensors_are_detached():
    net = nn.Sequential(nn.Linear(3, 2), nn.Tanh())
    with capture(net, "0") as acts:
        net(torch.randn(4, 3)).sum().backward()
    assert not acts["0"].requires_grad
    assert net[0].weight.grad is not None


def test_seed_layer_activations_workflow(vgg16):
    """The tutorial's code path, OCR errors fixed."""
    img = torch.randn(1, 3, 224, 224)
    conv_out = LayerActivations(vgg16.features, 0)
    with torch.no_grad():
        o = vgg16(img)
    conv_out.remove()
    act = conv_out.features
    assert o.shape == (1, 1000)
    conv = vgg16.features[0]
    expected = nn.functional.conv2d(img, conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(act, expected)
    assert act.min() < 0  # the conv output, not the post-ReLU tensor
    assert _hook_count(vgg16) == 0
    conv_out.remove()  # removing twice is harmless
    by_name = LayerActivations(vgg16, "features.28")
    with torch.no_grad():
        vgg16(img)
    by_name.remove()
    assert by_name.features.shape == (1, 512, 14, 14)


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5, inplace=True)  # F.dropout(x, p, training, True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.drop(self.fc(x)))


def test_copy_on_write_sees_positional_inplace_and_caller_writes():
    torch.manual_seed(0)
    net = _Linear().train()
    x = torch.randn(64, 4)
    expected_fc = net.fc(x).detach()
    with capture(net, ["fc", "head"]) as acts:
        out = net(x)
        out.sigmoid_()  # the caller rewrites the model output inside the block
    torch.testing.assert_close(acts["fc"], expected_fc)  # pre-dropout values
    assert (acts["head"] < 0).any()  # pre-sigmoid values
    with capture(net.eval(), "head") as acts:
        out = net(x)
    stored = acts["head"].clone()
    out.mul_(0)  # after the block: the stored value was detached from `out` at exit
    torch.testing.assert_close(acts["head"], stored)


def test_copy_modes_agree_and_unseen_writes_are_reported(vgg16):
    from convscope.hooks import CaptureIntegrityError

    x = torch.randn(1, 3, 64, 64)
    results = {}
    for mode in ("auto", True):
        with torch.no_grad(), capture(vgg16, ["features.0", "features.1"], copy=mode) as acts:
            vgg16(x)
        results[mode] = acts
    for name in ("features.0", "features.1"):
        torch.testing.assert_close(results["auto"][name], results[True][name], rtol=0, atol=0)
    # copy=False never copies; the conv output that the in-place ReLU rewrote is refused
    # when read, never returned with post-ReLU values; the untouched ReLU output reads fine.
    with torch.no_grad(), capture(vgg16, ["features.0", "features.1"], copy=False) as raw:
        vgg16(x)
    with pytest.raises(CaptureIntegrityError, match=r"features\.0"):
        raw["features.0"]
    torch.testing.assert_close(raw["features.1"], results[True]["features.1"], rtol=0, atol=0)
    with pytest.raises(CaptureIntegrityError):
        dict(raw.items())

    net = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(CaptureIntegrityError, match="copy=True"), capture(net, "0") as acts:
        out = net(torch.randn(2, 3))
        with torch._C.DisableTorchFunction():  # a write capture cannot see
            out.add_(1)
    assert _hook_count(net) == 0


def test_copy_on_write_copies_only_what_is_written(vgg16, resnet18, monkeypatch):
    """The conv outputs that an in-place ReLU rewrites (VGG) are copied just before the
    write; outputs nobody writes (ResNet's convs) are kept without a copy; the model's
    own result is bit-identical either way."""
    from convscope import hooks

    commits = []
    original = hooks._Pending.commit
    monkeypatch.setattr(hooks._Pending, "commit",
                        lambda self, *a: (commits.append(self.name), original(self, *a))[1])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected_out = vgg16(x)
        conv = vgg16.features[0]
        expected_conv = nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
        with capture(vgg16, [nn.Conv2d, "features.1"]) as acts:
            out = vgg16(x)
    assert sorted(commits) == sorted(n for n, m in vgg16.named_modules()
                                     if isinstance(m, nn.Conv2d))
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    torch.testing.assert_close(acts["features.0"], expected_conv, rtol=0, atol=0)
    torch.testing.assert_close(acts["features.1"], expected_conv.clamp_min(0), rtol=0, atol=0)
    assert _hook_count(vgg16) == 0

    commits.clear()
    with torch.no_grad():
        block = resnet18.layer1[0]
        with capture(resnet18, [nn.Conv2d, "layer1.0.bn1", "layer1.0.bn2"]) as acts:
            resnet18(x)
        block_input = resnet18.maxpool(resnet18.relu(resnet18.bn1(resnet18.conv1(x))))
        expected_bn1 = block.bn1(block.conv1(block_input))
    # bn1 is rewritten by the block's ReLU(inplace), bn2 by `out += identity`.
    assert sorted(commits) == ["layer1.0.bn1", "layer1.0.bn2"]
    torch.testing.assert_close(acts["layer1.0.bn1"], expected_bn1, rtol=0, atol=0)


def test_maps_reads_conv_tokens_and_refuses_flat_outputs(resnet18):
    """acts.maps(): conv outputs without a copy; a ViT block's tokens (register tokens,
    non-square input) equal timm's own NCHW intermediates; a flat output is refused."""
    timm = pytest.importorskip("timm")
    from convscope.spatial import NoSpatialMapError

    x = torch.randn(2, 3, 48, 32)
    with torch.no_grad(), capture(resnet18, ["layer1", "fc"]) as acts:
        resnet18(x)
    assert acts.input_hw == (48, 32) and acts.batch_size == 2
    maps = acts.maps("layer1")
    assert maps.data_ptr() == acts["layer1"].data_ptr() and maps.shape == (2, 64, 12, 8)
    with pytest.raises(NoSpatialMapError, match="fc"):
        acts.maps("fc")

    vit = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, depth=2,
                            reg_tokens=4, dynamic_img_size=True).eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad(), capture(vit, "blocks.1") as acts:
        vit(x)
        expected = vit.forward_intermediates(x, indices=[1], output_fmt="NCHW",
                                             intermediates_only=True)[0]
    assert acts["blocks.1"].shape == (2, 1 + 4 + 12, 384)
    torch.testing.assert_close(acts.maps("blocks.1"), expected, rtol=0, atol=0)


def test_notebook_html_shows_each_layer_grid_or_shape(tiny_net):
    import base64
    import io
    import re

    from PIL import Image

    with torch.no_grad(), capture(tiny_net, ["features.0", "fc"]) as acts:
        tiny_net(torch.randn(1, 3, 8, 8))
    page = acts._repr_html_()
    assert "<code>features.0</code>" in page and "(1, 4, 8, 8)" in page
    assert "<code>fc</code>" in page and "no spatial map" in page
    (data,) = re.findall(r'base64,([^"]+)"', page)
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    assert image.size == (1 + 2 * 33, 1 + 2 * 33)  # 4 channels as 2x2 tiles of 32 px


def test_a_layer_that_never_ran_says_so_and_names_torch_compile():
    """A selected layer that recorded nothing raises on read; when the forward ran through a
    torch.compile graph compiled before capture (which skips hooks added later), the
    message says so instead of claiming the layer did not run."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad(), capture(net, ["0", "2"]) as acts:
        net[0](x)
    assert acts["0"].shape == (1, 4, 6, 6)
    with pytest.raises(KeyError, match="did not run in the forward pass"):
        acts["2"]
    compiled = torch.compile(net, backend="eager")
    with torch.no_grad():
        compiled(x)  # compiled here, before the hooks exist
        with capture(compiled, "_orig_mod.0") as acts:
            compiled(x)
    with pytest.raises(KeyError, match=r"torch\.compile graph compiled before"):
        acts["_orig_mod.0"]
