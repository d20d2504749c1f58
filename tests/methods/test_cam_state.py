"""The caller's model and input are left exactly as they were; bad input gets clear errors."""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
from torch import nn

from convscope.errors import TargetError, UnknownClassError, UnknownLayerError
from convscope.methods.cam import cam, guided_gradcam
from convscope.methods.common import InputError
from convscope.methods.gradients import saliency
from convscope.methods.targets import AttributionError, LayerOutputError


def hook_counts(model: nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
            for m in model.modules()]


def snapshot(model: nn.Module) -> dict:
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "hooks": hook_counts(model),
    }


def assert_same(before: dict, model: nn.Module) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["hooks"] == before["hooks"]
    for a, b in zip(after["grad"], before["grad"], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


class BNNet(nn.Module):
    """conv -> BatchNorm -> ReLU(inplace) -> conv -> ReLU -> pool -> fc, with one shared
    activation module called twice (``act``)."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv1(x)))
        x = self.act(self.conv2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class SeparateNet(BNNet):
    """Same weights as BNNet, but the two activations are distinct modules."""

    def __init__(self, source: BNNet) -> None:
        super().__init__()
        self.load_state_dict(source.state_dict())
        self.act1 = nn.ReLU(inplace=True)
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn(self.conv1(x)))
        x = self.act2(self.conv2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture
def bnnet() -> BNNet:
    torch.manual_seed(0)
    net = BNNet()
    with torch.no_grad():  # non-trivial running statistics
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 12, 10)


ALL = ["gradcam", "gradcam++", "xgradcam", "layercam", "scorecam", "fasterscorecam",
       "ablationcam", "eigencam", "guided_gradcam"]


@pytest.mark.parametrize("method", ALL)
def test_model_and_input_untouched(bnnet, x, method):
    bnnet.conv2.weight.requires_grad_(False)  # mixed flags must come back exactly
    bnnet.fc.weight.grad = torch.full_like(bnnet.fc.weight, 7.0)  # an existing .grad stays
    before, x_before = snapshot(bnnet), x.clone()
    maps = cam(bnnet, x, layer="conv2", method=method)
    assert maps.shape == (3, 12, 10)
    assert float(maps.min()) >= 0.0
    assert float(maps.max()) <= 1.0
    assert_same(before, bnnet)
    assert torch.equal(x, x_before)
    assert x.grad is None


def test_guided_gradcam_and_saliency_leave_model_untouched(bnnet, x):
    before = snapshot(bnnet)
    guided_gradcam(bnnet, x, layer="conv2")
    for method in ("vanilla", "smoothgrad", "integrated_gradients", "guided_backprop",
                   "occlusion"):
        saliency(bnnet, x, 1, method=method, samples=3, steps=4, window=4, stride=4)
    assert_same(before, bnnet)


@pytest.mark.parametrize("bad", [
    dict(layer="fc"),  # raises inside the forward hook: no spatial output
    dict(layer="conv2", target=99),  # raises after the forward pass
    dict(layer="conv2", target="cat"),  # no class names
    dict(layer="act", call=5),  # the module runs twice
])
def test_failing_calls_leave_nothing_behind(bnnet, x, bad):
    bnnet.train()  # also the training flags come back after a failure
    before = snapshot(bnnet)
    with pytest.raises((LayerOutputError, TargetError)), pytest.warns(UserWarning, match="training mode"):
        cam(bnnet, x, **bad)
    assert_same(before, bnnet)


def test_training_mode_warns_computes_in_eval_and_restores(bnnet, x):
    expected = cam(bnnet, x, layer="conv2")
    bnnet.train()
    before = snapshot(bnnet)
    with pytest.warns(UserWarning, match="training mode"):
        maps = cam(bnnet, x, layer="conv2")
    torch.testing.assert_close(maps, expected)  # BatchNorm used its running statistics
    assert_same(before, bnnet)  # running statistics not updated, flags back to train


def test_shared_module_call_selects_the_right_call(bnnet, x):
    separate = SeparateNet(bnnet).eval()
    first = cam(bnnet, x, layer="act", call=0)
    last = cam(bnnet, x, layer="act")
    torch.testing.assert_close(first, cam(separate, x, layer="act1"))
    torch.testing.assert_close(last, cam(separate, x, layer="act2"))
    torch.testing.assert_close(cam(bnnet, x, layer="act", call=-2), first)
    assert not torch.allclose(first, last)
    # Ablation-CAM ablates only the chosen call
    torch.testing.assert_close(cam(bnnet, x, layer="act", call=0, method="ablationcam"),
                               cam(separate, x, layer="act1", method="ablationcam"))


def test_errors_are_clear(bnnet, x, lite0):
    with pytest.raises(TargetError, match="out of range: the model has 4 classes"):
        cam(bnnet, x, layer="conv2", target=4)
    with pytest.raises(TargetError, match="2 targets were given for a batch of 3"):
        cam(bnnet, x, layer="conv2", target=[0, 1])
    with pytest.raises(UnknownLayerError, match="conv2"):
        cam(bnnet, x, layer="conv3")
    with pytest.raises(LayerOutputError, match="not an \\(N, C, H, W\\) feature map"):
        cam(bnnet, x, layer="fc")
    with pytest.raises(InputError, match="cannot carry gradients"):
        cam(bnnet, (x * 100).to(torch.uint8), layer="conv2")
    with pytest.raises(UnknownClassError, match="tiger cat") as info:
        cam(lite0, torch.zeros(1, 3, 64, 64), layer="_blocks.15", target="tiger kat")
    assert "tiger cat" in info.value.suggestions
    with pytest.raises(ValueError, match="gradcam"):
        cam(bnnet, x, layer="conv2", method="gradcamm")


def test_nan_gradient_is_reported(bnnet, x):
    x = x.clone()
    x[1, 0, 3, 3] = float("nan")
    with pytest.raises(AttributionError, match=r"NaN or inf for sample\(s\) \[1\]"):
        cam(bnnet, x, layer="conv2", target=0)
    # a NaN weight after the layer makes the gradient itself NaN
    broken = copy.deepcopy(bnnet)
    with torch.no_grad():
        broken.fc.weight[0, 0] = float("nan")
    with pytest.raises(AttributionError, match=r"gradient of the target w\.r\.t\. layer 'conv2'"):
        cam(broken, x[:1].nan_to_num(), layer="conv2", target=0)
    with pytest.raises(AttributionError, match="NaN"):
        saliency(bnnet, x, 0)


class TupleNet(BNNet):
    def forward(self, x):  # type: ignore[override]
        logits = super().forward(x)
        return {"aux": logits * 0 + 1, "logits": logits}


class PairNet(BNNet):
    def forward(self, x):  # type: ignore[override]
        logits = super().forward(x)
        return (logits, -logits)


def test_dict_and_tuple_outputs(bnnet, x):
    expected = cam(bnnet, x, layer="conv2", target=2)
    as_dict = TupleNet()
    as_dict.load_state_dict(bnnet.state_dict())
    as_dict.eval()
    torch.testing.assert_close(cam(as_dict, x, layer="conv2", target=2), expected)
    as_pair = PairNet()
    as_pair.load_state_dict(bnnet.state_dict())
    as_pair.eval()
    torch.testing.assert_close(cam(as_pair, x, layer="conv2", target=2), expected)
    # output= picks the second element: -logits, whose Grad-CAM is the negated weights
    flipped = cam(as_pair, x, layer="conv2", target=lambda o: -o[:, 2], output=1)
    torch.testing.assert_close(flipped, expected)


def test_grayscale_non_square_batch_split(x):
    torch.manual_seed(2)
    net = BNNet(in_channels=1).eval()
    gray = torch.randn(5, 1, 9, 17)
    whole = cam(net, gray, layer="conv2", target=[0, 1, 2, 3, 0])
    split = cam(net, gray, layer="conv2", target=[0, 1, 2, 3, 0], batch_size=2)
    assert whole.shape == (5, 9, 17)
    torch.testing.assert_close(whole, split)
    # one sample alone gives the same map as inside the batch (eval mode: independent)
    torch.testing.assert_close(cam(net, gray[3:4], layer="conv2", target=3)[0], whole[3])


@pytest.mark.slow
def test_memory_flat_over_many_calls(bnnet, x):
    def live_tensors() -> int:
        gc.collect()
        with warnings.catch_warnings():  # isinstance on deprecated torch aliases warns
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    for _ in range(5):
        cam(bnnet, x, layer="conv2")
    base = live_tensors()
    for i in range(500):  # the issue: no growth over 500 consecutive calls
        cam(bnnet, x, layer="act", method="gradcam++" if i % 2 else "gradcam")
    assert live_tensors() <= base
    assert sum(hook_counts(bnnet)) == 0


def test_parameters_get_no_gradient_and_graph_starts_at_layer(bnnet, x):
    """Only target -> layer is differentiated: layers before it record no graph."""
    seen = []
    bnnet.conv1.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    try:
        cam(bnnet, x, layer="conv2")
    finally:
        bnnet.conv1._forward_hooks.clear()
    assert seen == [False]
    assert all(p.grad is None for p in bnnet.parameters())


def test_deepcopy_not_needed_for_vgg_fixture(vgg16):
    """The session VGG16 is explained in place and stays bit-identical."""
    before = copy.deepcopy(snapshot(vgg16))
    cam(vgg16, torch.randn(1, 3, 32, 32), layer="features.28")
    assert_same(before, vgg16)


def test_progress_reports_every_batch_and_raising_cancels(bnnet, x):
    """Score-/Ablation-CAM and sanity report progress; a callback that raises cancels the
    work and the model keeps no hook."""
    from convscope import sanity_check

    seen: list[tuple[str, int, int | None]] = []
    channels = dict(bnnet.named_modules())["conv2"].out_channels
    assert channels >= x.shape[0]  # one part of the batch, x.shape[0] masked passes
    cam(bnnet, x, layer="conv2", method="scorecam", batch_size=channels,
        progress=lambda *a: seen.append(a))
    assert seen == [("score-cam: masked passes", done, 3) for done in range(4)]
    seen.clear()
    cam(bnnet, x, layer="conv2", method="scorecam", batch_size=2,  # two parts of the batch
        progress=lambda *a: seen.append(a))
    first = -(-2 * channels // 2)
    assert seen[0] == ("score-cam: masked passes (samples 1-2 of 3)", 0, first)
    assert seen[first] == ("score-cam: masked passes (samples 1-2 of 3)", first, first)
    assert seen[-1][0] == "score-cam: masked passes (samples 3-3 of 3)"
    seen.clear()
    sanity_check(bnnet, x, method="gradcam", layer="conv2", steps=3,
                 progress=lambda *a: seen.append(a))
    assert [s[1] for s in seen] == [0, 1, 2, 3] and seen[0][0] == "sanity: randomisation steps"

    class Cancelled(Exception):
        pass

    def cancel(_phase: str, done: int, _total: int | None) -> None:
        if done == 1:
            raise Cancelled

    with pytest.raises(Cancelled):
        cam(bnnet, x, layer="conv2", method="ablationcam", batch_size=1, progress=cancel)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in bnnet.modules())
