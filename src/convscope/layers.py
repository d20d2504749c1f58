"""Layer selection by dotted name, glob, module type or object, and the layer table.

Everything in convscope that takes a ``layers`` argument goes through
:func:`resolve_layers`, so the same selectors work in the Python API, the CLI and the
server. :func:`list_layers` runs one forward pass on a dummy input to report each layer's
output shape and receptive field.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .errors import UnknownLayerError

#: What a ``layers`` argument may be: one selector or a list of them.
LayerSelector = str | int | type | nn.Module
LayerSpec = LayerSelector | Sequence[LayerSelector]

_GLOB_CHARS = set("*?[")


def layer_names(model: nn.Module) -> list[str]:
    """Dotted names of every submodule of ``model`` (the root excluded), in model order."""
    return [name for name, _ in model.named_modules() if name]


def _is_glob(text: str) -> bool:
    return any(ch in _GLOB_CHARS for ch in text)


def _selector_list(spec: LayerSpec) -> list[LayerSelector]:
    if isinstance(spec, (str, int, type, nn.Module)):
        return [spec]
    if isinstance(spec, Iterable):
        items = list(spec)
        if not items:
            raise ValueError("no layers selected: the layer list is empty")
        return items
    raise TypeError(
        "layers must be a name, glob pattern, module class, module, int or a list of these; "
        f"got {type(spec).__name__}"
    )


def resolve_layers(model: nn.Module, spec: LayerSpec) -> dict[str, nn.Module]:
    """Map a layer selector to ``{dotted_name: module}``, in the model's module order.

    ``spec`` may be a dotted name (``"features.28"``), a glob (``"features.*"``,
    ``"layer4.*.conv?"``), ``"all"`` (every submodule), a module class (``nn.Conv2d``,
    matched with ``isinstance``), a module object (matched by identity), an int (index of a
    child, as in ``model[0]``), or a list mixing these. A selector that matches nothing
    raises :class:`~convscope.errors.UnknownLayerError` with close-match suggestions.
    """
    named = [(name, module) for name, module in model.named_modules() if name]
    by_name = dict(named)
    chosen: set[str] = set()
    for selector in _selector_list(spec):
        chosen.update(_match(model, named, by_name, selector))
    return {name: module for name, module in named if name in chosen}


def _match(
    model: nn.Module,
    named: list[tuple[str, nn.Module]],
    by_name: dict[str, nn.Module],
    selector: LayerSelector,
) -> list[str]:
    names = [name for name, _ in named]
    if isinstance(selector, bool):
        raise TypeError("a layer selector cannot be a bool")
    if isinstance(selector, int):
        key = str(selector)
        if key in by_name:
            return [key]
        children = [name for name, _ in model.named_children()]
        raise UnknownLayerError(key, children)
    if isinstance(selector, str):
        text = selector.strip()
        if text == "all":
            return names
        if text.endswith(".weight") or text.endswith(".bias"):
            text = text.rsplit(".", 1)[0]
        if text in by_name:
            return [text]
        if _is_glob(text):
            hits = fnmatch.filter(names, text)
            if hits:
                return hits
            raise UnknownLayerError(text, names, hint="the glob pattern matched no layer")
        raise UnknownLayerError(text, names)
    if isinstance(selector, type) and issubclass(selector, nn.Module):
        hits = [name for name, module in named if isinstance(module, selector)]
        if hits:
            return hits
        types = sorted({type(module).__name__ for _, module in named})
        raise UnknownLayerError(
            selector.__name__, types, hint="no module of this type in the model"
        )
    if isinstance(selector, nn.Module):
        hits = [name for name, module in named if module is selector]
        if hits:
            return hits[:1]
        raise UnknownLayerError(
            type(selector).__name__, [], hint="this module object is not part of the model"
        )
    raise TypeError(
        "a layer selector must be a name, glob pattern, module class, module or int; "
        f"got {type(selector).__name__}"
    )


# --------------------------------------------------------------------------------------
# Layer table with output shapes and receptive fields.


@dataclass(frozen=True)
class ReceptiveField:
    """Where one output position of a layer looks in the input image.

    Position ``(i, j)`` of the layer's output is centred on input pixel
    ``(start[0] + i * stride[0], start[1] + j * stride[1])`` and covers ``size`` pixels per
    axis (the theoretical receptive field; it can exceed the image).
    """

    size: tuple[int, int]
    stride: tuple[int, int]
    start: tuple[float, float]

    def box(self, row: int, col: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Input-pixel box ``(top, left, bottom, right)`` of output position ``(row, col)``,
        clipped to an image of ``height`` x ``width``; bottom/right are exclusive."""
        centre_r = self.start[0] + row * self.stride[0]
        centre_c = self.start[1] + col * self.stride[1]
        top = math.floor(centre_r - (self.size[0] - 1) / 2)
        left = math.floor(centre_c - (self.size[1] - 1) / 2)
        bottom = top + self.size[0]
        right = left + self.size[1]
        return (max(top, 0), max(left, 0), min(bottom, height), min(right, width))

    def boxes(self, rows: Any, cols: Any, height: int, width: int) -> Any:
        """:meth:`box` for arrays of output positions at once: ``(..., 4)`` int array."""
        import numpy as np

        rows, cols = np.asarray(rows, dtype=np.float64), np.asarray(cols, dtype=np.float64)
        top = np.floor(self.start[0] + rows * self.stride[0] - (self.size[0] - 1) / 2)
        left = np.floor(self.start[1] + cols * self.stride[1] - (self.size[1] - 1) / 2)
        return np.stack([np.maximum(top, 0), np.maximum(left, 0),
                         np.minimum(top + self.size[0], height),
                         np.minimum(left + self.size[1], width)], axis=-1).astype(np.int32)


