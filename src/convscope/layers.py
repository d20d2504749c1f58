"""Layer selection by dotted name, glob, module type or object, and the layer table.

Everything in convscope that takes a ``layers`` argument goes through
:func:`resolve_layers`, so the same selectors work in the Python API, the CLI and the
server. :func:`list_layers` runs one forward pass on a dummy input to report each layer's
output shape and receptive field.
"""

from __future__ import annotations

import fnmatch
import math
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import ConvscopeError, UnknownLayerError

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
    names = list(by_name)  # once, not per selector: capture resolves on every call
    chosen: set[str] = set()
    for selector in _selector_list(spec):
        if isinstance(selector, str) and selector != "all" and selector in by_name:
            chosen.add(selector)
        else:
            chosen.update(_match(model, named, names, by_name, selector))
    return {name: module for name, module in named if name in chosen}


def _match(
    model: nn.Module,
    named: list[tuple[str, nn.Module]],
    names: list[str],
    by_name: dict[str, nn.Module],
    selector: LayerSelector,
) -> list[str]:
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


class InputSizeError(ConvscopeError, ValueError):
    """An ``input_size`` or example input that the layer table cannot use."""

    exit_code = 2


@dataclass(frozen=True)
class ReceptiveField:
    """Where one output position of a layer looks in the input image.

    Position ``(i, j)`` of the layer's output sees the input box centred on pixel
    ``(start[0] + i * stride[0], start[1] + j * stride[1])`` that is ``size`` pixels tall
    and wide: rows ``start[0] + i * stride[0] - (size[0] - 1) / 2`` to
    ``start[0] + i * stride[0] + (size[0] - 1) / 2`` inclusive, and likewise for columns.
    This is the theoretical receptive field, the bounding box of every input pixel that can
    influence the position; it can exceed the image.

    ``start`` is the centre of position 0's *box*. For a plain chain of windows it is also
    the centre of the middle kernel tap; where branches with different kernels or paddings
    are joined (Inception's 1x7 and 7x1 paths) the joined box need not be centred on any
    tap, and ``start`` is still its centre, so :meth:`box` is exact. The box edges are
    integers; ``start`` is a whole or half pixel.
    """

    size: tuple[int, int]
    stride: tuple[int, int]
    start: tuple[float, float]

    def box(self, row: int, col: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Input-pixel box ``(top, left, bottom, right)`` of output position ``(row, col)``,
        clipped to an image of ``height`` rows and ``width`` columns; bottom/right are
        exclusive."""
        centre_r = self.start[0] + row * self.stride[0]
        centre_c = self.start[1] + col * self.stride[1]
        top = math.floor(centre_r - (self.size[0] - 1) / 2)
        left = math.floor(centre_c - (self.size[1] - 1) / 2)
        bottom = top + self.size[0]
        right = left + self.size[1]
        return (
            min(max(top, 0), height), min(max(left, 0), width),
            max(min(bottom, height), 0), max(min(right, width), 0),
        )

    def boxes(self, rows: Any, cols: Any, height: int, width: int) -> Any:
        """:meth:`box` for arrays of output positions at once: ``(..., 4)`` int array."""
        import numpy as np

        rows, cols = np.asarray(rows, dtype=np.float64), np.asarray(cols, dtype=np.float64)
        top = np.floor(self.start[0] + rows * self.stride[0] - (self.size[0] - 1) / 2)
        left = np.floor(self.start[1] + cols * self.stride[1] - (self.size[1] - 1) / 2)
        bottom, right = top + self.size[0], left + self.size[1]
        return np.stack([np.clip(top, 0, height), np.clip(left, 0, width),
                         np.clip(bottom, 0, height), np.clip(right, 0, width)],
                        axis=-1).astype(np.int32)


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


def list_layers(
    model: nn.Module,
    input_size: Sequence[int] | None = (3, 224, 224),
    *,
    example_input: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> LayerTable:
    """Table of every submodule: name, type, output shape, parameters, receptive field.

    Runs one forward pass of a zero input of ``input_size`` ((C, H, W), or (N, C, H, W)) in
    eval mode under ``torch.no_grad`` (training flags are restored afterwards) and records,
    for each module, the output shape of its last call and how often it ran. Modules the
    forward pass never reached have ``output_shape=None``. With ``input_size=None`` and no
    ``example_input``, only names, types and parameter counts are reported.

    Receptive fields follow the actual data flow of that pass, op by op: every conv,
    pooling and padding call (modules or ``torch.nn.functional``, so TF-"same" padding
    inside ``forward`` counts) widens or shifts the field, and tensors joined by
    ``torch.cat``, additions or products get the union of their inputs' fields, so
    parallel branches (Inception's 1x7 and 7x1 paths, ResNet shortcuts) are exact. A field is ``None`` where no
    box describes the position: after a resize or adaptive pool to another size, attention
    over tokens (ViT, Swin, MaxViT report fields up to their patch embedding and stem only),
    or any output that is not an (N, C, H, W) map. Two conventions, as in the receptive-field
    literature: normalisation layers count as pointwise, and gates broadcast from a 1x1 map
    (squeeze-and-excitation) are left out, since they summarise the whole image.
    """
    named = [(name, module) for name, module in model.named_modules() if name]
    params = {
        name: sum(p.numel() for p in module.parameters()) for name, module in named
    }
    shapes: dict[str, tuple[int, ...]] = {}
    calls: dict[str, int] = {}
    fields: dict[str, list[ReceptiveField | None]] = {}

    if example_input is not None or input_size is not None:
        if example_input is None:
            first = next(model.parameters(), None)
            if device is None:
                device = first.device if first is not None else "cpu"
            dtype = first.dtype if first is not None and first.is_floating_point() else None
            example_input = torch.zeros(_batch_shape(input_size), device=device, dtype=dtype)
        _trace(model, named, example_input, shapes, calls, fields)

    return LayerTable(
        LayerInfo(
            name=name,
            type=type(module).__name__,
            output_shape=shapes.get(name),
            params=params[name],
            calls=calls.get(name, 0),
            receptive_field=fields[name][-1] if fields.get(name) else None,
            call_fields=tuple(fields.get(name, [])),
        )
        for name, module in named
    )


class LayerTable(list):
    """The rows of :func:`list_layers`: a plain list of :class:`LayerInfo` that also shows
    itself as a table in a notebook (``_repr_html_``)."""

    def _repr_html_(self) -> str:
        import html

        head = ("<tr><th>layer</th><th>type</th><th>output</th><th>params</th>"
                "<th>calls</th><th>receptive field</th><th>stride</th></tr>")
        rows = []
        for row in self:
            rf = row.receptive_field
            shape = "×".join(map(str, row.output_shape)) if row.output_shape else "—"
            size = "×".join(map(str, rf.size)) if rf else ""
            stride = "×".join(map(str, rf.stride)) if rf else ""
            rows.append(
                f"<tr><td><code>{html.escape(row.name)}</code></td>"
                f"<td>{html.escape(row.type)}</td><td>{shape}</td>"
                f'<td style="text-align:right">{row.params:,}</td>'
                f'<td style="text-align:right">{row.calls}</td><td>{size}</td><td>{stride}</td></tr>'
            )
        return f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def _batch_shape(input_size: Sequence[int]) -> tuple[int, ...]:
    """(N, C, H, W) from an ``input_size`` of (C, H, W) or (N, C, H, W)."""
    try:
        size = tuple(int(s) for s in input_size)
    except (TypeError, ValueError) as err:
        raise InputSizeError(
            f"input_size must be (C, H, W) or (N, C, H, W) integers; got {input_size!r}"
        ) from err
    if len(size) not in (3, 4) or any(s <= 0 for s in size):
        raise InputSizeError(
            f"input_size must be (C, H, W) or (N, C, H, W) with positive sizes; got {size}"
        )
    return size if len(size) == 4 else (1, *size)


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
    fields: dict[str, list[ReceptiveField | None]],
) -> None:
    """One forward pass that records shapes and the receptive field of every output."""
    from .hooks import forward_hooks, preserve_training

    tracker = _FieldTracker()
    if example.dim() == 4:
        tracker.set(example, _Info(_IDENTITY, (2, 3)))

    def hook(name: str, module: nn.Module, inputs: tuple, output: Any) -> None:
        out = first_tensor(output)
        calls[name] = calls.get(name, 0) + 1
        if out is not None:
            shapes[name] = tuple(out.shape[1:])
        info = tracker.info(out) if out is not None and out.dim() == 4 else None
        field = None
        if info is not None and info.spans is not None and info.axes == (2, 3):
            field = _to_rf(info.spans)
        fields.setdefault(name, []).append(field)

    with preserve_training(model), torch.no_grad(), forward_hooks(dict(named), hook):
        model.eval()
        try:
            with tracker:
                model(example)
        except RuntimeError as err:
            raise InputSizeError(
                f"the model cannot run on a zero input of shape {tuple(example.shape)}: "
                f"{str(err).splitlines()[0] if str(err) else type(err).__name__} "
                "(input_size is (C, H, W) or (N, C, H, W) and must match the model's "
                "channels and minimum size)"
            ) from err


# --------------------------------------------------------------------------------------
# Receptive fields along the data flow of one forward pass.

#: One axis of a field: position ``i`` covers input pixels ``[lo + i*jump, lo + i*jump +
#: size)``. Integers throughout, so windows and unions are exact.
_Span = tuple[int, int, int]  # (lo, size, jump)
_Spans = tuple[_Span, _Span]  # (rows, cols)
_IDENTITY: _Spans = ((0, 1, 1), (0, 1, 1))


@dataclass(frozen=True)
class _Info:
    """What the tracker knows about one tensor derived from the input."""

    #: The field of each position, or None where no box describes it.
    spans: _Spans | None
    #: The tensor dims holding rows and columns (2, 3 for NCHW), or None once lost.
    axes: tuple[int, int] | None


_UNKNOWN = _Info(None, None)


def _to_rf(spans: _Spans) -> ReceptiveField:
    (lo_r, size_r, jump_r), (lo_c, size_c, jump_c) = spans
    return ReceptiveField(
        size=(size_r, size_c),
        stride=(jump_r, jump_c),
        start=(lo_r + (size_r - 1) / 2, lo_c + (size_c - 1) / 2),
    )


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return (int(value[0]), int(value[-1]))
    return (int(value), int(value))


def _union(spans: list[_Spans | None]) -> _Spans | None:
    """The smallest field containing all ``spans`` (same stride per axis), else None."""
    if not spans or any(s is None for s in spans):
        return None
    joined = []
    for axis in range(2):
        axis_spans = [s[axis] for s in spans]  # type: ignore[index]
        if len({jump for _, _, jump in axis_spans}) != 1:
            return None
        lo = min(lo for lo, _, _ in axis_spans)
        hi = max(lo + size for lo, size, _ in axis_spans)
        joined.append((lo, hi - lo, axis_spans[0][2]))
    return (joined[0], joined[1])


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in nested tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _dim(value: Any, ndim: int) -> int:
    return int(value) % ndim if ndim else 0


def _dims(value: Any, ndim: int) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        return [_dim(v, ndim) for v in value]
    return [_dim(value, ndim)]


_CONVS = {"conv2d"}
_MAX_POOLS = {"max_pool2d", "_max_pool2d", "max_pool2d_with_indices"}
_FRESH = {  # results that take only shape/dtype from their tracked argument
    "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "zeros_like",
    "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
}
_REDUCTIONS = {
    "mean", "sum", "amax", "amin", "nansum", "nanmean", "logsumexp", "prod", "median",
    "nanmedian", "max", "min", "argmax", "argmin", "all", "any", "std", "var",
}
_ALONG_DIM = {  # mix values along one dim (argument 1, default last)
    "softmax", "log_softmax", "_softmax", "cumsum", "cumprod", "cummax", "cummin",
    "logcumsumexp", "sort", "argsort", "msort",
}
_RESHAPES = {
    "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
    "reshape_as", "ravel", "squeeze_", "unsqueeze_",
}
_MIXERS = {  # spatial mixing no box describes
    "convolution", "_convolution", "conv1d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "unfold", "fold", "pixel_shuffle", "pixel_unshuffle", "grid_sample", "matmul", "mm",
    "bmm", "baddbmm", "addmm", "einsum", "scaled_dot_product_attention",
    "multi_head_attention_forward", "rot90", "fliplr", "flipud", "topk", "kthvalue",
    "fractional_max_pool2d", "max_unpool2d", "embedding", "tensordot", "kron",
    "fft_fft2", "fft_rfft2", "fft_fftn", "fft_rfftn", "unfold_copy", "as_strided",
    "diagonal", "diag_embed", "tril", "triu", "gather", "scatter", "index_select",
    "take", "masked_select", "repeat_interleave", "tile",
}


class _FieldTracker(TorchFunctionMode):
    """Maps every tensor computed from the input to its receptive field, op by op.

    Active only inside one ``with`` block (the layer table's forward pass). Each torch
    function's result gets a field from its tracked arguments: conv/pool windows widen it,
    padding shifts it, slicing offsets and strides it, reshapes and permutations follow the
    row/column dims, and every other op on equal-sized maps (activations, norms, ``cat``,
    ``+``, ``*``) takes the union of its inputs' fields. Tensors the input never reached
    (weights, constants) are not tracked and add nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        # id(tensor) -> (weak reference that tells a reused id apart, what is known)
        self._known: dict[int, tuple[weakref.ref, _Info]] = {}

    def info(self, tensor: Any) -> _Info | None:
        """What is known about ``tensor``; None for tensors the input never reached."""
        entry = self._known.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            return entry[1]
        return None

    def set(self, tensor: torch.Tensor, info: _Info) -> None:
        """Record ``info`` for ``tensor`` until it is freed."""
        key = id(tensor)
        known = self._known

        def forget(ref: weakref.ref, key: int = key) -> None:
            entry = known.get(key)
            if entry is not None and entry[0] is ref:
                del known[key]

        known[key] = (weakref.ref(tensor, forget), info)

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name == "__setitem__":
            self._setitem(args)
            return out
        outs = _tensors(out)
        if not outs or name in _FRESH:
            return out
        tracked = [(t, info) for t in _tensors((args, kwargs))
                   if (info := self.info(t)) is not None]
        if tracked:
            for tensor, info in zip(outs, self._rule(func, name, args, kwargs, tracked, outs)):
                self.set(tensor, info)
        return out

    def _setitem(self, args: tuple) -> None:
        target, value = args[0], args[2] if len(args) > 2 else None
        infos = [(t, i) for t in (target, value)
                 if isinstance(t, torch.Tensor) and (i := self.info(t)) is not None]
        if infos and (len(infos) > 1 or infos[0][0] is not target):
            self.set(target, _pointwise(infos, target))

    def _rule(
        self, func: Any, name: str, args: tuple, kwargs: dict,
        tracked: list[tuple[torch.Tensor, _Info]], outs: list[torch.Tensor],
    ) -> list[_Info]:
        src = _arg(args, kwargs, 0, "input")
        src_info = self.info(src) if isinstance(src, torch.Tensor) else None
        if name in _MIXERS:
            return [_UNKNOWN] * len(outs)
        if name == "__get__":  # tensor properties: .data keeps positions, .T/.mT do not
            attr = getattr(getattr(func, "__self__", None), "__name__", "")
            return [_Info(src_info.spans, src_info.axes) if attr == "data" and src_info
                    else _UNKNOWN] * len(outs)
        if name == "stack":
            at = _dim(_arg(args, kwargs, 1, "dim", 0), outs[0].dim())
            layouts = {None if i.axes is None else
                       (i.axes, tensor.shape[i.axes[0]], tensor.shape[i.axes[1]])
                       for tensor, i in tracked}
            first = tracked[0][1].axes
            if None in layouts or len(layouts) != 1 or first is None:
                return [_UNKNOWN] * len(outs)
            return [_Info(_union([i.spans for _, i in tracked]),
                          (first[0] + (first[0] >= at), first[1] + (first[1] >= at)))]
        if src_info is not None and src_info.axes is not None:
            assert isinstance(src, torch.Tensor)
            special = _layout_rule(func, name, args, kwargs, src, src_info, outs)
            if special is not None:
                return special
        elif name in _CONVS | _MAX_POOLS | _RESHAPES | {
                "avg_pool2d", "lp_pool2d", "pad", "permute", "transpose", "__getitem__"}:
            return [_UNKNOWN] * len(outs)
        return [_pointwise(tracked, out) for out in outs]


def _layout_rule(
    func: Any, name: str, args: tuple, kwargs: dict, src: torch.Tensor, info: _Info,
    outs: list[torch.Tensor],
) -> list[_Info] | None:
    """Fields for ops that move or window the row/column dims of ``src``; None: pointwise."""
    axes = info.axes
    assert axes is not None
    ndim = src.dim()
    if name in _CONVS or name in _MAX_POOLS or name in ("avg_pool2d", "lp_pool2d"):
        if axes != (ndim - 2, ndim - 1):
            return [_UNKNOWN] * len(outs)
        if name in _CONVS:
            kernel = tuple(_arg(args, kwargs, 1, "weight").shape[-2:])
            stride = _pair(_arg(args, kwargs, 3, "stride", 1))
            padding = _arg(args, kwargs, 4, "padding", 0)
            dilation = _pair(_arg(args, kwargs, 5, "dilation", 1))
            if isinstance(padding, str):  # PyTorch's "same" pads the extra pixel after
                padding = tuple(d * (k - 1) // 2 if padding == "same" else 0
                                for k, d in zip(kernel, dilation))
        else:
            at = 2 if name == "lp_pool2d" else 1
            kernel = _pair(_arg(args, kwargs, at, "kernel_size"))
            stride = _arg(args, kwargs, at + 1, "stride", None)
            stride = _pair(stride) if stride not in (None, (), []) else kernel
            padding = 0 if name == "lp_pool2d" else _arg(args, kwargs, 3, "padding", 0)
            dilation = _pair(_arg(args, kwargs, 4, "dilation", 1)) if name in _MAX_POOLS \
                else (1, 1)
        pad = _pair(padding)
        spans = None
        if info.spans is not None:
            spans = tuple(
                (lo - pad[a] * jump, size + (kernel[a] - 1) * dilation[a] * jump,
                 jump * stride[a])
                for a, (lo, size, jump) in enumerate(info.spans)
            )
        out = outs[0]
        result = [_Info(spans, (out.dim() - 2, out.dim() - 1))]  # type: ignore[arg-type]
        return result + [_UNKNOWN] * (len(outs) - 1)  # pooling indices
    if name == "pad":
        pad = list(_arg(args, kwargs, 1, "pad"))
        if _arg(args, kwargs, 2, "mode", "constant") == "circular" or info.spans is None:
            return [_Info(None, axes)]
        spans = []
        for axis, (lo, size, jump) in zip(axes, info.spans):
            at = 2 * (ndim - 1 - axis)
            before = int(pad[at]) if at < len(pad) else 0
            spans.append((lo - before * jump, size, jump))
        return [_Info((spans[0], spans[1]), axes)]
    if name in ("permute", "transpose", "swapaxes", "swapdims"):
        if name == "permute":
            dims = args[1:] if len(args) > 2 or (len(args) == 2 and isinstance(args[1], int)) \
                else _arg(args, kwargs, 1, "dims")
            order = [_dim(d, ndim) for d in dims]
        else:
            first = _dim(_arg(args, kwargs, 1, "dim0"), ndim)
            second = _dim(_arg(args, kwargs, 2, "dim1"), ndim)
            order = list(range(ndim))
            order[first], order[second] = order[second], order[first]
        return [_Info(info.spans, (order.index(axes[0]), order.index(axes[1])))]
    if name in _RESHAPES:
        return [_reshaped(info, tuple(src.shape), tuple(out.shape)) for out in outs]
    if name == "__getitem__":
        return [_indexed(info, tuple(src.shape), args[1])]
    if name in _REDUCTIONS:
        dim = _arg(args, kwargs, 1, "dim")
        if isinstance(dim, torch.Tensor):
            return None  # torch.max(a, b): elementwise
        keepdim = kwargs.get("keepdim", False)
        if name not in ("std", "var") and len(args) > 2 and isinstance(args[2], bool):
            keepdim = args[2]
        dims = _dims(dim, ndim)
        if dims is None or not dims:
            return [_UNKNOWN] * len(outs)
        if set(dims) & set(axes):
            return [_Info(None, axes) if keepdim else _UNKNOWN] * len(outs)
        if not keepdim:
            axes = (axes[0] - sum(d < axes[0] for d in dims),
                    axes[1] - sum(d < axes[1] for d in dims))
        return [_Info(info.spans, axes)] * len(outs)
    if name in _ALONG_DIM or name in ("flip", "roll", "linear", "repeat"):
        if name == "linear":
            dims = [ndim - 1]
        elif name == "roll":
            dims = _dims(_arg(args, kwargs, 2, "dims"), ndim)
        elif name == "flip":
            dims = _dims(args[1:] if len(args) > 2 else _arg(args, kwargs, 1, "dims"), ndim)
        elif name == "repeat":
            reps = args[1:] if len(args) > 2 or isinstance(_arg(args, kwargs, 1, "x"), int) \
                else _arg(args, kwargs, 1, "repeats")
            offset = len(reps) - ndim
            dims = [a for a in axes if int(reps[a + offset]) != 1]
        else:
            dims = _dims(_arg(args, kwargs, 1, "dim", -1), ndim)
        if dims is None or set(dims) & set(axes):
            return [_UNKNOWN] * len(outs)
    return None


def _reshaped(info: _Info, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> _Info:
    """A view/reshape keeps the field when rows and columns stay two adjacent dims with
    the same element count before and after them (row-major order is preserved)."""
    assert info.axes is not None
    rows, cols = info.axes
    if cols != rows + 1:
        return _UNKNOWN
    before, after = math.prod(in_shape[:rows]), math.prod(in_shape[cols + 1:])
    for at in range(len(out_shape) - 1):
        if (out_shape[at:at + 2] == in_shape[rows:cols + 1]
                and math.prod(out_shape[:at]) == before
                and math.prod(out_shape[at + 2:]) == after):
            return _Info(info.spans, (at, at + 1))
    return _UNKNOWN


def _indexed(info: _Info, shape: tuple[int, ...], index: Any) -> _Info:
    """Basic indexing: ints drop dims, None adds one, slices of rows/columns offset and
    stride the field (Swin's ``x[..., 0::2, 1::2, :]``); anything else is unknown."""
    assert info.axes is not None
    items = list(index) if isinstance(index, tuple) else [index]
    for item in items:
        if isinstance(item, (bool, torch.Tensor)) or not (
                item is None or item is Ellipsis or isinstance(item, slice)
                or hasattr(item, "__index__")):
            return _UNKNOWN
    consumed = sum(1 for item in items if item is not None and item is not Ellipsis)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (len(shape) - consumed)
    else:
        items += [slice(None)] * (len(shape) - consumed)
    spans = list(info.spans) if info.spans is not None else None
    new_axes: dict[int, int] = {}
    in_dim = out_dim = 0
    for item in items:
        if item is None:
            out_dim += 1
            continue
        if not isinstance(item, slice):
            if in_dim in info.axes:
                return _UNKNOWN
            in_dim += 1
            continue
        if in_dim in info.axes:
            which = info.axes.index(in_dim)
            start, _, step = item.indices(shape[in_dim])
            if step <= 0:
                return _UNKNOWN
            new_axes[which] = out_dim
            if spans is not None:
                lo, size, jump = spans[which]
                spans[which] = (lo + start * jump, size, jump * step)
        in_dim += 1
        out_dim += 1
    return _Info((spans[0], spans[1]) if spans is not None else None,
                 (new_axes[0], new_axes[1]))


def _pointwise(tracked: list[tuple[torch.Tensor, _Info]], out: torch.Tensor) -> _Info:
    """Field of an op that keeps positions in place (broadcasting from the right): the
    union of its same-sized inputs' fields. Inputs broadcast from size 1 at rows and
    columns (squeeze-and-excitation gates) are left out."""
    axes: tuple[int, int] | None = None
    joined: list[_Spans | None] = []
    gates: list[torch.Tensor] = []
    for tensor, info in tracked:
        offset = out.dim() - tensor.dim()
        if info.axes is None:
            gates.append(tensor)
            continue
        if offset < 0:
            return _UNKNOWN
        mapped = (info.axes[0] + offset, info.axes[1] + offset)
        in_hw = (tensor.shape[info.axes[0]], tensor.shape[info.axes[1]])
        out_hw = (out.shape[mapped[0]], out.shape[mapped[1]])
        if in_hw != out_hw:
            if in_hw == (1, 1):
                gates.append(tensor)
                continue
            return _Info(None, mapped)
        if axes is not None and mapped != axes:
            return _UNKNOWN
        axes = mapped
        joined.append(info.spans)
    if axes is None:
        return _UNKNOWN
    for gate in gates:
        offset = out.dim() - gate.dim()
        if any(a - offset >= 0 and gate.shape[a - offset] != 1 for a in axes):
            return _Info(None, axes)
    return _Info(_union(joined), axes)


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
