"""Cascading model-randomisation sanity check (Adebayo et al., 2018)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from scipy import stats
from torch import nn

from convscope.methods.sanity import (
    SanityReport,
    SanityStep,
    _parameterised,
    sanity_check,
    spearman,
)


def test_spearman_matches_scipy_with_ties() -> None:
    torch.manual_seed(0)
    a = torch.relu(torch.randn(6, 7))  # many tied zeros, as in a Grad-CAM map
    b = torch.relu(torch.randn(6, 7) + a)
    expected = stats.spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic
    assert spearman(a, b) == pytest.approx(expected, abs=1e-12)
    assert spearman(a, a) == pytest.approx(1.0)
    assert math.isnan(spearman(torch.zeros(3, 3), a[:3, :3]))


@pytest.fixture
def small() -> nn.Module:
    """A small random CNN: 3 convs, BatchNorm, classifier (a few ms per pass)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    return net.eval()


def test_gradcam_passes_and_caller_model_untouched(small) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    before = {k: v.clone() for k, v in small.state_dict().items()}
    report = sanity_check(small, x, method="gradcam", layer="5", steps=4)
    for key, value in small.state_dict().items():
        assert torch.equal(value, before[key]), key
    # cascading: each step randomises more modules, the last one all of them
    counts = [row.randomized for row in report.steps]
    assert counts == sorted(counts)
    assert len(counts) == 4
    assert counts[-1] == len(_parameterised(small)) == 5
    assert report.steps[0].layers.startswith("9")  # the classifier first
    assert report.passed
    assert abs(report.final) < 0.5
    text = report.table()
    assert "gradcam at 5" in text
    assert "PASS" in text
    assert report.as_dict()["steps"][0]["step"] == 1


def _fully_randomised(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every parameterised module re-initialised, output side
    first, module k seeded with ``seed + k``: the last step of ``sanity_check``, redone
    here independently of its code."""
    randomised = copy.deepcopy(model).requires_grad_(False)
    output_side_first = [m for m in randomised.modules()
                         if any(True for _ in m.parameters(recurse=False))][::-1]
    with torch.random.fork_rng(devices=[]):
        for k, module in enumerate(output_side_first):
            torch.manual_seed(seed + k)
            module.reset_parameters()
    return randomised


def test_saliency_final_correlation_and_threshold(small) -> None:
    """The fully randomised model's correlation, recomputed independently (plain autograd,
    the same re-initialisation order and seeds, scipy's Spearman); the verdict follows the
    threshold on either side of it."""
    torch.manual_seed(2)
    x = torch.randn(1, 3, 32, 32)
    report = sanity_check(small, x, method="vanilla", steps=2, seed=3)
    assert report.layer is None
    assert all(-1.0 <= r.spearman <= 1.0 for r in report.steps if not math.isnan(r.spearman))

    def grad_map(net: nn.Module, target: int) -> torch.Tensor:
        leaf = x.clone().requires_grad_(True)
        net(leaf)[0, target].backward()
        return leaf.grad.abs().amax(dim=1).flatten()

    original = copy.deepcopy(small).requires_grad_(False)
    target = int(original(x).argmax())
    randomised = _fully_randomised(small, seed=3)
    expected = stats.spearmanr(grad_map(original, target), grad_map(randomised, target)).statistic
    assert report.final == pytest.approx(expected, abs=1e-9)
    above = sanity_check(small, x, method="vanilla", steps=2, seed=3, threshold=abs(expected) + 0.02)
    below = sanity_check(small, x, method="vanilla", steps=2, seed=3, threshold=abs(expected) - 0.02)
    assert above.passed and "PASS" in above.table()
    assert not below.passed and "FAIL" in below.table()


def test_sanity_report_notebook_view():
    from convscope.methods.sanity import SanityReport, SanityStep

    report = SanityReport(method="gradcam", layer="layer4", threshold=0.5, steps=[
        SanityStep(1, "fc", 1, 0.9), SanityStep(2, "layer4.1 .. layer1.0", 40, float("nan"))])
    page = report._repr_html_()
    assert "<strong>PASS</strong>" in page and "+0.000" in page  # NaN counts as 0
    assert "<td>+0.900</td>" in page and "n/a (constant map)" in page
    assert page.count("<tr>") == 3


# Cases a mutation run (stop 20) found unpinned.


def test_sanity_verdict_fails_a_strong_negative_correlation() -> None:
    """A map whose ranks are reversed by randomisation still depends on the input, not
    on the weights: the verdict compares ``|rho|`` with the threshold, so -0.9 fails."""
    negative = SanityReport(method="gradcam", layer="conv", threshold=0.5,
                            steps=[SanityStep(1, "fc", 1, -0.9)])
    assert not negative.passed and "FAIL" in negative.table()
    weak = SanityReport(method="gradcam", layer="conv", threshold=0.5,
                        steps=[SanityStep(1, "fc", 1, -0.2)])
    assert weak.passed


def test_sanity_correlates_each_sample_with_its_own_original_map() -> None:
    """Per-sample Spearman of sample i's original map with sample i's map after every
    layer is randomised (one step), for the ORIGINAL model's top-1 class, averaged over a
    batch of three (non-square) samples; recomputed here with plain autograd and scipy."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    torch.manual_seed(5)
    x = torch.randn(3, 2, 6, 9)
    report = sanity_check(net, x, method="vanilla", steps=1, seed=11, batch_size=2)

    def grad_maps(model: nn.Module, targets: torch.Tensor) -> torch.Tensor:
        leaf = x.clone().requires_grad_(True)
        model(leaf)[torch.arange(3), targets].sum().backward()
        return leaf.grad.abs().amax(dim=1).reshape(3, -1)

    original = copy.deepcopy(net).requires_grad_(False)
    top1 = original(x).argmax(dim=1)
    randomised = _fully_randomised(net, seed=11)
    before, after = grad_maps(original, top1), grad_maps(randomised, top1)
    expected = sum(stats.spearmanr(before[i], after[i]).statistic for i in range(3)) / 3
    assert report.final == pytest.approx(expected, abs=1e-9)
    # the check must be able to tell the pairings and the targets apart
    swapped = sum(stats.spearmanr(before[i], after[(i + 1) % 3]).statistic
                  for i in range(3)) / 3
    assert abs(swapped - expected) > 1e-3