@dataclass(frozen=True)
class LayerInfo:
    """One row of :func:`list_layers`."""

    name: str
    type: str
    output_shape: tuple[int, ...] | None
    params: int
    calls: int
    receptive_field: ReceptiveField | None
    #: The receptive field of every call, for modules run several times per forward.
    call_fields: tuple[ReceptiveField | None, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (receptive field as size/stride/start lists)."""
        row = asdict(self)
        del row["call_fields"]
        row["output_shape"] = list(self.output_shape) if self.output_shape else None
        rf = self.receptive_field
        row["receptive_field"] = (
            None
            if rf is None
            else {"size": list(rf.size), "stride": list(rf.stride), "start": list(rf.start)}
        )
        return row


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return (int(value[0]), int(value[-1]))
    return (int(value), int(value))


_Field = tuple[tuple[int, int], tuple[int, int], tuple[float, float]]  # size, stride, start
_IDENTITY_FIELD: _Field = ((1, 1), (1, 1), (0.0, 0.0))


def _windowed(
    field: _Field, kernel: Any, stride: Any, dilation: Any, padding: Any, in_hw: Any, out_hw: Any
) -> _Field:
    """Receptive field after a sliding-window layer (conv or pool).

    Padding is inferred from the input and output sizes when the module's own padding
    attribute is zero but the output is larger than a valid convolution gives: that is how
    TensorFlow-style "same" convolutions (EfficientNet ports) pad inside ``forward``.
    """
    size, jump, start = field
    k, s, d = _pair(kernel), _pair(stride), _pair(dilation)
    if isinstance(padding, str):
        padding = (0, 0) if padding == "valid" else None
    pad = _pair(padding) if padding is not None else None
    new_size, new_jump, new_start = [], [], []
    for axis in range(2):
        extent = (k[axis] - 1) * d[axis] + 1
        explicit = pad[axis] if pad is not None else 0
        implied_total = (out_hw[axis] - 1) * s[axis] + extent - in_hw[axis]
        left = explicit
        if (pad is None or explicit == 0) and implied_total > 0:
            left = implied_total // 2
        new_size.append(size[axis] + (extent - 1) * jump[axis])
        new_jump.append(jump[axis] * s[axis])
        new_start.append(start[axis] + ((extent - 1) / 2 - left) * jump[axis])
    return (
        (new_size[0], new_size[1]),
        (new_jump[0], new_jump[1]),
        (new_start[0], new_start[1]),
    )


_WINDOW_TYPES = (
    nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d,
    nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
)


def _next_field(module: nn.Module, field: _Field, in_hw: Any, out_hw: Any) -> _Field | None:
    """Receptive field of ``module``'s output given its input's, or None when unknown."""
    if isinstance(module, nn.Conv2d):
        return _windowed(
            field, module.kernel_size, module.stride, module.dilation, module.padding,
            in_hw, out_hw,
        )
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        stride = module.stride if module.stride else module.kernel_size
        dilation = getattr(module, "dilation", 1)
        return _windowed(
            field, module.kernel_size, stride, dilation, module.padding, in_hw, out_hw
        )
    if isinstance(module, (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d,
                           nn.ReplicationPad2d)):
        left, _, top, _ = module.padding
        size, jump, start = field
        return (size, jump, (start[0] - top * jump[0], start[1] - left * jump[1]))
    if tuple(in_hw) == tuple(out_hw):
        return field  # pointwise in space: norms, activations, 1x1 adaptive identity
    return None


def list_layers(
    model: nn.Module,
    input_size: Sequence[int] | None = (3, 224, 224),
    *,
    example_input: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> list[LayerInfo]:
    """Table of every submodule: name, type, output shape, parameters, receptive field.

    Runs one forward pass of a zero batch of ``input_size`` (C, H, W) in eval mode under
    ``torch.no_grad`` (training flags are restored afterwards) and records, for each module,
    the output shape of its last call and how often it ran. Receptive fields are tracked
    through conv, pooling and padding layers for every module with a spatial (4D) output;
    branches joined by functional ops (residual adds) inherit the field of the most recent
    module output of the same spatial size, which is the larger, main path in ResNets and
    EfficientNets. Modules the forward pass never reached have ``output_shape=None``.
    With ``input_size=None`` and no ``example_input``, only names, types and parameter
    counts are reported.
    """
    named = [(name, module) for name, module in model.named_modules() if name]
    params = {
        name: sum(p.numel() for p in module.parameters()) for name, module in named
    }
    shapes: dict[str, tuple[int, ...]] = {}
    calls: dict[str, int] = {}
    fields: dict[str, list[_Field | None]] = {}

    if example_input is not None or input_size is not None:
        if example_input is None:
            if device is None:
                first = next(model.parameters(), None)
                device = first.device if first is not None else "cpu"
            example_input = torch.zeros((1, *input_size), device=device)
        _trace(model, named, example_input, shapes, calls, fields)

    return [
        LayerInfo(
            name=name,
            type=type(module).__name__,
            output_shape=shapes.get(name),
            params=params[name],
            calls=calls.get(name, 0),
            receptive_field=_to_rf(fields[name][-1]) if fields.get(name) else None,
            call_fields=tuple(_to_rf(field) for field in fields.get(name, [])),
        )
        for name, module in named
    ]


def _to_rf(field: _Field | None) -> ReceptiveField | None:
    if field is None:
        return None
    size, stride, start = field
    return ReceptiveField(size=size, stride=stride, start=start)


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor in a module output (a tensor, or nested tuples/lists/dicts)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            found = first_tensor(item)
            if found is not None:
                return found
    if isinstance(value, dict):
        for item in value.values():
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def _trace(
    model: nn.Module,
    named: list[tuple[str, nn.Module]],
    example: torch.Tensor,
    shapes: dict[str, tuple[int, ...]],
    calls: dict[str, int],
    fields: dict[str, list[_Field | None]],
) -> None:
    """One forward pass that records shapes and propagates receptive fields."""
    from .hooks import forward_hooks, preserve_training

    input_hw = tuple(example.shape[-2:]) if example.dim() == 4 else None
    # id(tensor) -> (tensor kept alive so the id stays unique, its field)
    known: dict[int, tuple[torch.Tensor, _Field | None]] = {}
    if input_hw is not None:
        known[id(example)] = (example, _IDENTITY_FIELD)
    recent: list[tuple[tuple[int, int], _Field]] = []  # (spatial size, field), newest last
    leaf = {name: not any(True for _ in module.children()) for name, module in named}

    def field_of(tensor: torch.Tensor | None) -> _Field | None:
        if tensor is None or tensor.dim() != 4:
            return None
        entry = known.get(id(tensor))
        if entry is not None and entry[0] is tensor:
            return entry[1]
        hw = tuple(tensor.shape[-2:])
        for spatial, field in reversed(recent):
            if spatial == hw:
                return field
        return _IDENTITY_FIELD if hw == input_hw and not recent else None

    def hook(name: str, module: nn.Module, inputs: tuple, output: Any) -> None:
        out = first_tensor(output)
        calls[name] = calls.get(name, 0) + 1
        if out is not None:
            shapes[name] = tuple(out.shape[1:])
        src = first_tensor(inputs)
        field: _Field | None = None
        if out is not None and out.dim() == 4 and src is not None and src.dim() == 4:
            if leaf[name] or isinstance(module, _WINDOW_TYPES):
                in_field = field_of(src)
                if in_field is not None:
                    field = _next_field(
                        module, in_field, tuple(src.shape[-2:]), tuple(out.shape[-2:])
                    )
            else:
                # A container returns its last child's tensor (already known) or the result
                # of a functional op such as a residual add: take the newest field of that
                # spatial size, which is the main path's.
                field = field_of(out)
        fields.setdefault(name, []).append(field)
        if out is not None and field is not None:
            known[id(out)] = (out, field)
            recent.append((tuple(out.shape[-2:]), field))

    with preserve_training(model), torch.no_grad(), forward_hooks(dict(named), hook):
        model.eval()
        model(example)


# --------------------------------------------------------------------------------------
# Execution order: which layers run, in which order (for picking overview layers).

_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Softplus, nn.Tanh,
)


@dataclass(frozen=True)
class LayerCall:
    """One call of a leaf module during a forward pass (``call`` counts from 0)."""

    name: str
    call: int
    type: str
    output_shape: tuple[int, ...] | None = None


def execution_order(model: nn.Module, example: torch.Tensor) -> list[LayerCall]:
    """Leaf modules in the order the forward pass of ``example`` calls them (eval mode,
    no gradients; training flags restored)."""
    from .hooks import forward_hooks, preserve_training

    leaves = {name: module for name, module in model.named_modules()
              if name and not any(True for _ in module.children())}
    # Conv subclasses with a padding child (TF-style "same" convs) still count as convs.
    leaves.update({name: module for name, module in model.named_modules()
                   if name and isinstance(module, nn.Conv2d)})
    order: list[LayerCall] = []
    seen: dict[str, int] = {}

    def hook(name: str, module: nn.Module, _inputs: tuple, output: Any) -> None:
        out = first_tensor(output)
        shape = tuple(out.shape[1:]) if out is not None else None
        order.append(LayerCall(name, seen.get(name, 0), type(module).__name__, shape))
        seen[name] = seen.get(name, 0) + 1

    with preserve_training(model), torch.no_grad(), forward_hooks(leaves, hook):
        model.eval()
        model(example)
    return order


def overview_layers(model: nn.Module, example: torch.Tensor) -> dict[str, LayerCall]:
    """The seed tutorial's four views: ``first_conv``, ``middle_conv``, ``last_conv`` (2D
    convolutions in call order) and ``first_activation`` (the first activation function
    called after the first conv, with its call index when the module is reused)."""
    modules = dict(model.named_modules())
    order = execution_order(model, example)
    convs: list[LayerCall] = []
    for call in order:
        spatial = call.output_shape is not None and len(call.output_shape) == 3 and (
            call.output_shape[1] * call.output_shape[2] > 1
        )  # skips squeeze-excitation convs on 1x1 maps
        if (isinstance(modules[call.name], nn.Conv2d) and spatial
                and all(c.name != call.name for c in convs)):
            convs.append(call)
    if not convs:
        raise ValueError("the model ran no 2D convolution on this input")
    picked = {"first_conv": convs[0], "middle_conv": convs[len(convs) // 2],
              "last_conv": convs[-1]}
    start = order.index(convs[0])
    for call in order[start + 1:]:
        if isinstance(modules[call.name], _ACTIVATIONS):
            picked["first_activation"] = call
            break
    return picked
