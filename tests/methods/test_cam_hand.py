"""CAM methods on a hand-weighted model, against numbers worked out by hand.

HandNet: conv 1x1 (1 -> 2 channels, weights +1 and -1, no bias) -> ReLU(inplace) ->
global average pool -> linear W = [[1, 2], [3, -2]] (no bias). With the input
x = [[1, 2], [3, -4]] the conv output (the layer explained) is A0 = x, A1 = -x; after the
ReLU R0 = [[1, 2], [3, 0]], R1 = [[0, 0], [0, 4]]; pooled p = (1.5, 1.0); logits
y0 = 1.5 + 2 = 3.5, y1 = 4.5 - 2 = 2.5 (top-1 is class 0).

d y0 / d A0 = W00 / 4 * [A0 > 0] = 0.25 * [[1, 1], [1, 0]]
d y0 / d A1 = W01 / 4 * [A1 > 0] = 0.50 * [[0, 0], [0, 1]]
Because the ReLU is in place, a hook that read the conv output after the forward pass would
see R instead of A; the true values are used here (the numbers below would all change).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from convscope.methods.cam import cam

X = torch.tensor([[[[1.0, 2.0], [3.0, -4.0]]]])
POS = torch.tensor([[1.0, 2.0], [3.0, 0.0]])  # relu(x)
NEG = torch.tensor([[0.0, 0.0], [0.0, 4.0]])  # relu(-x)


class HandNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -2.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.relu(self.conv(x))), 1))


@pytest.fixture
def hand() -> HandNet:
    return HandNet().eval()


def raw(model: nn.Module, method: str, target: int | None = None) -> torch.Tensor:
    _, low = cam(model, X, layer="conv", method=method, target=target, return_raw=True)
    return low[0]


def test_logits_are_as_worked_out(hand: HandNet) -> None:
    torch.testing.assert_close(hand(X), torch.tensor([[3.5, 2.5]]))


def test_gradcam_class0(hand: HandNet) -> None:
    # weights: mean grads = (0.25 * 3/4, 0.5 * 1/4) = (0.1875, 0.125)
    # relu(0.1875 * x + 0.125 * (-x)) = 0.0625 * relu(x)
    torch.testing.assert_close(raw(hand, "gradcam"), 0.0625 * POS)
    maps = cam(hand, X, layer="conv")
    torch.testing.assert_close(maps[0], torch.tensor([[1 / 3, 2 / 3], [1.0, 0.0]]))


def test_gradcam_class1(hand: HandNet) -> None:
    # d y1 / d A0 = 0.75 * [A0 > 0] -> mean 0.5625; d y1 / d A1 = -0.5 * [A1 > 0] -> -0.125
    # relu(0.5625 x - 0.125 (-x)) = 0.6875 relu(x)
    torch.testing.assert_close(raw(hand, "gradcam", 1), 0.6875 * POS)


def test_layercam(hand: HandNet) -> None:
    # relu(g0) * A0 + relu(g1) * A1 = 0.25 * relu(x) + 0.5 * [[0,0],[0,4]]
    torch.testing.assert_close(raw(hand, "layercam"), 0.25 * POS + 0.5 * NEG)


def test_xgradcam(hand: HandNet) -> None:
    # w0 = sum(g0 A0) / sum(A0) = 0.25 * 6 / 2 = 0.75; w1 = 0.5 * 4 / -2 = -1
    # relu(0.75 x + (-1)(-x)) = 1.75 relu(x)
    torch.testing.assert_close(raw(hand, "xgradcam"), 1.75 * POS, rtol=1e-5, atol=1e-6)


def test_gradcampp(hand: HandNet) -> None:
    # alpha = g^2 / (2 g^2 + sum(A) g^3): channel 0: 0.0625 / (0.125 + 2 * 0.015625) = 0.4,
    # w0 = 3 * 0.4 * 0.25 = 0.3; channel 1: 0.25 / (0.5 - 2 * 0.125) = 1, w1 = 0.5
    # relu(0.3 x - 0.5 x) = 0.2 relu(-x)
    torch.testing.assert_close(raw(hand, "gradcam++"), 0.2 * NEG)


def test_ablationcam(hand: HandNet) -> None:
    # zero A0: y0 = 2 * 1 = 2 -> w0 = (3.5 - 2) / 3.5 = 3/7
    # zero A1: y0 = 1.5     -> w1 = (3.5 - 1.5) / 3.5 = 4/7
    # relu(3/7 x - 4/7 x) = relu(-x) / 7
    torch.testing.assert_close(raw(hand, "ablationcam"), NEG / 7)


def test_scorecam(hand: HandNet) -> None:
    # masks: (A - min) / (max - min): M0 = (x + 4) / 7, M1 = (3 - x) / 7
    # x * M0 = [[5/7, 12/7], [3, 0]] -> y0 = mean(relu) * 1 = (38/7) / 4 = 19/14
    # x * M1 = [[2/7, 2/7], [0, -4]] -> y0 = (4/7)/4 + 2 * 4/4 = 15/7
    s0, s1 = 19 / 14, 15 / 7
    w0 = math.exp(s0) / (math.exp(s0) + math.exp(s1))
    expected = (1 - 2 * w0) * NEG  # relu(w0 x - w1 x) with w1 > w0
    torch.testing.assert_close(raw(hand, "scorecam"), expected)
    # Faster Score-CAM with every channel kept is Score-CAM exactly
    _, fast = cam(hand, X, layer="conv", method="fasterscorecam", top_channels=2,
                  return_raw=True)
    torch.testing.assert_close(fast[0], expected)


def test_fasterscorecam_keeps_highest_variance_channel(hand: HandNet) -> None:
    # A0 = x and A1 = -x have the same variance; make channel 1 larger so it is kept alone
    with torch.no_grad():
        hand.conv.weight.copy_(torch.tensor([1.0, -3.0]).view(2, 1, 1, 1))
    _, fast = cam(hand, X, layer="conv", method="fasterscorecam", top_channels=1,
                  return_raw=True)
    # one channel: softmax weight 1, map relu(A1) = relu(-3x)
    torch.testing.assert_close(fast[0], 3 * NEG)


def test_target_callable_and_name_list(hand: HandNet) -> None:
    from convscope.methods.targets import ClassTarget

    torch.testing.assert_close(raw(hand, "gradcam", ClassTarget(1)), 0.6875 * POS)

    def margin(logits: torch.Tensor) -> torch.Tensor:  # y1 - y0: gradient = class1 - class0
        return logits[:, 1] - logits[:, 0]

    # w = (0.5625 - 0.1875, -0.125 - 0.125) = (0.375, -0.25): relu(0.625 x)
    torch.testing.assert_close(raw(hand, "gradcam", margin), 0.625 * POS)
    x2 = torch.cat([X, X])
    _, low = cam(hand, x2, layer="conv", target=[0, 1], return_raw=True)
    torch.testing.assert_close(low, torch.stack([0.0625 * POS, 0.6875 * POS]))
