"""Plumbing shared by the attribution methods: the caller's model is borrowed, never
changed; inputs are checked; maps are upsampled and normalised one way everywhere."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConvscopeError
from ..hooks import preserve_training
from .targets import AttributionError

log = logging.getLogger("convscope.methods")


class InputError(ConvscopeError, TypeError):
    """An input batch that cannot carry gradients (not a floating (N, C, H, W) tensor)."""

    exit_code = 2


@contextmanager
def borrowed(model: nn.Module, *, what: str = "attribution") -> Iterator[nn.Module]:
    """Use ``model`` in eval mode without parameter gradients; restore it exactly on exit.

    A model in training mode is switched to eval (BatchNorm statistics and dropout would
    otherwise change the maps and the model) with a warning; every module's ``training``
    flag and every parameter's ``requires_grad`` are put back in ``finally``. Turning
    ``requires_grad`` off means the forward pass records no graph for the weights, so
    backpropagation runs only from the target to the layer or input being explained.
    """
    if any(module.training for module in model.modules()):
        warnings.warn(
            f"the model is in training mode; computing the {what} in eval mode "
            "(the training flags are restored afterwards)",
            UserWarning,
            stacklevel=4,
        )
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    with preserve_training(model):
        model.eval()
        try:
            for p in params:
                p.requires_grad_(False)
            yield model
        finally:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model without any)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def check_input(x: object, model: nn.Module) -> torch.Tensor:
    """A floating ``(N, C, H, W)`` batch on the model's device (a single CHW image gets a
    batch axis). Integer images cannot carry gradients and are refused with a hint."""
    if not isinstance(x, torch.Tensor):
        raise InputError(
            f"x must be a torch.Tensor batch (N, C, H, W), got {type(x).__name__}; "
            "LoadedModel.preprocess(image) makes one from an image"
        )
    if not x.is_floating_point():
        raise InputError(
            f"x has dtype {x.dtype}, which cannot carry gradients; pass a floating tensor "
            "(LoadedModel.preprocess(image) normalises an image for the model)"
        )
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise InputError(f"x must have shape (N, C, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InputError("x is an empty batch")
    return x.detach().to(model_device(model))


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (half-pixel centres, like OpenCV and PIL) resize of ``(N, h, w)`` maps."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def normalize(maps: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max scaling of ``(N, ...)`` maps to [0, 1]; a constant map gives 0."""
    flat = maps.reshape(maps.shape[0], -1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    scaled = torch.where(span > 0, (flat - low) / span.clamp_min(torch.finfo(flat.dtype).tiny), 0.0)
    return scaled.reshape(maps.shape)


def check_finite(values: torch.Tensor, what: str) -> None:
    """Raise instead of returning a silently blank map when values hold NaN/inf.

    ``what`` names them: "the gradient of the target w.r.t. the input", "the map".
    """
    bad = ~torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)
    if bad.any():
        samples = bad.nonzero().flatten().tolist()
        raise AttributionError(
            f"{what} contains NaN or inf for sample(s) {samples}; the input, the weights "
            "or the model's output are not finite, or a layer divides by zero"
        )


def chunks(n: int, size: int) -> Iterator[slice]:
    """Slices covering ``range(n)`` in pieces of at most ``size``."""
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))
