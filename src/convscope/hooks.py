"""Capture intermediate activations with forward hooks, without leaking hooks or memory.

``capture`` is the one way convscope reads a model's intermediate outputs; the CLI, the
report, the server and the atlas all go through it (or through :func:`forward_hooks`,
the hook bookkeeping it is built on).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from .errors import ConvscopeError, close_matches
from .layers import LayerSpec, resolve_layers

ForwardHook = Callable[[str, nn.Module, tuple, Any], Any]


@contextmanager
def forward_hooks(
    modules: Mapping[str, nn.Module], hook: ForwardHook
) -> Iterator[list[RemovableHandle]]:
    """Register ``hook(name, module, inputs, output)`` on every module; remove them all on
    exit, also when the body raises. Removal happens in ``finally``, never in ``__del__``."""
    handles: list[RemovableHandle] = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(functools.partial(hook, name)))
        yield handles
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def preserve_training(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every submodule's ``training`` flag on exit, whatever the body did."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def copy_output(value: Any, to: torch.device | str | None, dtype: torch.dtype | None) -> Any:
    """Detached copy of a module output, keeping tuple/list/dict structure.

    Always a copy: a later in-place op (VGG's ``ReLU(inplace=True)``, ResNet's
    ``out += identity``) would otherwise rewrite the stored tensor after the hook ran.
    Only floating tensors are cast to ``dtype``.
    """
    if isinstance(value, torch.Tensor):
        cast = dtype if dtype is not None and value.is_floating_point() else None
        return value.detach().to(device=to, dtype=cast, copy=True)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(copy_output(v, to, dtype) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(copy_output(v, to, dtype) for v in value)
    if isinstance(value, dict):
        return type(value)((k, copy_output(v, to, dtype)) for k, v in value.items())
    return value


class Activations(Mapping[str, Any]):
    """Captured outputs by layer name: ``acts[name]`` is the last call's output and
    ``acts.calls(name)`` every call's, in order."""

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.modules: dict[str, nn.Module] = dict(modules)
        self._calls: dict[str, list[Any]] = {name: [] for name in self.modules}

    def _record(self, name: str, value: Any) -> None:
        self._calls[name].append(value)

    def _check(self, name: str) -> list[Any]:
        if name not in self._calls:
            hint = close_matches(name, self._calls)
            extra = f"; did you mean {', '.join(map(repr, hint))}?" if hint else ""
            raise KeyError(f"layer {name!r} was not captured{extra}")
        return self._calls[name]

    def __getitem__(self, name: str) -> Any:
        values = self._check(name)
        if not values:
            raise KeyError(f"layer {name!r} was selected but did not run in the forward pass")
        return values[-1]

    def calls(self, name: str) -> list[Any]:
        """Every output of ``name`` in call order (several for a module reused in forward)."""
        return list(self._check(name))

    def __iter__(self) -> Iterator[str]:
        return (name for name, values in self._calls.items() if values)

    def __len__(self) -> int:
        return sum(1 for values in self._calls.values() if values)

    def __contains__(self, name: object) -> bool:
        return bool(self._calls.get(name))  # type: ignore[arg-type]

    @property
    def names(self) -> list[str]:
        """The selected layer names in model order, including any that did not run."""
        return list(self._calls)

    def nbytes(self) -> int:
        """Bytes held by every stored tensor."""
        total = 0

        def visit(value: Any) -> None:
            nonlocal total
            if isinstance(value, torch.Tensor):
                total += value.element_size() * value.nelement()
            elif isinstance(value, (tuple, list)):
                for item in value:
                    visit(item)
            elif isinstance(value, dict):
                for item in value.values():
                    visit(item)

        for values in self._calls.values():
            for value in values:
                visit(value)
        return total

    def clear(self) -> None:
        """Drop every stored output (frees their memory)."""
        for values in self._calls.values():
            values.clear()

    def __repr__(self) -> str:
        parts = []
        for name in self:
            value = self[name]
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            parts.append(f"{name}: {shape}")
        return f"Activations({', '.join(parts)})"


class CaptureIntegrityError(ConvscopeError, RuntimeError):
    """A captured output was rewritten in place by an operation capture could not see."""


_INPLACE_DUNDERS = frozenset({
    "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
    "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
    "__imatmul__",
})


