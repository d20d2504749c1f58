"""Guided backpropagation on every ReLU-family activation, never silently the plain gradient.

Expected values are worked out by hand from the guided rule: the input gradient is the
activation's local derivative times the positive part of the gradient arriving at its
output (the slope for leaky rectifiers).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convscope.methods.cam import cam, guided_gradcam
from convscope.methods.gradients import heatmap, saliency
from convscope.methods.guided import GuidedBackpropError

# x = 0.8 (linear everywhere), -2 (negative), 7 (above ReLU6's cap), 0.5 (where the plain
# gradient is -4: guided backprop must stop it)
X = torch.tensor([[[[0.8, -2.0], [7.0, 0.5]]]])
W = torch.tensor([[2.0, 3.0, 0.5, -4.0], [1.0, 1.0, 1.0, 1.0]])
POSITIVE_W0 = W[0].clamp(min=0)  # what guided backprop lets through at the activation output


class ActNet(nn.Module):
    """logits = W @ act(x * 1): the input gradient is act'(x) * W[target]."""

    def __init__(self, act: nn.Module | Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.act = act
        self.fc = nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.act(x * 1.0), 1))


def _relu_ignoring_result(h: torch.Tensor) -> torch.Tensor:
    h.relu_()  # the return value is dropped: the graph still goes through the rectifier
    return h


def _clip_in_place(h: torch.Tensor) -> torch.Tensor:
    h.clip_(0, 6)
    return h


RELU, RELU6 = [1.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0]
KINDS = {  # name: (activation, its derivative at X, worked out by hand)
    "nn.ReLU": (lambda: nn.ReLU(), RELU),
    "nn.ReLU(inplace)": (lambda: nn.ReLU(inplace=True), RELU),
    "nn.ReLU6": (lambda: nn.ReLU6(), RELU6),
    "nn.ReLU6(inplace)": (lambda: nn.ReLU6(inplace=True), RELU6),
    "nn.LeakyReLU": (lambda: nn.LeakyReLU(0.1), [1.0, 0.1, 1.0, 1.0]),
    "nn.RReLU(eval)": (lambda: nn.RReLU(0.1, 0.3), [1.0, 0.2, 1.0, 1.0]),
    "nn.PReLU": (lambda: nn.PReLU(init=0.25), [1.0, 0.25, 1.0, 1.0]),
    "nn.Hardtanh": (lambda: nn.Hardtanh(-3.0, 3.0), [1.0, 1.0, 0.0, 1.0]),
    "nn.Threshold": (lambda: nn.Threshold(0.3, -1.0), RELU),
    "F.relu": (lambda: F.relu, RELU),
    "torch.relu": (lambda: torch.relu, RELU),
    "Tensor.relu": (lambda: torch.Tensor.relu, RELU),
    "Tensor.relu_ (result ignored)": (lambda: _relu_ignoring_result, RELU),
    "F.relu6": (lambda: F.relu6, RELU6),
    "F.leaky_relu": (lambda: lambda h: F.leaky_relu(h, 0.1, inplace=True), [1.0, 0.1, 1.0, 1.0]),
    "F.hardtanh": (lambda: lambda h: F.hardtanh(h, -3.0, 3.0), [1.0, 1.0, 0.0, 1.0]),
    "torch.clamp(min=0)": (lambda: lambda h: torch.clamp(h, min=0), RELU),
    "Tensor.clamp(0, 6)": (lambda: lambda h: h.clamp(0, 6), RELU6),
    "Tensor.clamp_min(0)": (lambda: lambda h: h.clamp_min(0), RELU),
    "Tensor.clip_(0, 6)": (lambda: _clip_in_place, RELU6),
}


def grid(values: list[float] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32).view(1, 1, 2, 2)


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_rectifier_gets_the_guided_rule(kind):
    make, derivative = KINDS[kind]
    net = ActNet(make()).eval()
    guided = saliency(net, X, 0, method="guided_backprop")
    torch.testing.assert_close(guided, grid(torch.tensor(derivative) * POSITIVE_W0))
    # the plain gradient differs (the -4 at x = 0.5 passes there): not silently vanilla
    torch.testing.assert_close(saliency(net, X, 0), grid(torch.tensor(derivative) * W[0]))


def test_other_activations_keep_their_gradient_next_to_a_rectifier():
    """ReLU and SiLU side by side: the ReLU branch is guided, SiLU's gradient is ordinary."""
    net = ActNet(lambda h: F.relu(h) + F.silu(h)).eval()
    s = torch.sigmoid(X.flatten())
    silu_derivative = s * (1 + X.flatten() * (1 - s))
    expected = torch.tensor(RELU) * POSITIVE_W0 + silu_derivative * W[0]
    torch.testing.assert_close(saliency(net, X, 0, method="guided_backprop"), grid(expected))


@pytest.mark.parametrize(("act", "named"), [
    (nn.SiLU(), "silu"),
    (nn.Sequential(nn.GELU(), nn.Hardswish()), "gelu"),
    (lambda h: torch.sigmoid(h.clamp(min=1e-3)), "sigmoid"),  # clamp(min=1e-3) is no ReLU
    (nn.Identity(), "activations found: none"),
])
def test_model_without_rectifiers_is_refused(act, named):
    net = ActNet(act).eval()
    with pytest.raises(GuidedBackpropError, match=named) as info:
        saliency(net, X, 0, method="guided_backprop")
    assert "vanilla" in str(info.value)
    if isinstance(act, nn.SiLU):
        assert "activation modules: SiLU" in str(info.value)
    with pytest.raises(GuidedBackpropError):
        guided_gradcam(nn.Sequential(nn.Conv2d(1, 2, 1), nn.SiLU(), nn.Flatten(),
                                     nn.Linear(8, 2)).eval(), X, layer="0", target=0)


