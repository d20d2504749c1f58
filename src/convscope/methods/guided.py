"""Guided backpropagation's rule for the ReLU family, applied during one forward pass.

Guided backpropagation (Springenberg et al., 2015) changes the backward pass of every
rectifier: only positive gradients pass, and only where the activation's own derivative is
non-zero. Here the rule is a gradient hook on each rectifier's output that keeps the positive
part of the incoming gradient; the op's own backward then applies its local derivative, so

* ReLU, ``relu_``, ``clamp(min=0)``, Threshold: ``relu(g) * (x > 0)`` (``x >= 0`` for clamp);
* ReLU6, Hardtanh, ``clamp(min=0, max=b)``: ``relu(g)`` inside the linear range only;
* LeakyReLU, RReLU (eval), PReLU: ``relu(g)`` scaled by the local slope (1 or the slope),
  the guided convention for leaky rectifiers.

Rectifiers are found by what runs, not by module type: a :class:`~torch.overrides.TorchFunctionMode`
sees ``nn.ReLU``/``nn.ReLU6``/``nn.LeakyReLU`` modules (which call ``F.relu``,
``F.hardtanh``, ``F.leaky_relu``) and functional calls (``F.relu``, ``torch.relu``,
``x.relu_()``, ``F.relu6``, ``torch.clamp(x, min=0)``, ``x.clamp(0, 6)``...) alike. The mode
is entered only around the model's forward pass of one attribution call and never left
installed. A tensor hook (not a replacement op) keeps in-place rectifiers in place, and it
also works when the caller ignores the return value of ``x.relu_()``.

Clamps count as rectifiers only with a lower bound of exactly 0 (``x.clamp(min=1e-6)`` in
a normalisation is not an activation). Other activations (SiLU, GELU, Hardswish, sigmoid,
tanh...) keep their ordinary gradient; a model in which no rectifier runs is refused with
:class:`GuidedBackpropError`, because guided backpropagation would silently equal the
plain gradient there.
"""

from __future__ import annotations

import numbers
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import ConvscopeError
from .common import log

#: Activation modules whose functional call the guided rule applies to.
FAMILY_MODULES = ("ReLU", "ReLU6", "LeakyReLU", "RReLU", "PReLU", "Hardtanh", "Threshold")


class GuidedBackpropError(ConvscopeError, ValueError):
    """Guided backpropagation asked of a model in which no ReLU-family activation runs."""

    exit_code = 2


def _functions(*names: str) -> list[Callable]:
    """The callables ``torch.X``, ``torch.Tensor.X``, ``F.X`` that exist for each name."""
    found = []
    for name in names:
        for owner in (torch, torch.Tensor, F):
            fn = getattr(owner, name, None)
            if fn is not None:
                found.append(fn)
    return found


def _rectifier_table() -> dict[Callable, str]:
    table: dict[Callable, str] = {}
    for label, names in (
        ("relu", ("relu", "relu_")),
        ("relu6", ("relu6",)),
        ("hardtanh", ("hardtanh", "hardtanh_")),
        ("leaky_relu", ("leaky_relu", "leaky_relu_")),
        ("rrelu", ("rrelu", "rrelu_")),
        ("prelu", ("prelu",)),
        ("threshold", ("threshold", "threshold_")),
    ):
        for fn in _functions(*names):
            table.setdefault(fn, label)
    return table


def _clamp_table() -> dict[Callable, bool]:
    """Clamp callables; the value says whether the lower bound is the only argument."""
    table: dict[Callable, bool] = {}
    for fn in _functions("clamp", "clamp_", "clip", "clip_"):
        table.setdefault(fn, False)
    for fn in _functions("clamp_min", "clamp_min_"):
        table.setdefault(fn, True)
    return table


def _other_table() -> dict[Callable, str]:
    names = ("silu", "gelu", "hardswish", "mish", "elu", "selu", "celu", "softplus",
             "hardsigmoid", "sigmoid", "sigmoid_", "tanh", "tanh_", "logsigmoid", "glu",
             "softsign", "tanhshrink", "hardshrink", "softshrink", "elu_", "celu_", "selu_")
    table: dict[Callable, str] = {}
    for name in names:
        for fn in _functions(name):
            table.setdefault(fn, name.rstrip("_"))
    return table


def _is_zero(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == 0


def _clamp_is_rectifier(only_min: bool, args: tuple, kwargs: dict) -> bool:
    """``clamp(x, min=0)`` or ``clamp(x, 0, b)`` with ``b > 0``: a ReLU or a ReLU6-like cap."""
    low = args[1] if len(args) > 1 else kwargs.get("min")
    if only_min:
        return _is_zero(low)
    high = args[2] if len(args) > 2 else kwargs.get("max")
    if not _is_zero(low):
        return False
    return high is None or (isinstance(high, numbers.Real) and high > 0)


def _positive(grad: torch.Tensor) -> torch.Tensor:
    return grad.clamp(min=0)


class _GuidedMode(TorchFunctionMode):
    """Hooks the output of every rectifier called while active; counts activations seen."""

    def __init__(self, record: Counter) -> None:
        super().__init__()
        self.record = record
        self.rectifiers = _rectifier_table()
        self.clamps = _clamp_table()
        self.others = _other_table()

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)  # the mode is off inside: nested calls are not seen
        label = self.rectifiers.get(func)
        if (label is None and func in self.clamps
                and _clamp_is_rectifier(self.clamps[func], args, kwargs)):
            label = "clamp(min=0)"
        if label is None:
            other = self.others.get(func)
            if other is not None:
                self.record["other:" + other] += 1
            return result
        self.record["guided:" + label] += 1
        if isinstance(result, torch.Tensor) and result.requires_grad:
            # Keeps the positive part of d score / d output; the op's own backward then
            # applies its local derivative (0 outside the linear range, the leaky slope).
            # Registered on the tensor as it is now, so later in-place ops do not move it.
            result.register_hook(_positive)
        return result


class GuidedForward:
    """Runs ``module`` with the guided rule on its rectifiers; refuses a model without any.

    One object per attribution call: ``guide(x)`` is the model's forward pass (the mode is
    active only inside it), ``guide.record`` counts what ran, for the error message.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.record: Counter = Counter()
        self._checked = False

    def __call__(self, x: torch.Tensor) -> Any:
        record: Counter = Counter()
        with _GuidedMode(record):
            raw = self.module(x)
        self.record.update(record)
        if not self._checked:
            self._check(record)
            self._checked = True
        return raw

    def _check(self, record: Counter) -> None:
        guided = sorted(k.split(":", 1)[1] for k in record if k.startswith("guided:"))
        others = {k.split(":", 1)[1]: n for k, n in record.items() if k.startswith("other:")}
        modules = sorted({type(m).__name__ for m in self.module.modules()
                          if type(m).__module__ == "torch.nn.modules.activation"})
        if not guided:
            found = ", ".join(f"{name} ({n} call{'s' * (n > 1)})"
                              for name, n in sorted(others.items())) or "none"
            raise GuidedBackpropError(
                "guided_backprop applies its rule to ReLU-family activations (ReLU, ReLU6, "
                "LeakyReLU, RReLU, PReLU, Hardtanh, Threshold, clamp(min=0)), but none ran "
                f"in this model's forward pass; activations found: {found}"
                + (f"; activation modules: {', '.join(modules)}" if modules else "")
                + ". Guided backpropagation would equal the plain gradient here: use "
                "method='vanilla', 'smoothgrad' or 'integrated_gradients'"
            )
        if others:
            log.info("guided_backprop: guided rule on %s; ordinary gradients through %s",
                     ", ".join(guided), ", ".join(sorted(others)))