@functools.lru_cache(maxsize=1)
def _inplace_positions() -> dict[Callable, int]:
    """Positional index of the ``inplace`` argument of each torch.nn.functional function
    that has one (``F.dropout(x, p, training, inplace)`` is how nn.Dropout calls it)."""
    import inspect

    import torch.nn.functional as F

    positions: dict[Callable, int] = {}
    for name in dir(F):
        func = getattr(F, name)
        if not callable(func):
            continue
        try:
            params = list(inspect.signature(func).parameters)
        except (TypeError, ValueError):
            continue
        if "inplace" in params:
            positions[func] = params.index("inplace")
    return positions


def _written_tensors(func: Callable, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """Tensors that the torch call ``func(*args, **kwargs)`` is about to write in place."""
    name = getattr(func, "__name__", "")
    targets: list[torch.Tensor] = []
    inplace = (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_DUNDERS
    if not inplace:
        flag = kwargs.get("inplace")
        if flag is None:
            index = _inplace_positions().get(func)
            flag = args[index] if index is not None and index < len(args) else False
        inplace = flag is True
    if inplace and args and isinstance(args[0], torch.Tensor):
        targets.append(args[0])
    out = kwargs.get("out")
    if isinstance(out, torch.Tensor):
        targets.append(out)
    elif isinstance(out, (tuple, list)):
        targets.extend(t for t in out if isinstance(t, torch.Tensor))
    return targets


def _out_of_place(func: Callable, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The arguments that run an ``inplace=True`` functional out of place, or None."""
    if kwargs.get("inplace") is True:
        return args, {**kwargs, "inplace": False}
    index = _inplace_positions().get(func)
    if index is not None and index < len(args) and args[index] is True:
        return (*args[:index], False, *args[index + 1:]), kwargs
    return None


def _sequential_inplace_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules with ``inplace=True`` whose parent is a plain ``nn.Sequential``.

    ``Sequential.forward`` passes each child's return value on and keeps no other
    reference to its input, so running such a child out of place changes nothing the
    model can observe; capture uses that to keep a watched output without copying it.
    """
    by_name = dict(model.named_modules())
    found = {}
    for name, module in by_name.items():
        if not name or getattr(module, "inplace", False) is not True:
            continue
        parent = by_name[name.rsplit(".", 1)[0] if "." in name else ""]
        if type(parent).forward is nn.Sequential.forward:
            found[name] = module
    return found


class _Pending:
    """A stored output that still shares memory with the running model."""

    __slots__ = ("alias", "calls", "index", "name", "version")

    def __init__(self, name: str, calls: list[Any], index: int, alias: torch.Tensor):
        self.name, self.calls, self.index, self.alias = name, calls, index, alias
        self.version = alias._version

    def commit(self) -> None:
        """Replace the stored alias by a private copy of its current (still exact) value."""
        self.calls[self.index] = self.alias.clone()


class _CopyOnWrite(TorchFunctionMode):
    """Copies a captured output just before any torch op writes to its memory.

    Storing the module's own output tensor and copying it only on a write costs nothing
    for the usual case and stays exact when an in-place op follows: ``ReLU(inplace=True)``
    after a conv (VGG), ``out += identity`` after a BatchNorm (ResNet), ``x[...] = v``.
    Every Python-visible in-place op in the body goes through ``__torch_function__``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pending: dict[int, list[_Pending]] = {}
        # Storage of a watched output that an in-place activation inside an nn.Sequential
        # is about to rewrite; that one call may run out of place instead (see capture).
        self.redirect: set[int] = set()

    def allow_redirect(self, tensor: Any) -> None:
        if isinstance(tensor, torch.Tensor):
            pointer = tensor.untyped_storage().data_ptr()
            if pointer in self.pending:
                self.redirect.add(pointer)

    def watch(self, entry: _Pending) -> None:
        pointer = entry.alias.untyped_storage().data_ptr()
        if pointer:
            self.pending.setdefault(pointer, []).append(entry)
        else:  # an empty tensor: nothing can be written to it
            entry.commit()

    def protect(self, target: torch.Tensor) -> None:
        entries = self.pending.pop(target.untyped_storage().data_ptr(), None)
        for entry in entries or ():
            entry.commit()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.pending:
            targets = _written_tensors(func, args, kwargs)
            if len(targets) == 1 and self.redirect:
                pointer = targets[0].untyped_storage().data_ptr()
                if pointer in self.redirect:
                    self.redirect.discard(pointer)
                    moved = _out_of_place(func, args, kwargs)
                    if moved is not None:  # the watched output stays untouched: no copy
                        return func(*moved[0], **moved[1])
            for target in targets:
                self.protect(target)
        return func(*args, **kwargs)

    def settle(self) -> None:
        """At exit: fail loudly on unseen writes, copy what the caller still holds."""
        corrupted = []
        for entries in self.pending.values():
            intact = []
            for entry in entries:
                if entry.alias._version != entry.version:
                    corrupted.append(entry.name)
                else:
                    intact.append(entry)
            if not intact:
                continue
            # Our own aliases (a container and its last child share one output) plus the
            # temporary storage object account for len(entries) + 1 references; any more
            # means someone else (the returned output, a view of it) can still write to
            # this memory after the block, so keep private copies.
            users = torch._C._storage_Use_Count(intact[0].alias.untyped_storage()._cdata)
            if users > len(entries) + 1:
                for entry in intact:
                    entry.commit()
        self.pending.clear()
        if corrupted:
            raise CaptureIntegrityError(
                "the output of " + ", ".join(sorted(set(corrupted))) + " was modified in place "
                "by an operation convscope could not intercept (C++/TorchScript code or "
                "another thread); capture again with copy=True"
            )


@contextmanager
def capture(
    model: nn.Module,
    layers: LayerSpec,
    *,
    to: torch.device | str | None = "cpu",
    dtype: torch.dtype | None = None,
    copy: bool | Literal["auto"] = "auto",
) -> Iterator[Activations]:
    """Record the outputs of the selected layers during the forward passes in the body.

    >>> with capture(model, ["features.0", "features.28"]) as acts:
    ...     model(x)
    >>> acts["features.0"].shape

    ``layers`` accepts anything :func:`~convscope.layers.resolve_layers` does. Stored
    values are detached and exactly what the module returned, even when a later in-place
    op (VGG's ``ReLU(inplace=True)``) rewrites that memory: with ``copy="auto"`` the output
    is kept without copying and copied only just before something writes to it;
    ``copy=True`` always copies at once; ``copy=False`` never copies (fastest, but a
    later in-place op shows in the stored value). Outputs are moved ``to`` a device (``None`` keeps
    them where they were made) and cast to ``dtype`` when given (``torch.float16`` halves
    memory). Hooks are removed on exit and on exceptions; the model is never modified.
    """
    if copy not in (True, False, "auto"):
        raise ValueError(f"copy must be True, False or 'auto'; got {copy!r}")
    modules = resolve_layers(model, layers)
    acts = Activations(modules)
    target = torch.device(to) if to is not None else None
    guard = _CopyOnWrite() if copy == "auto" else None

    def hook(name: str, _module: nn.Module, _inputs: tuple, output: Any) -> None:
        same_place = (
            isinstance(output, torch.Tensor)
            and (target is None or output.device == target)
            and (dtype is None or output.dtype == dtype or not output.is_floating_point())
        )
        if guard is not None and same_place:
            calls = acts._calls[name]
            calls.append(output.detach())
            guard.watch(_Pending(name, calls, len(calls) - 1, calls[-1]))
        elif copy is False and same_place:
            acts._record(name, output.detach())
        else:
            acts._record(name, copy_output(output, to, dtype))

    with forward_hooks(modules, hook):
        if guard is None:
            yield acts
            return
        failed = False
        handles = []
        for module in _sequential_inplace_modules(model).values():
            handles.append(module.register_forward_pre_hook(
                lambda _module, inputs: guard.allow_redirect(inputs[0] if inputs else None)))
            handles.append(module.register_forward_hook(
                lambda *_: guard.redirect.clear()))
        try:
            with guard:
                try:
                    yield acts
                except BaseException:
                    failed = True
                    raise
                finally:
                    if failed:
                        guard.pending.clear()
        finally:
            for handle in handles:
                handle.remove()
        guard.settle()


class LayerActivations:
    """The seed tutorial's hook class, kept API-compatible.

    >>> conv_out = LayerActivations(vgg.features, 0)
    >>> o = vgg(img)
    >>> conv_out.remove()
    >>> act = conv_out.features

    ``layer_num`` may also be a dotted name or any single selector. Unlike the tutorial's
    version, ``features`` holds the layer's true output even when an in-place ReLU follows.
    """

    features: Any = None

    def __init__(self, model: nn.Module, layer_num: int | str | nn.Module):
        modules = resolve_layers(model, layer_num)
        if len(modules) != 1:
            raise ValueError(
                f"LayerActivations takes one layer; {layer_num!r} matched {len(modules)}"
            )
        (self.layer_name, self.module), = modules.items()
        self.hook = self.module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module: nn.Module, input: tuple, output: Any) -> None:
        self.features = copy_output(output, "cpu", None)

    def remove(self) -> None:
        """Unregister the hook (safe to call twice)."""
        self.hook.remove()

    def __enter__(self) -> LayerActivations:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