def _relu_still_plain() -> bool:
    """True when no guided rule is left installed: a negative gradient passes F.relu."""
    leaf = torch.ones(3, requires_grad=True)
    (F.relu(leaf) * -1.0).sum().backward()
    return bool((leaf.grad == -1.0).all())


def test_caller_model_unchanged_and_nothing_left_installed():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                        nn.Conv2d(4, 4, 3), nn.PReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3)).eval()
    net[3].weight.requires_grad_(False)
    net[7].weight.grad = torch.full_like(net[7].weight, 5.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [p.requires_grad for p in net.parameters()]
    x = torch.randn(2, 3, 12, 12)
    saliency(net, x, [0, 2], method="guided_backprop", batch_size=1)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert [p.requires_grad for p in net.parameters()] == flags
    assert torch.equal(net[7].weight.grad, torch.full_like(net[7].weight, 5.0))
    assert all(p.grad is None for p in net.parameters() if p is not net[7].weight)
    assert all(not m._forward_hooks and not m._backward_hooks for m in net.modules())
    assert _relu_still_plain()
    with pytest.raises(GuidedBackpropError):  # a failing call leaves nothing either
        saliency(ActNet(nn.SiLU()).eval(), X, 0, method="guided_backprop")
    assert _relu_still_plain()


def test_inplace_relu_net_matches_captum(tiny_net):
    attr = pytest.importorskip("captum.attr")
    torch.manual_seed(3)
    x = torch.randn(3, 3, 16, 16)
    ref = attr.GuidedBackprop(copy.deepcopy(tiny_net)).attribute(x.clone(), target=[0, 1, 2])
    ours = saliency(tiny_net, x, [0, 1, 2], method="guided_backprop")
    torch.testing.assert_close(ours, ref.detach())


class _HandReLU6(torch.autograd.Function):
    """ReLU6 whose backward is guided backpropagation's rule, written out."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x.clamp(0, 6)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad.clamp(min=0) * ((x > 0) & (x < 6))


class HandReLU6(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _HandReLU6.apply(x)


def test_lite0_relu6_guided_equals_hand_implementation(lite0, chelsea):
    x = lite0.preprocess(chelsea)
    guided = saliency(lite0, x, 285, method="guided_backprop")
    vanilla = saliency(lite0, x, 285)
    assert not torch.allclose(guided, vanilla)  # the bug: they were exactly equal
    hand = copy.deepcopy(lite0.module)
    replaced = 0
    for module in list(hand.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(module, name, HandReLU6())
                replaced += 1
    assert replaced == 17
    leaf = x.clone().requires_grad_(True)
    hand(leaf)[:, 285].sum().backward()
    torch.testing.assert_close(guided, leaf.grad, rtol=1e-4, atol=1e-6 * float(leaf.grad.abs().max()))


def test_cam_accepts_guided_gradcam(tiny_net):
    torch.manual_seed(4)
    x = torch.randn(2, 3, 16, 16)
    attribution = guided_gradcam(tiny_net, x, layer="features.3", target=[1, 2])
    maps, raw = cam(tiny_net, x, layer="features.3", target=[1, 2], method="guided_gradcam",
                    return_raw=True)
    torch.testing.assert_close(raw, attribution)
    torch.testing.assert_close(maps, heatmap(attribution))
    assert maps.shape == (2, 16, 16)
    # Guided Grad-CAM = guided backprop x the [0, 1] Grad-CAM map, recomputed here
    gb = saliency(tiny_net, x, [1, 2], method="guided_backprop")
    grad_cam = cam(tiny_net, x, layer="features.3", target=[1, 2])
    torch.testing.assert_close(raw, gb * grad_cam[:, None])
    torch.testing.assert_close(cam(tiny_net, x, layer="features.3", target=[1, 2],
                                   method="Guided-GradCAM"), maps)


# Cases a mutation run (stop 20) found unpinned.


@pytest.mark.parametrize(("clamp", "derivative"), [
    (lambda h: h.clamp(min=-1.0), [1.0, 0.0, 1.0, 1.0]),
    (lambda h: torch.clamp(h, -1.0, 6.0), [1.0, 0.0, 0.0, 1.0]),
    (lambda h: h.clamp_min(-1.0), [1.0, 0.0, 1.0, 1.0]),
], ids=["clamp(min=-1)", "clamp(-1, 6)", "clamp_min(-1)"])
def test_a_clamp_with_a_negative_lower_bound_is_no_rectifier(
        clamp: Callable[[torch.Tensor], torch.Tensor], derivative: list[float]) -> None:
    """Only a lower bound of exactly 0 makes a clamp a rectifier: next to a ReLU, a clamp
    at -1 keeps its ordinary gradient (W[0]'s -4 passes through it at x = 0.5)."""
    net = ActNet(lambda h: F.relu(h) + clamp(h)).eval()
    relu_part = torch.tensor([1.0, 0.0, 1.0, 1.0]) * W[0].clamp(min=0)
    clamp_part = torch.tensor(derivative) * W[0]
    got = saliency(net, X, 0, method="guided_backprop")
    torch.testing.assert_close(got, (relu_part + clamp_part).view(1, 1, 2, 2))
