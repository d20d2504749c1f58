"""What an attribution explains: a class score, or any scalar the user computes from the
model's output.

A target is a small callable ``target(output) -> (N,) tensor`` (``ClassTarget(281)``), so
users can plug in their own scalar (a margin, a sum of classes, a detection score). Ints,
class names and per-sample lists are turned into such callables by :func:`resolve_targets`.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConvscopeError, TargetError, UnknownClassError


class AttributionError(ConvscopeError, RuntimeError):
    """An attribution that cannot be computed correctly (NaN gradients, no graph)."""

    exit_code = 1


class LayerOutputError(ConvscopeError, ValueError):
    """The chosen layer's output cannot carry a class activation map (not (N, C, H, W))."""

    exit_code = 2


@dataclass(frozen=True)
class ClassTarget:
    """The pre-softmax score (logit) of one class: ``ClassTarget(281)(logits) -> (N,)``."""

    index: int

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        if output.ndim != 2:
            raise TargetError(
                f"ClassTarget expects (N, classes) logits, got shape {tuple(output.shape)}"
            )
        if not 0 <= self.index < output.shape[1]:
            raise TargetError(
                f"target class {self.index} is out of range: the model has "
                f"{output.shape[1]} classes (0..{output.shape[1] - 1})"
            )
        return output[:, self.index]


#: What a ``target`` argument may be.
TargetSpec = int | str | Callable[[torch.Tensor], torch.Tensor] | Sequence[Any] | None
OutputSpec = int | str | Callable[[Any], torch.Tensor] | None


class _PerSample:
    """One target per sample: sample i's score is ``targets[i](output)[i]``."""

    def __init__(self, targets: list[Callable[[torch.Tensor], torch.Tensor]]):
        self.targets = targets

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        if len(self.targets) != output.shape[0]:
            raise TargetError(
                f"{len(self.targets)} targets were given for a batch of {output.shape[0]}"
            )
        return torch.stack([fn(output)[i] for i, fn in enumerate(self.targets)])

    def class_indices(self) -> list[int] | None:
        if all(isinstance(fn, ClassTarget) for fn in self.targets):
            return [fn.index for fn in self.targets]  # type: ignore[attr-defined]
        return None


def _one(spec: Any, class_names: Sequence[str] | None, num_classes: int | None
         ) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(spec, bool):
        raise TargetError("a target cannot be a bool")
    if isinstance(spec, torch.Tensor) and spec.numel() == 1 and not spec.is_floating_point():
        spec = int(spec.item())
    if isinstance(spec, numbers.Integral):  # also numpy integers
        spec = int(spec)
        if num_classes is not None and not 0 <= spec < num_classes:
            raise TargetError(
                f"target class {spec} is out of range: the model has {num_classes} classes "
                f"(0..{num_classes - 1})"
            )
        return ClassTarget(spec)
    if isinstance(spec, str):
        if spec.strip().lstrip("-").isdigit():
            return _one(int(spec), class_names, num_classes)
        if not class_names:
            raise TargetError(
                f"target {spec!r} is a class name, but the model has no class names; pass an "
                "index, or a LoadedModel (convscope.load_model) whose labels are known"
            )
        lowered = [name.lower() for name in class_names]
        if spec.strip().lower() not in lowered:
            raise UnknownClassError(spec, class_names)
        return ClassTarget(lowered.index(spec.strip().lower()))
    if callable(spec):
        return spec
    raise TargetError(
        "a target must be None, an int, a class name, a callable or a list of these; "
        f"got {type(spec).__name__}"
    )


