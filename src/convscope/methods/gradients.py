"""Gradient and perturbation saliency: how much each input pixel moves the target score.

``saliency(model, x, target, method=...)`` returns signed attributions shaped like the input,
``(N, C, H, W)``; :func:`heatmap` turns them into ``(N, H, W)`` maps in [0, 1] for
:func:`convscope.overlay`. Gradients are taken with ``torch.autograd.grad`` w.r.t. the input
only: the caller's parameters get no ``.grad`` and keep their ``requires_grad``.

* ``vanilla``: d score / d x (Simonyan et al., 2014; Captum's ``Saliency(abs=False)``).
* ``input_x_gradient``: x * d score / d x.
* ``smoothgrad`` (Smilkov et al., 2017): mean gradient over ``samples`` noisy copies,
  noise std = ``noise_level`` * (max - min) of each sample.
* ``integrated_gradients`` (Sundararajan et al., 2017): (x - baseline) times the path
  integral of the gradient, Gauss-Legendre quadrature with ``steps`` nodes (Captum's
  default), or ``"riemann_trapezoid"``.
* ``guided_backprop`` (Springenberg et al., 2015): only positive gradients pass back
  through the ReLU family, modules and functional calls alike (ReLU, ReLU6, LeakyReLU,
  Hardtanh, ``F.relu``, ``torch.clamp(x, min=0)``...; see :mod:`convscope.methods.guided`).
  Other activations (SiLU, GELU, sigmoid...) keep their ordinary gradient; a model in
  which no ReLU-family activation runs raises :class:`GuidedBackpropError` instead of
  silently returning the plain gradient. On ``nn.ReLU`` models this is Captum's rule.
* ``occlusion`` (Zeiler & Fergus, 2014): score drop when a ``window`` patch (all channels)
  is replaced by ``baseline``, slid with ``stride``; each pixel gets the mean drop of the
  windows that cover it (Captum's definition).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UnknownNameError
from . import SALIENCY_METHODS
from .common import borrowed, check_finite, check_input, chunks, normalize
from .guided import GuidedBackpropError as GuidedBackpropError  # re-exported
from .guided import GuidedForward
from .targets import (
    AttributionError,
    OutputSpec,
    TargetSpec,
    _PerSample,
    resolve_targets,
    select_output,
    unwrap_model,
)

METHODS = SALIENCY_METHODS


class UnknownSaliencyMethodError(UnknownNameError):
    """A saliency method name that convscope does not implement."""

    kind = "saliency method"
    hint = "one of " + ", ".join(METHODS)


def _target_rows(fn: Callable, logits: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """Scores of rows that are copies (noisy, scaled, occluded) of samples ``samples``."""
    if isinstance(fn, _PerSample):
        out = logits.new_empty(logits.shape[0])
        for s in samples.unique().tolist():
            rows = (samples == s).nonzero().flatten()
            out[rows] = fn.targets[s](logits[rows])
        return out
    scores = fn(logits)
    if not isinstance(scores, torch.Tensor) or scores.shape != (logits.shape[0],):
        raise AttributionError(
            f"a target must return one score per sample, shape ({logits.shape[0]},)"
        )
    return scores


def _input_grad(module: nn.Module, inputs: torch.Tensor, fn: Callable,
                samples: torch.Tensor, output: OutputSpec,
                run: Callable[[torch.Tensor], Any] | None = None) -> torch.Tensor:
    """d score / d inputs for a batch of (copies of) samples, checked for NaN.

    ``run`` replaces ``module`` as the forward pass (guided backpropagation's).
    """
    leaf = inputs.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = select_output((run or module)(leaf), output)
        scores = _target_rows(fn, logits, samples)
        if not scores.requires_grad:
            raise AttributionError("the target score does not depend on the input")
        (grad,) = torch.autograd.grad(scores.sum(), leaf)
    check_finite(grad, "the gradient of the target w.r.t. the input")
    return grad


def saliency(
    model: Any,
    x: torch.Tensor,
    target: TargetSpec = None,
    *,
    method: str = "vanilla",
    output: OutputSpec = None,
    batch_size: int = 32,
    noise_level: float = 0.15,
    samples: int = 25,
    seed: int = 0,
    baseline: float | torch.Tensor = 0.0,
    steps: int = 50,
    integration: str = "gausslegendre",
    window: int | tuple[int, int] = 16,
    stride: int | tuple[int, int] = 8,
) -> torch.Tensor:
    """Signed attributions ``(N, C, H, W)`` of ``target`` (see the module docstring).

    >>> attr = convscope.saliency(model, x, 281, method="integrated_gradients", steps=32)
    >>> convscope.overlay(image, heatmap(attr)[0])

    ``target`` works as in :func:`convscope.cam`. ``batch_size`` bounds how many (noisy,
    interpolated or occluded) copies go through the model at once. ``baseline`` is the
    reference for integrated gradients and the fill value for occlusion.
    """
    kind = str(method).strip().lower()
    if kind not in METHODS:
        raise UnknownSaliencyMethodError(method, METHODS)
    module, class_names = unwrap_model(model)
    x = check_input(x, module)
    with borrowed(module, what="saliency"):
        with torch.no_grad():
            logits = select_output(module(x), output)
        fn = resolve_targets(target, logits, class_names=class_names)
        check_finite(logits, "the model output")
        result = _run(kind, module, x, fn, logits, output, batch_size, noise_level, samples,
                      seed, baseline, steps, integration, window, stride)
    check_finite(result, f"the {kind} attribution")
    return result


def _run(kind: str, module: nn.Module, x: torch.Tensor, fn: Callable, logits: torch.Tensor,
         output: OutputSpec, batch_size: int, noise_level: float, samples: int, seed: int,
         baseline: float | torch.Tensor, steps: int, integration: str,
         window: int | tuple[int, int], stride: int | tuple[int, int]) -> torch.Tensor:
    n = x.shape[0]
    every = torch.arange(n, device=x.device)
    if kind in ("vanilla", "input_x_gradient"):
        grads = torch.cat([_input_grad(module, x[p], fn, every[p], output)
                           for p in chunks(n, batch_size)])
        return grads if kind == "vanilla" else grads * x
    if kind == "guided_backprop":
        guide = GuidedForward(module)
        return torch.cat([_input_grad(module, x[p], fn, every[p], output, run=guide)
                          for p in chunks(n, batch_size)])
    if kind == "smoothgrad":
        return _smoothgrad(module, x, fn, output, batch_size, noise_level, samples, seed)
    if kind == "integrated_gradients":
        return _integrated(module, x, fn, output, batch_size, baseline, steps, integration)
    return _occlusion(module, x, fn, logits, output, batch_size, baseline, window, stride)


def _expand(x: torch.Tensor, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat list of (sample, copy) pairs: sample index per row."""
    n = x.shape[0]
    return torch.arange(n, device=x.device).repeat_interleave(copies), torch.arange(
        copies, device=x.device).repeat(n)


def _smoothgrad(module: nn.Module, x: torch.Tensor, fn: Callable, output: OutputSpec,
                batch_size: int, noise_level: float, count: int, seed: int) -> torch.Tensor:
    if count < 1:
        raise ValueError(f"smoothgrad needs samples >= 1, got {count}")
    generator = torch.Generator(device=x.device).manual_seed(seed)
    flat = x.reshape(x.shape[0], -1)
    sigma = noise_level * (flat.max(dim=1).values - flat.min(dim=1).values)
    noise = torch.randn((x.shape[0] * count, *x.shape[1:]), generator=generator,
                        device=x.device, dtype=x.dtype)
    samples, _ = _expand(x, count)
    total = torch.zeros_like(x)
    for part in chunks(len(samples), batch_size):
        rows = samples[part]
        noisy = x[rows] + noise[part] * sigma[rows].view(-1, 1, 1, 1)
        total.index_add_(0, rows, _input_grad(module, noisy, fn, rows, output))
    return total / count


def _baseline_like(x: torch.Tensor, baseline: float | torch.Tensor) -> torch.Tensor:
    if isinstance(baseline, torch.Tensor):
        return baseline.to(x.device, x.dtype).expand_as(x)
    return torch.full_like(x, float(baseline))


def _integrated(module: nn.Module, x: torch.Tensor, fn: Callable, output: OutputSpec,
                batch_size: int, baseline: float | torch.Tensor, steps: int,
                integration: str) -> torch.Tensor:
    if steps < 1:
        raise ValueError(f"integrated_gradients needs steps >= 1, got {steps}")
    if integration == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        alphas, weights = 0.5 * (nodes + 1), 0.5 * weights
    elif integration == "riemann_trapezoid":
        alphas = np.linspace(0, 1, steps) if steps > 1 else np.array([1.0])
        weights = np.full(steps, 1.0 / max(steps - 1, 1))
        if steps > 1:
            weights[[0, -1]] /= 2
    else:
        raise ValueError(f"integration must be 'gausslegendre' or 'riemann_trapezoid', "
                         f"got {integration!r}")
    alpha = torch.as_tensor(alphas, dtype=x.dtype, device=x.device)
    weight = torch.as_tensor(weights, dtype=x.dtype, device=x.device)
    base = _baseline_like(x, baseline)
    samples, step_index = _expand(x, steps)
    total = torch.zeros_like(x)
    for part in chunks(len(samples), batch_size):
        rows, a = samples[part], alpha[step_index[part]].view(-1, 1, 1, 1)
        points = base[rows] + a * (x[rows] - base[rows])
        grads = _input_grad(module, points, fn, rows, output)
        total.index_add_(0, rows, grads * weight[step_index[part]].view(-1, 1, 1, 1))
    return (x - base) * total


@torch.no_grad()
def _occlusion(module: nn.Module, x: torch.Tensor, fn: Callable, logits: torch.Tensor,
               output: OutputSpec, batch_size: int, baseline: float | torch.Tensor,
               window: int | tuple[int, int], stride: int | tuple[int, int]) -> torch.Tensor:
    wh, ww = (window, window) if isinstance(window, int) else window
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    n, _, h, w = x.shape
    if not (0 < wh <= h and 0 < ww <= w and sh > 0 and sw > 0):
        raise ValueError(f"occlusion window {window} / stride {stride} do not fit a {h}x{w} input")
    # Like Captum: windows start every stride until one reaches the edge; the last may be
    # cut off by the border.
    tops = [i * sh for i in range(math.ceil((h - wh) / sh) + 1)]
    lefts = [i * sw for i in range(math.ceil((w - ww) / sw) + 1)]
    boxes = [(t, left) for t in tops for left in lefts]
    base = _baseline_like(x, baseline)
    every = torch.arange(n, device=x.device)
    original = _target_rows(fn, logits, every)
    samples, box_index = _expand(x, len(boxes))
    total = torch.zeros((n, h, w), dtype=x.dtype, device=x.device)
    count = torch.zeros((h, w), dtype=x.dtype, device=x.device)
    for t, left in boxes:
        count[t:t + wh, left:left + ww] += 1
    for part in chunks(len(samples), batch_size):
        rows = samples[part]
        batch = x[rows].clone()
        for j, (row, b) in enumerate(zip(rows.tolist(), box_index[part].tolist(), strict=True)):
            t, left = boxes[b]
            batch[j, :, t:t + wh, left:left + ww] = base[row, :, t:t + wh, left:left + ww]
        drop = original[rows] - _target_rows(fn, select_output(module(batch), output), rows)
        for j, (row, b) in enumerate(zip(rows.tolist(), box_index[part].tolist(), strict=True)):
            t, left = boxes[b]
            total[row, t:t + wh, left:left + ww] += drop[j]
    attribution = total / count.clamp(min=1)
    return attribution[:, None].expand_as(x).clone()


def heatmap(attribution: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` attributions -> ``(N, H, W)`` maps in [0, 1]: the largest absolute
    value over channels, min-max scaled per sample (the usual saliency display)."""
    if attribution.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) attributions, got {tuple(attribution.shape)}")
    return normalize(attribution.detach().abs().amax(dim=1).float())
