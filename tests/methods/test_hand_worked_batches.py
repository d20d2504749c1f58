"""Attribution methods against hand-worked references on batches that can tell right
from wrong (cases a mutation run, stop 20, found unpinned by the rest of the suite).

Every test compares convscope with an independent reference computed here (by hand or
with plain autograd), on non-square inputs, multi-sample batches with a different target
per sample and ``batch_size`` smaller than the batch, so that a silently wrong map (a
wrong call of a reused layer, a wrong sample's target, a wrong quadrature rule) fails a
test instead of being drawn. The sanity check's cases of the same run are in
test_sanity.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convscope.methods.cam import cam
from convscope.methods.gradients import heatmap, saliency

# three samples, 4 x 6 (non-square), each with its own target
X = torch.tensor([
    [[[1.0, 2.0, -1.0, 0.5, 3.0, -2.0],
      [0.0, -3.0, 2.0, 1.0, -1.0, 4.0],
      [2.5, 1.0, -0.5, -2.0, 1.5, 0.0],
      [-1.0, 0.5, 3.0, 2.0, -4.0, 1.0]]],
    [[[-2.0, 1.0, 0.0, 3.0, 1.0, 2.0],
      [1.5, -1.0, 4.0, -0.5, 2.0, -3.0],
      [0.5, 2.0, -2.0, 1.0, 0.0, 1.0],
      [3.0, -1.5, 1.0, 2.5, -1.0, 0.5]]],
    [[[0.5, -0.5, 1.0, -1.0, 2.0, -2.0],
      [3.0, 1.0, -3.0, 0.0, 1.5, 2.5],
      [-1.0, 4.0, 0.5, -2.5, 1.0, -1.0],
      [2.0, 0.0, -1.5, 1.0, 3.5, -0.5]]],
])
TARGETS = [0, 2, 1]


class TwiceNet(nn.Module):
    """conv 1x1 (1 -> 2 channels) -> ``act`` -> conv 1x1 (2 -> 2) -> the same ``act`` again
    -> global average pool -> linear (2 -> 3). ``act`` (a LeakyReLU) runs twice per forward
    pass, so ``call`` decides which of its outputs is explained."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 1, bias=False)
        self.conv2 = nn.Conv2d(2, 2, 1, bias=False)
        self.act = nn.LeakyReLU(0.1)
        self.fc = nn.Linear(2, 3, bias=False)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.conv2.weight.copy_(torch.tensor([[1.0, 0.5], [-0.5, 2.0]]).view(2, 2, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -2.0], [-1.0, 1.5]]))

    def first(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv1(x))

    def rest(self, a1: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv2(a1)).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rest(self.first(x))


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max scaling of (N, H, W) maps, written out independently."""
    out = torch.zeros_like(maps)
    for i, m in enumerate(maps):
        span = m.max() - m.min()
        out[i] = (m - m.min()) / span if span > 0 else 0.0
    return out


def _first_call_gradcam(net: TwiceNet, x: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """Grad-CAM of the first call of ``act`` with plain autograd (layer resolution)."""
    a1 = net.first(x).detach().requires_grad_(True)
    logits = net.rest(a1)
    score = logits[torch.arange(len(targets)), torch.tensor(targets)].sum()
    (g,) = torch.autograd.grad(score, a1)
    return torch.relu((g.mean(dim=(2, 3), keepdim=True) * a1.detach()).sum(dim=1))


def _first_call_ablation(net: TwiceNet, x: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """Ablation-CAM of the first call of ``act`` by hand: zero one channel of it, rerun."""
    with torch.no_grad():
        a1 = net.first(x)
        rows = torch.arange(len(targets))
        t = torch.tensor(targets)
        y = net.rest(a1)[rows, t]
        maps = []
        for k in range(a1.shape[1]):
            ablated = a1.clone()
            ablated[:, k] = 0
            yk = net.rest(ablated)[rows, t]
            maps.append(((y - yk) / y)[:, None, None] * a1[:, k])
        return torch.relu(torch.stack(maps).sum(dim=0))


@pytest.mark.parametrize("method", ["gradcam", "ablationcam"])
def test_negative_call_of_a_reused_layer_explains_that_call(method: str) -> None:
    """``call=-2`` on a module that runs twice is its first call, for the gradient and the
    ablation methods alike (Ablation-CAM turns -2 into an absolute call index itself)."""
    net = TwiceNet().eval()
    reference = {"gradcam": _first_call_gradcam, "ablationcam": _first_call_ablation}[method]
    expected = reference(net, X, TARGETS)
    maps, raw = cam(net, X, layer="act", call=-2, method=method, target=TARGETS,
                    batch_size=2, return_raw=True)
    torch.testing.assert_close(raw, expected)
    torch.testing.assert_close(maps, _minmax(expected))  # already at input size (1x1 convs)
    # the last call's maps differ (otherwise this test could not tell the calls apart)
    _, last = cam(net, X, layer="act", call=-1, method=method, target=TARGETS, batch_size=2,
                  return_raw=True)
    assert not torch.allclose(last, expected)


# --------------------------------------------------------------------------------------
# Saliency: a model whose gradients depend on where they are taken


class Cubic(nn.Module):
    """``logits = W @ flatten(x) ** 3``: d y_c / d x_j = 3 W_cj x_j^2, so a quadrature rule
    or a noise scale that is off changes the attribution (a linear model hides both)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(x, 1) ** 3)


