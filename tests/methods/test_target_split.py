"""Every target form is split with the batch when ``batch_size`` splits the work: a batch
of 5 in parts of 2 gives exactly what one call per sample gives."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from convscope.errors import TargetError
from convscope.methods.cam import cam
from convscope.methods.gradients import saliency
from convscope.methods.sanity import sanity_check
from convscope.methods.targets import ClassTarget

NAMES = ["cat", "dog", "bird", "fish"]


def margin(out: torch.Tensor) -> torch.Tensor:
    return out[:, 1] - out[:, 0]


def third(out: torch.Tensor) -> torch.Tensor:
    return out[:, 3]


PER_SAMPLE = [2, 0, 3, 1, 2]
FORMS = {  # name: (target for the batch of 5, target of sample i alone)
    "None": (None, lambda i: None),
    "int": (2, lambda i: 2),
    "str": ("bird", lambda i: "bird"),
    "callable": (margin, lambda i: margin),
    "list": (PER_SAMPLE, lambda i: PER_SAMPLE[i]),
    "tuple": (tuple(PER_SAMPLE), lambda i: PER_SAMPLE[i]),
    "tensor": (torch.tensor(PER_SAMPLE), lambda i: PER_SAMPLE[i]),
    "numpy": (np.array(PER_SAMPLE), lambda i: PER_SAMPLE[i]),
    "mixed list": ([0, "dog", ClassTarget(2), third, torch.tensor(1)],
                   lambda i: [0, "dog", ClassTarget(2), third, torch.tensor(1)][i]),
}


@pytest.fixture(scope="module")
def loaded() -> SimpleNamespace:
    """A tiny CNN with class names, shaped like a LoadedModel (module + class_names)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4)).eval()
    return SimpleNamespace(module=net, class_names=NAMES)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(5, 3, 10, 12)


@pytest.mark.parametrize("method", ["gradcam", "scorecam", "ablationcam", "guided_gradcam"])
@pytest.mark.parametrize("form", list(FORMS))
def test_cam_batch_split_equals_one_call_per_sample(loaded, x, form, method):
    whole, single = FORMS[form]
    split = cam(loaded, x, layer="2", target=whole, method=method, batch_size=2)
    alone = torch.cat([cam(loaded, x[i:i + 1], layer="2", target=single(i), method=method)
                       for i in range(5)])
    torch.testing.assert_close(split, alone)


@pytest.mark.parametrize("method", ["vanilla", "guided_backprop", "integrated_gradients"])
@pytest.mark.parametrize("form", ["tensor", "numpy", "mixed list", "callable"])
def test_saliency_batch_split_equals_one_call_per_sample(loaded, x, form, method):
    whole, single = FORMS[form]
    split = saliency(loaded, x, whole, method=method, batch_size=2, steps=4)
    alone = torch.cat([saliency(loaded, x[i:i + 1], single(i), method=method, steps=4)
                       for i in range(5)])
    torch.testing.assert_close(split, alone)


@pytest.mark.parametrize("method", ["gradcam", "vanilla"])
def test_sanity_check_splits_a_tensor_target(loaded, x, method):
    target = torch.tensor(PER_SAMPLE)
    split = sanity_check(loaded, x, method=method, target=target, steps=2, batch_size=2)
    whole = sanity_check(loaded, x, method=method, target=PER_SAMPLE, steps=2, batch_size=5)
    assert [s.spearman for s in split.steps] == pytest.approx([s.spearman for s in whole.steps])


def test_wrong_number_of_targets_fails_before_any_work(loaded, x):
    for target in (torch.tensor([0, 1]), np.array([0, 1, 2, 3, 0, 1]), [0] * 4):
        with pytest.raises(TargetError, match=r"targets were given for a batch of 5"):
            cam(loaded, x, layer="2", target=target, batch_size=2)
