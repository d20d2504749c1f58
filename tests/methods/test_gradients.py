"""Gradient and perturbation saliency: hand-worked numbers and Captum as the reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from convscope.methods.cam import guided_gradcam
from convscope.methods.gradients import heatmap, saliency

X = torch.tensor([[[[1.0, -2.0], [3.0, 0.5]]]])
W = torch.tensor([[2.0, -1.0, 0.5, 4.0], [1.0, 1.0, 1.0, 1.0]])


class Linear(nn.Module):
    """logits = W @ flatten(x): every gradient method has a closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(x, 1))


class ReluLinear(Linear):
    """logits = W @ relu(x)."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.relu(x), 1))


def grid(values: list[float]) -> torch.Tensor:
    return torch.tensor(values).view(1, 1, 2, 2)


def test_linear_model_closed_forms() -> None:
    net = Linear().eval()
    # d y0 / d x = W[0]
    torch.testing.assert_close(saliency(net, X, 0), grid([2.0, -1.0, 0.5, 4.0]))
    # x * W[0]
    expected = grid([2.0, 2.0, 1.5, 2.0])
    torch.testing.assert_close(saliency(net, X, 0, method="input_x_gradient"), expected)
    # a linear model's path integral from 0 is exactly x * W[0], for any quadrature
    for integration in ("gausslegendre", "riemann_trapezoid"):
        torch.testing.assert_close(
            saliency(net, X, 0, method="integrated_gradients", steps=5,
                     integration=integration), expected)
    # occluding one pixel with 0 drops y0 by x_i * W0_i
    torch.testing.assert_close(
        saliency(net, X, 0, method="occlusion", window=1, stride=1), expected)
    # 2x2 window over a 2x2 image: one window, every pixel gets the whole drop y0 = 7.5
    torch.testing.assert_close(
        saliency(net, X, 0, method="occlusion", window=2, stride=1), grid([7.5] * 4))
    # constant gradient: smoothgrad equals the gradient whatever the noise
    torch.testing.assert_close(saliency(net, X, 0, method="smoothgrad", samples=7),
                               grid([2.0, -1.0, 0.5, 4.0]))


def test_relu_model_guided_backprop_and_smoothgrad() -> None:
    net = ReluLinear().eval()
    # gradient: W0 where x > 0: [2, 0, 0.5, 4]
    torch.testing.assert_close(saliency(net, X, 0), grid([2.0, 0.0, 0.5, 4.0]))
    # class 1 with negative weights: W1' = -W0 -> gradient [-2, 0, -0.5, -4]; guided
    # backprop lets only positive gradients through the ReLU: all zero
    net.fc.weight.data[1] = -W[0]
    torch.testing.assert_close(saliency(net, X, 1, method="guided_backprop"), grid([0.0] * 4))
    net.fc.weight.data[1] = torch.tensor([2.0, 3.0, -1.0, 1.0])
    torch.testing.assert_close(saliency(net, X, 1, method="guided_backprop"),
                               grid([2.0, 0.0, 0.0, 1.0]))
    # smoothgrad: the mean over the same noisy copies, computed here by hand
    torch.manual_seed(123)
    got = saliency(net, X, 0, method="smoothgrad", samples=6, noise_level=0.5, seed=9)
    sigma = 0.5 * (3.0 - (-2.0))
    noise = torch.randn((6, 1, 2, 2), generator=torch.Generator().manual_seed(9))
    noisy = X + sigma * noise
    expected = ((noisy > 0).float() * W[0].view(1, 1, 2, 2)).mean(0, keepdim=True)
    torch.testing.assert_close(got, expected)


@pytest.fixture(scope="module")
def small_batch() -> torch.Tensor:
    torch.manual_seed(7)
    return torch.randn(2, 3, 48, 40)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


@pytest.mark.parametrize("method", ["vanilla", "input_x_gradient", "integrated_gradients",
                                    "guided_backprop", "occlusion"])
def test_matches_captum_on_resnet18(resnet18, small_batch, method):
    attr = pytest.importorskip("captum.attr")
    targets = [3, 411]
    peer = copy.deepcopy(resnet18)
    x = small_batch
    if method == "vanilla":
        ref = attr.Saliency(peer).attribute(x.clone(), target=targets, abs=False)
    elif method == "input_x_gradient":
        ref = attr.InputXGradient(peer).attribute(x.clone(), target=targets)
    elif method == "integrated_gradients":
        ref = attr.IntegratedGradients(peer).attribute(x.clone(), target=targets, n_steps=16)
    elif method == "guided_backprop":
        ref = attr.GuidedBackprop(peer).attribute(x.clone(), target=targets)
    else:
        ref = attr.Occlusion(peer).attribute(x.clone(), target=targets,
                                             sliding_window_shapes=(3, 12, 12), strides=(3, 9, 9))
    ours = saliency(resnet18, x, targets, method=method, steps=16, window=12, stride=9)
    assert ours.shape == x.shape
    for i in range(2):
        assert pearson(ours[i], ref[i].detach()) >= 0.999, method
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-3, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.slow
def test_occlusion_and_ig_batching_do_not_change_results(resnet18, small_batch):
    a = saliency(resnet18, small_batch, 1, method="occlusion", window=16, stride=16,
                 batch_size=3)
    b = saliency(resnet18, small_batch, 1, method="occlusion", window=16, stride=16,
                 batch_size=64)
    torch.testing.assert_close(a, b)
    c = saliency(resnet18, small_batch, 1, method="integrated_gradients", steps=6, batch_size=4)
    d = saliency(resnet18, small_batch, 1, method="integrated_gradients", steps=6, batch_size=50)
    torch.testing.assert_close(c, d)


@pytest.mark.slow
def test_guided_gradcam_matches_captum_definition(resnet18, small_batch):
    """Captum's GuidedGradCam multiplies guided backprop by the (unscaled, relu'd) Grad-CAM
    interpolated to the input; convscope scales the map to [0, 1] first, so the two differ
    by one positive factor per sample (same Pearson correlation)."""
    attr = pytest.importorskip("captum.attr")
    peer = copy.deepcopy(resnet18)
    ref = attr.GuidedGradCam(peer, peer.layer3).attribute(
        small_batch.clone(), target=[3, 4], interpolate_mode="bilinear")
    ours = guided_gradcam(resnet18, small_batch, layer="layer3", target=[3, 4])
    for i in range(2):
        assert pearson(ours[i], ref[i].detach()) >= 0.999


def test_heatmap_scales_abs_max_over_channels() -> None:
    attribution = torch.tensor([[[[1.0, -4.0]], [[-2.0, 0.0]]]])  # (1, 2, 1, 2)
    torch.testing.assert_close(heatmap(attribution), torch.tensor([[[0.0, 1.0]]]))


def test_unknown_method_suggests() -> None:
    with pytest.raises(ValueError, match="smoothgrad"):
        saliency(Linear(), X, 0, method="smoothgrd")