# three samples of 1 x 2 x 3 (non-square), very different value ranges
XS = torch.tensor([
    [[[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]]],
    [[[10.0, -4.0, 2.0], [-6.0, 8.0, 1.0]]],
    [[[0.2, 0.1, -0.3], [0.4, -0.1, 0.0]]],
])
WS = torch.tensor([[1.0, -1.0, 2.0, 0.5, 1.5, -2.0],
                   [-0.5, 2.0, 1.0, -1.0, 0.5, 3.0],
                   [2.0, 0.5, -1.5, 1.0, -1.0, 0.25]])
TS = [2, 0, 1]
BASE = torch.tensor([[[0.5, -0.5, 0.25], [-1.0, 1.0, 0.0]]])  # one baseline for every sample


def _weights_of(targets: list[int]) -> torch.Tensor:
    """Row ``W[t_i]`` of each sample, shaped like the input."""
    return WS[torch.tensor(targets)].view(XS.shape)


def test_integrated_gradients_gauss_legendre_is_exact_on_a_quadratic_path() -> None:
    """Gauss-Legendre with 2 nodes integrates the quadratic path gradient exactly, so IG
    equals ``W (x^3 - b^3)`` (completeness): pins the node count (``steps`` nodes, not
    ``steps - 1``), the (x - baseline) factor and each sample's own target across chunks."""
    net = Cubic(WS).eval()
    got = saliency(net, XS, TS, method="integrated_gradients", steps=2, baseline=BASE,
                   batch_size=4)
    expected = _weights_of(TS) * (XS ** 3 - BASE ** 3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_integrated_gradients_riemann_trapezoid_rule() -> None:
    """``riemann_trapezoid`` with ``steps`` points is the trapezoid rule on
    ``alpha = 0, 1/(steps-1), ..., 1`` (end points weighted 1/2), written out here; it is
    not exact on this model, so a left-Riemann sum or equal weights give other numbers."""
    steps = 4
    net = Cubic(WS).eval()
    got = saliency(net, XS, TS, method="integrated_gradients", steps=steps, baseline=BASE,
                   integration="riemann_trapezoid", batch_size=5)
    w, d = _weights_of(TS), XS - BASE
    total = torch.zeros_like(XS)
    for k in range(steps):
        alpha = k / (steps - 1)
        weight = (0.5 if k in (0, steps - 1) else 1.0) / (steps - 1)
        total += weight * 3 * w * (BASE + alpha * d) ** 2
    expected = d * total
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    exact = w * (XS ** 3 - BASE ** 3)
    assert not torch.allclose(got, exact, rtol=1e-3, atol=1e-2)  # the rule is visible


def test_smoothgrad_noise_scale_is_each_samples_own_range() -> None:
    """Noise std = ``noise_level * (max - min)`` of each sample (module docstring), not of
    the whole batch: samples with ranges 4, 16 and 0.7 get their own sigma."""
    count, level, seed = 5, 0.2, 3
    net = Cubic(WS).eval()
    got = saliency(net, XS, TS, method="smoothgrad", samples=count, noise_level=level,
                   seed=seed, batch_size=4)
    noise = torch.randn((XS.shape[0] * count, *XS.shape[1:]),
                        generator=torch.Generator().manual_seed(seed))
    expected = torch.zeros_like(XS)
    for i in range(XS.shape[0]):
        sigma = level * (XS[i].max() - XS[i].min())
        noisy = XS[i] + sigma * noise[i * count:(i + 1) * count]
        expected[i] = (3 * _weights_of(TS)[i] * noisy ** 2).mean(dim=0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------
# target=None: each sample's own top-1 class


def test_default_target_is_each_samples_own_top1() -> None:
    """``target=None`` explains each sample's top-1 class; with three samples whose top-1
    classes differ (0, 1, 2), cam and saliency must give what the explicit per-sample
    classes give, computed with plain autograd (not the first sample's class for all)."""
    net = TwiceNet().eval()
    with torch.no_grad():
        net.fc.weight.copy_(torch.tensor([[-10.0, 11.0], [1.0, -1.5], [-3.0, 3.3]]))
    top1 = net(X).argmax(dim=1).tolist()
    assert top1 == [0, 1, 2]
    _, raw = cam(net, X, layer="act", call=-2, batch_size=2, return_raw=True)
    torch.testing.assert_close(raw, _first_call_gradcam(net, X, top1))

    cubic = Cubic(WS).eval()
    classes = cubic(XS).argmax(dim=1)
    assert len(set(classes.tolist())) > 1
    got = saliency(cubic, XS, method="vanilla", batch_size=2)
    torch.testing.assert_close(got, 3 * WS[classes].view(XS.shape) * XS ** 2)


# --------------------------------------------------------------------------------------
# Upsampling of a coarse map to a non-square input


class DownNet(nn.Module):
    """conv 1x1 (1 -> 2, weights +1 / -1) -> ReLU -> 2x2 average pool (``down``, the layer
    explained: a 2 x 3 map for a 4 x 6 input) -> global mean -> linear (2 -> 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.relu = nn.ReLU()
        self.down = nn.AvgPool2d(2)
        self.fc = nn.Linear(2, 3, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -2.0], [-1.0, 1.5]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.down(self.relu(self.conv(x))).mean(dim=(2, 3)))


def _bilinear_half_pixel(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of one (h, w) map with half-pixel centres (OpenCV/PIL), by hand."""
    h, w = m.shape
    big_h, big_w = size
    out = torch.empty(size, dtype=m.dtype)

    def source(i: int, n_in: int, n_out: int) -> tuple[int, int, float]:
        s = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(s), n_in - 1)
        return lo, min(lo + 1, n_in - 1), s - lo

    for i in range(big_h):
        y0, y1, fy = source(i, h, big_h)
        for j in range(big_w):
            x0, x1, fx = source(j, w, big_w)
            top = m[y0, x0] * (1 - fx) + m[y0, x1] * fx
            bottom = m[y1, x0] * (1 - fx) + m[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


def test_gradcam_upsamples_a_coarse_non_square_map_with_half_pixel_centres() -> None:
    """A 2 x 3 Grad-CAM map (per-sample targets, batch split in parts of 2) is resized to
    the 4 x 6 input bilinearly with half-pixel centres, H and W in their places, and
    min-max scaled per sample; everything recomputed here."""
    net = DownNet().eval()
    maps, raw = cam(net, X, layer="down", target=TARGETS, batch_size=2, return_raw=True)
    leaf = net.down(net.relu(net.conv(X))).detach().requires_grad_(True)
    logits = net.fc(leaf.mean(dim=(2, 3)))
    (g,) = torch.autograd.grad(logits[torch.arange(3), torch.tensor(TARGETS)].sum(), leaf)
    expected_raw = torch.relu((g.mean(dim=(2, 3), keepdim=True) * leaf.detach()).sum(dim=1))
    assert expected_raw.shape == (3, 2, 3)
    torch.testing.assert_close(raw, expected_raw)
    big = torch.stack([_bilinear_half_pixel(m, (4, 6)) for m in expected_raw])
    assert maps.shape == (3, 4, 6)
    torch.testing.assert_close(maps, _minmax(big))


# --------------------------------------------------------------------------------------
# The gradient CAMs' formulas, per sample, on a signed layer


def _reference_gradient_cam(method: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The module docstring's formulas, one sample and one channel at a time."""
    out = torch.zeros(a.shape[0], *a.shape[2:])
    for i in range(a.shape[0]):
        total = torch.zeros(a.shape[2:])
        for k in range(a.shape[1]):
            ak, gk = a[i, k], g[i, k]
            if method == "gradcam":
                total += gk.mean() * ak
            elif method == "gradcam++":
                denom = 2 * gk ** 2 + ak.sum() * gk ** 3
                alpha = torch.where((gk != 0) & (denom != 0), gk ** 2 / denom, 0.0)
                total += (alpha * torch.relu(gk)).sum() * ak
            elif method == "xgradcam":
                total += (gk * ak).sum() / ak.sum() * ak
            else:  # layercam
                total += torch.relu(gk) * ak
        out[i] = torch.relu(total)
    return out


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "layercam"])
def test_gradient_cams_per_sample_on_a_signed_layer(method: str) -> None:
    """Each gradient CAM at a layer with negative values (the conv before the ReLU), for a
    batch of three with their own targets split in parts of 2: sums over positions are each
    sample's own, and the final ReLU removes negative evidence."""
    net = DownNet().eval()
    _, raw = cam(net, X, layer="conv", method=method, target=TARGETS, batch_size=2,
                 return_raw=True)
    leaf = net.conv(X).detach().requires_grad_(True)
    logits = net.fc(net.down(net.relu(leaf)).mean(dim=(2, 3)))
    (g,) = torch.autograd.grad(logits[torch.arange(3), torch.tensor(TARGETS)].sum(), leaf)
    expected = _reference_gradient_cam(method, leaf.detach(), g)
    torch.testing.assert_close(raw, expected, rtol=1e-4, atol=1e-5)


def test_layercam_rectifies_the_sum_where_negative_activations_have_positive_gradient() -> None:
    """Layer-CAM at a LeakyReLU output (TwiceNet's first ``act`` call): negative
    activations with a positive gradient give negative evidence, which the final ReLU of
    ``relu(sum_k relu(g_k) A_k)`` removes; computed here with plain autograd."""
    net = TwiceNet().eval()
    _, raw = cam(net, X, layer="act", call=0, method="layercam", target=TARGETS,
                 batch_size=2, return_raw=True)
    a1 = net.first(X).detach().requires_grad_(True)
    logits = net.rest(a1)
    (g,) = torch.autograd.grad(logits[torch.arange(3), torch.tensor(TARGETS)].sum(), a1)
    summed = (torch.relu(g) * a1.detach()).sum(dim=1)
    assert bool((summed < 0).any())  # the rectifier has something to remove
    torch.testing.assert_close(raw, torch.relu(summed))


def test_scorecam_on_a_coarse_map_by_hand() -> None:
    """Score-CAM at DownNet's 2 x 3 ``down`` map: each channel min-max scaled, resized to the
    4 x 6 input (half-pixel), multiplied into the input; the softmax over channels of the
    masked scores of each sample's own target weights the channels. batch_size=2 splits the
    six masked copies across samples."""
    net = DownNet().eval()
    _, raw = cam(net, X, layer="down", method="scorecam", target=TARGETS, batch_size=2,
                 return_raw=True)
    with torch.no_grad():
        acts = net.down(net.relu(net.conv(X)))
        expected = torch.zeros(3, 2, 3)
        for i, t in enumerate(TARGETS):
            scores = []
            for k in range(acts.shape[1]):
                m = acts[i, k]
                mask = _bilinear_half_pixel((m - m.min()) / (m.max() - m.min()), (4, 6))
                scores.append(net(X[i:i + 1] * mask)[0, t])
            weights = torch.softmax(torch.stack(scores), dim=0)
            expected[i] = torch.relu((weights[:, None, None] * acts[i]).sum(dim=0))
    torch.testing.assert_close(raw, expected, rtol=1e-4, atol=1e-5)


def test_heatmap_is_the_largest_absolute_channel_scaled_per_sample() -> None:
    """``heatmap``: the largest |value| over channels (a strong negative channel counts),
    min-max scaled per sample; two non-square samples with different ranges, by hand."""
    attribution = torch.tensor([
        [[[1.0, -4.0, 0.0], [2.0, 0.5, -1.0]],
         [[-3.0, 1.0, 0.5], [0.0, -2.0, 1.0]]],
        [[[10.0, 0.0, -5.0], [1.0, 2.0, 3.0]],
         [[0.0, -20.0, 5.0], [-1.0, 0.0, 4.0]]],
    ])
    largest = torch.tensor([[[3.0, 4.0, 0.5], [2.0, 2.0, 1.0]],
                            [[10.0, 20.0, 5.0], [1.0, 2.0, 4.0]]])
    torch.testing.assert_close(heatmap(attribution), _minmax(largest))


def test_ablationcam_divides_by_the_signed_score() -> None:
    """Ablation-CAM's ``w_k = (y - y_k) / y`` with a negative target score ``y`` (class 2
    here scores below zero for every sample): the sign of ``y`` is kept, per sample, with
    the ablated copies split in parts of 2; checked against ablation by hand."""
    net = TwiceNet().eval()
    with torch.no_grad():
        net.fc.weight[2] = torch.tensor([-1.0, 0.5])
    targets = [2, 0, 2]
    assert bool((net(X)[torch.arange(3), torch.tensor(targets)] < 0).any())
    _, raw = cam(net, X, layer="act", call=0, method="ablationcam", target=targets,
                 batch_size=2, return_raw=True)
    torch.testing.assert_close(raw, _first_call_ablation(net, X, targets))