def resolve_targets(
    spec: TargetSpec,
    output: torch.Tensor,
    *,
    class_names: Sequence[str] | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Turn a user's ``target`` into one callable ``output -> (N,)`` for this batch.

    ``None`` means each sample's top-1 class (read from ``output``, the logits of the
    unmodified input); an int or a class name the same class for every sample; a list or
    tuple one target per sample; a callable is used as is.
    """
    num_classes = output.shape[1] if output.ndim == 2 else None
    if spec is None:
        if output.ndim != 2:
            raise TargetError(
                f"the model output has shape {tuple(output.shape)}, not (N, classes); pass a "
                "callable target (or output=) that reduces it to one score per sample"
            )
        return _PerSample([ClassTarget(int(i)) for i in output.argmax(dim=1).tolist()])
    if hasattr(spec, "ndim") and hasattr(spec, "tolist") and spec.ndim == 1:
        spec = spec.tolist()  # a 1-D tensor or numpy array: one target per sample
    if isinstance(spec, (list, tuple)):
        _check_count(len(spec), output.shape[0])
        return _PerSample([_one(item, class_names, num_classes) for item in spec])
    return _one(spec, class_names, num_classes)


def split_target(spec: TargetSpec, part: slice, n: int) -> TargetSpec:
    """The part of ``spec`` that belongs to samples ``part`` of a batch of ``n``.

    Per-sample forms (a list, a tuple, a 1-D tensor or array, a resolved per-sample target)
    are sliced with the batch; a single target (None, an int, a class name, a callable) is
    the same for every part. A callable is applied to each part's output, so it must score
    any batch of rows (``lambda out: out[:, 3]``), not one fixed batch.
    """
    if isinstance(spec, _PerSample):
        _check_count(len(spec.targets), n)
        return _PerSample(spec.targets[part])
    if hasattr(spec, "ndim") and hasattr(spec, "__getitem__") and spec.ndim == 1:
        _check_count(len(spec), n)  # a 1-D tensor or numpy array
        return spec[part]
    if isinstance(spec, (list, tuple)):
        _check_count(len(spec), n)
        return list(spec)[part]
    return spec


def _check_count(count: int, n: int) -> None:
    if count != n:
        raise TargetError(
            f"{count} targets were given for a batch of {n} samples; give one per sample, "
            "or a single target for all"
        )


def class_indices(target: Callable[[torch.Tensor], torch.Tensor], n: int) -> list[int] | None:
    """Class index of each sample when the target is a plain class target, else None."""
    if isinstance(target, ClassTarget):
        return [target.index] * n
    if isinstance(target, _PerSample):
        return target.class_indices()
    return None


def select_output(raw: Any, output: OutputSpec = None) -> torch.Tensor:
    """The logits tensor in whatever the model returned.

    ``output`` picks it explicitly: an int (tuple position), a str (dict key or attribute)
    or a callable. Otherwise a tensor is used as is; a tuple/list gives its first tensor; a
    dict its ``"logits"``/``"out"`` entry, or its only tensor.
    """
    if output is not None:
        if callable(output) and not isinstance(output, (int, str)):
            picked = output(raw)
        elif isinstance(output, int) and isinstance(raw, (tuple, list)):
            if not -len(raw) <= output < len(raw):
                raise TargetError(f"output={output} but the model returned {len(raw)} values")
            picked = raw[output]
        elif isinstance(output, str) and isinstance(raw, dict):
            if output not in raw:
                raise TargetError(f"output={output!r} is not a key of the model's output "
                                  f"(keys: {', '.join(map(str, raw))})")
            picked = raw[output]
        elif isinstance(output, str) and hasattr(raw, output):
            picked = getattr(raw, output)
        else:
            raise TargetError(
                f"output={output!r} cannot select from a {type(raw).__name__} model output"
            )
        if not isinstance(picked, torch.Tensor):
            raise TargetError(f"output={output!r} selected a {type(picked).__name__}, not a tensor")
        return picked
    if isinstance(raw, torch.Tensor):
        return raw
    from ..models import logits_of  # the one rule for where a model output keeps its logits

    try:
        return logits_of(raw)
    except ConvscopeError as error:
        raise TargetError(f"{error}; pass output= (an index, a key or a callable)") from None


def unwrap_model(model: Any) -> tuple[torch.nn.Module, list[str] | None]:
    """``(nn.Module, class_names)`` from an ``nn.Module`` or a ``LoadedModel``."""
    if isinstance(model, torch.nn.Module):
        return model, None
    module = getattr(model, "module", None)
    if isinstance(module, torch.nn.Module):
        return module, getattr(model, "class_names", None)
    raise TypeError(
        f"model must be a torch.nn.Module or a convscope LoadedModel, got {type(model).__name__}"
    )
