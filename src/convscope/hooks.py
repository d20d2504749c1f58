"""Capture intermediate activations with forward hooks, without leaking hooks or memory.

``capture`` is the one way convscope reads a model's intermediate outputs; the CLI, the
report, the server and the atlas all go through it (or through :func:`forward_hooks`,
the hook bookkeeping it is built on).
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from .errors import ConvscopeError, close_matches
from .flow import Proven, called_from, proven_call_sites
from .layers import LayerSpec, first_tensor, resolve_layers

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


def did_not_run(name: str) -> str:
    """The message for a hooked layer that recorded nothing, with the likely cause where
    torch.compile is in use: a compiled graph skips hooks added after it was compiled."""
    message = f"layer {name!r} was selected but did not run in the forward pass"
    if "torch._dynamo" in sys.modules:
        message += (
            " (or it ran inside a torch.compile graph compiled before the hooks were added, "
            "which skips them: capture before the first compiled call, or run the "
            "uncompiled module, e.g. `compiled._orig_mod`)"
        )
    return message


class Activations(Mapping[str, Any]):
    """Captured outputs by layer name: ``acts[name]`` is the last call's output and
    ``acts.calls(name)`` every call's, in order."""

    def __init__(self, modules: Mapping[str, nn.Module], model: nn.Module | None = None):
        self.modules: dict[str, nn.Module] = dict(modules)
        self.model = model
        #: ``(H, W)`` and batch size of the model's last 4-D input (set by ``capture``);
        #: they resolve token grids and channels-last outputs in :meth:`maps`.
        self.input_hw: tuple[int, int] | None = None
        self.batch_size: int | None = None
        self._hints: Any = None
        self._calls: dict[str, list[Any]] = {name: [] for name in self.modules}
        # Outputs kept without a copy, checked against their version counter when read.
        self._verify: list[_Verified] = []

    def _check_versions(self, name: str | None = None) -> None:
        """Raise if memory kept without a copy was written in place since it was stored."""
        stale = sorted({
            entry.name for entry in self._verify
            if (name is None or entry.name == name) and entry.tensor._version != entry.version
        })
        if stale:
            raise CaptureIntegrityError(
                "the stored output of " + ", ".join(stale) + " was modified in place after "
                "it was captured (the model or the caller wrote to that tensor); capture "
                "again with copy=True or copy='auto'"
            )

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
            raise KeyError(did_not_run(name))
        if self._verify:
            self._check_versions(name)
        return values[-1]

    def calls(self, name: str) -> list[Any]:
        """Every output of ``name`` in call order (several for a module reused in forward)."""
        values = list(self._check(name))
        if self._verify:
            self._check_versions(name)
        return values

    def maps(
        self,
        name: str,
        *,
        call: int = -1,
        prefix_tokens: int | None = None,
        layout: Literal["nchw", "nhwc", "tokens"] | None = None,
    ) -> torch.Tensor:
        """The output of ``name`` as spatial maps ``(N, C, H, W)``, without a copy.

        Conv outputs come back as they are, channels-last outputs ``(N, H, W, C)``
        transposed, and transformer token sequences ``(N, T, D)`` with their prefix tokens
        (class, distillation, register) removed and reshaped to the patch grid; see
        :func:`convscope.spatial.spatial_layout`. ``call`` picks one call of a module run
        several times. An output with no spatial reading raises
        :class:`~convscope.spatial.NoSpatialMapError`; ``prefix_tokens`` and ``layout``
        override what is inferred.
        """
        from .spatial import model_hints, spatial_maps

        value = self.calls(name)[call]
        if self._hints is None and self.model is not None:
            self._hints = model_hints(self.model)
        return spatial_maps(
            value, model=self._hints, module=self.modules.get(name),
            input_hw=self.input_hw, batch_size=self.batch_size,
            prefix_tokens=prefix_tokens, layout=layout, name=name,
        )

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
        self._verify.clear()

    def _repr_html_(self, max_layers: int = 12, channels: int = 16) -> str:
        """Notebook view: per layer its shape and a compact grid of the first sample's
        first channels (layers without a spatial reading show their shape only)."""
        import base64
        import html
        import io

        from .render.grid import feature_grid
        from .spatial import NoSpatialMapError

        rows = []
        names = list(self)
        for name in names[:max_layers]:
            value = self[name]
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            cell = ""
            try:
                maps = self.maps(name)
                image = feature_grid(maps[:1].float(), channels=min(channels, maps.shape[1]),
                                     tile_size=32, pad=1)
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                data = base64.b64encode(buffer.getvalue()).decode("ascii")
                cell = f'<img src="data:image/png;base64,{data}" alt="{html.escape(name)}">'
            except (NoSpatialMapError, ValueError, TypeError):
                cell = "<em>no spatial map</em>"
            rows.append(f"<tr><td><code>{html.escape(name)}</code></td>"
                        f"<td>{html.escape(str(shape))}</td><td>{cell}</td></tr>")
        more = len(names) - max_layers
        tail = f"<tr><td colspan=3>… {more} more layers</td></tr>" if more > 0 else ""
        return ("<table><thead><tr><th>layer</th><th>output</th><th>first channels, "
                "sample 0</th></tr></thead><tbody>" + "".join(rows) + tail + "</tbody></table>")

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


# Calls that hand a tensor's memory to code no torch-function mode sees and whose writes
# bump no version counter (NumPy, DLPack consumers, raw storages and pointers): treated as
# writes of that tensor, so a stored output is copied before its memory escapes.
_ESCAPES = frozenset({
    "numpy", "__array__", "__dlpack__", "untyped_storage", "storage", "_typed_storage",
    "data_ptr",
})
_ESCAPE_GETTERS = (torch.Tensor.__cuda_array_interface__.__get__,)
# Names ending in ``_`` that change autograd flags only, never values: no copy for them.
_FLAGS_ONLY = frozenset({"requires_grad_", "detach_"})


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


# How a torch function can write into one of its arguments (besides ``out=``):
_NEVER = 0        # never in place
_FIRST = 1        # always writes its first argument (``add_``, ``__iadd__``, ``__setitem__``)
_FLAG = 2         # writes its first argument when ``inplace`` is true (``F.relu(x, inplace=True)``)
_SCHEMA = 3       # an ATen overload whose schema marks written arguments (``torch.ops.aten.relu_``)


@functools.lru_cache(maxsize=4096)
def _write_kind(func: Callable) -> tuple[int, Any]:
    """Classify ``func`` once: which of its arguments it may write in place."""
    name = getattr(func, "__name__", "")
    if name in _FLAGS_ONLY:
        return _NEVER, None
    if ((name.endswith("_") and not name.endswith("__")) or name in _INPLACE_DUNDERS
            or name in _ESCAPES or func in _ESCAPE_GETTERS):
        return _FIRST, None
    index = _inplace_positions().get(func)
    if index is not None:
        return _FLAG, index
    schema = getattr(func, "_schema", None)
    if schema is not None:
        written = tuple(
            i for i, arg in enumerate(schema.arguments)
            if arg.alias_info is not None and arg.alias_info.is_write and not arg.kwarg_only
        )
        if written:
            return _SCHEMA, written
    return _NEVER, None


def _written_tensors(
    kind: int, detail: Any, args: tuple, kwargs: dict
) -> list[torch.Tensor]:
    """Tensors that a call classified by :func:`_write_kind` is about to write."""
    written: list[Any] = []
    if kind == _FIRST or (
        kind == _FLAG
        and (kwargs.get("inplace") is True or (detail < len(args) and args[detail] is True))
    ):
        written.extend(args[:1])
    elif kind == _SCHEMA:
        written.extend(args[i] for i in detail if i < len(args))
    written.append(kwargs.get("out"))
    targets: list[torch.Tensor] = []
    for value in written:  # a tensor, or a list of them (``torch._foreach_add_``, ``out=``)
        if isinstance(value, torch.Tensor):
            targets.append(value)
        elif isinstance(value, (tuple, list)):
            targets.extend(t for t in value if isinstance(t, torch.Tensor))
    return targets


class _Verified:
    """A stored alias whose version counter proves it was not written since capture."""

    __slots__ = ("name", "tensor", "version")

    def __init__(self, name: str, tensor: torch.Tensor, version: int):
        self.name, self.tensor, self.version = name, tensor, version


class _Pending(_Verified):
    """A stored output that still shares memory with the running model (once proven
    safe, the same object is kept as its :class:`_Verified` record)."""

    __slots__ = ("calls", "index", "origin")

    def __init__(self, name: str, calls: list[Any], output: torch.Tensor,
                 on_death: Callable[[Any], None] | None = None):
        alias = output.detach()
        calls.append(alias)
        self.name, self.tensor, self.version = name, alias, alias._version
        self.calls, self.index = calls, len(calls) - 1
        # The module's own output object: while someone holds it (or a view of it, which
        # holds its base), that memory can still be written. ``on_death`` runs when the
        # last reference goes, still before that tensor lets go of the memory.
        self.origin = weakref.ref(output, on_death)

    def commit(self, copy: torch.Tensor | None = None) -> torch.Tensor:
        """Replace the stored alias by a private copy of its current (still exact) value."""
        copy = self.tensor.clone() if copy is None else copy
        self.calls[self.index] = copy
        return copy


_ALL_DISABLED = torch._C._TorchFunctionState.ALL_DISABLED
_stack_depth = torch._C._len_torch_function_stack
_stack_at = torch._C._get_function_stack_at
_storage_users = torch._C._storage_Use_Count
_no_torch_function = torch._C.DisableTorchFunction
_function_state = torch._C._get_torch_function_state


class _CopyOnWrite(TorchFunctionMode):
    """Copies a captured output just before any torch op writes to its memory.

    Storing the module's own output tensor and copying it only on a write costs nothing
    for the usual case and stays exact when an in-place op follows: ``ReLU(inplace=True)``
    after a conv (VGG), ``out += identity`` after a BatchNorm (ResNet), ``x[...] = v``,
    ``torch.add(a, b, out=a)``. The op itself always runs exactly as the model wrote it.

    The mode is on the torch-function stack only while the model can still reach a stored
    output's memory: a hook pushes it when it stores an alias, and it comes off again once
    every such output has been dropped and nothing but the stored aliases holds the memory
    (the storage's reference count says so). A ResNet conv output is read by its
    BatchNorm and dropped, so only the BatchNorm's calls pass through the mode, not every
    call of the forward. Where the mode cannot be pushed safely (another thread, another
    mode entered inside the forward, torch functions disabled) the hook copies at once.
    Writes the mode cannot see (TorchScript, C++) are caught by the autograd version
    counter and reported instead of returning a wrong value.
    """

    def __init__(self) -> None:
        super().__init__()
        # storage address -> (the storage, held so that its reference count is exact, and
        # the stored aliases of it)
        self.pending: dict[int, tuple[torch.UntypedStorage, list[_Pending]]] = {}
        self.orphaned: set[int] = set()  # module outputs all gone, memory still shared
        self.deferred: list[int] = []  # outputs that died while the books were open
        self.kept: list[_Verified] = []
        # Outputs stored without the guard (see convscope.flow): (layer name, its list of
        # calls, the index there, the stored alias, its version).
        self.proven: list[tuple[str, list[Any], int, torch.Tensor, int]] = []
        self.corrupted: list[str] = []
        self.thread = threading.get_ident()
        self.base_depth = _stack_depth()
        self.on_stack = False
        self.busy = False
        self.closed = False

    # -- the stack --------------------------------------------------------------------
    def activate(self) -> bool:
        """Make sure the mode sees the next writes; False where it cannot (copy instead).

        Called from a hook with torch functions enabled (the caller checks)."""
        if self.on_stack:
            return threading.get_ident() == self.thread
        if threading.get_ident() != self.thread or self.closed:
            return False
        if _stack_depth() != self.base_depth:
            # A mode entered inside the forward: ours on top of it would be popped by its
            # exit. Copying at once is exact and leaves the stack alone.
            return False
        torch._C._push_on_torch_function_stack(self)
        self.on_stack = True
        return True

    def maybe_pop(self) -> None:
        """Leave the stack once nothing is watched (only from the top: a mode entered
        above ours stays where it is, and ours comes off at a later hook or at exit)."""
        if self.on_stack and not self.pending:
            depth = _stack_depth()
            if depth and _stack_at(depth - 1) is self:
                torch._C._pop_torch_function_stack()
                self.on_stack = False

    def _remove_from_stack(self) -> None:
        """At exit: take the mode off the stack, keeping any mode entered above it."""
        if not self.on_stack:
            return
        self.on_stack = False
        above = []
        while _stack_depth() > 0:
            mode = torch._C._pop_torch_function_stack()
            if mode is self:
                break
            above.append(mode)
        for mode in reversed(above):
            torch._C._push_on_torch_function_stack(mode)

    # -- bookkeeping ------------------------------------------------------------------
    def watch(self, name: str, calls: list[Any], output: torch.Tensor) -> None:
        """Store an alias of ``output`` in ``calls`` until it is proven safe or copied."""
        storage = output.untyped_storage()
        pointer = storage.data_ptr()
        if not pointer:  # an empty tensor: nothing can be written to it
            calls.append(output.detach())
            return
        entry = _Pending(name, calls, output, lambda _, p=pointer: self._origin_died(p))
        watched = self.pending.get(pointer)
        if watched is None:
            self.pending[pointer] = (storage, [entry])
        else:
            watched[1].append(entry)
            self.orphaned.discard(pointer)

    def _origin_died(self, pointer: int) -> None:
        # A weakref callback: it can run inside the hook's or the mode's own bookkeeping
        # (garbage collection) or on another thread; then it only notes the address.
        if self.closed:
            return
        if self.busy or threading.get_ident() != self.thread:
            self.deferred.append(pointer)
            return
        self.busy = True
        try:
            with _no_torch_function():
                self._release(pointer, dying=1)
        finally:
            self.busy = False
        self.maybe_pop()

    def _release(self, pointer: int, dying: int = 0) -> None:
        """Stop watching a storage once only the stored aliases hold it.

        ``dying``: tensors being freed right now that still count as holders (a weakref
        callback runs before the dying tensor lets go of its storage).
        """
        watched = self.pending.get(pointer)
        if watched is None:
            return
        storage, entries = watched
        for entry in entries:
            if entry.origin() is not None:
                return  # a module output still alive: its own death will come
        # Holders: our storage handle, one alias per entry, the dying tensor, anyone else.
        if _storage_users(storage._cdata) > 1 + len(entries) + dying:
            self.orphaned.add(pointer)  # a view, ``.detach()`` or ``.data`` still holds it
            return
        del self.pending[pointer]
        self.orphaned.discard(pointer)
        self._release_all(entries)

    def _release_all(self, entries: list[_Pending]) -> None:
        """Keep the entries' aliases without a copy (nothing else holds their memory); one
        that was written meanwhile is reported, and reading it raises."""
        for entry in entries:
            if entry.tensor._version != entry.version:
                self.corrupted.append(entry.name)
            self.kept.append(entry)

    def checkpoint(self) -> None:
        """At each hook: finish what callbacks deferred and retry shared storages."""
        if self.deferred:
            pointers, self.deferred = self.deferred, []
            for pointer in pointers:
                self._release(pointer)
        for pointer in list(self.orphaned):
            self._release(pointer)

    def _commit_intact(self, entries: list[_Pending]) -> None:
        """Copy the entries still holding the module's output. One written by code the mode
        could not see (TorchScript, C++) is never copied as if it were exact: it is
        reported, and reading it raises (also after an exception skips the report)."""
        intact = [entry for entry in entries if entry.tensor._version == entry.version]
        for entry in entries:
            if entry not in intact:
                self.corrupted.append(entry.name)
                self.kept.append(entry)
        _commit_all(intact)

    def protect(self, target: torch.Tensor) -> None:
        pointer = target.untyped_storage().data_ptr()
        watched = self.pending.pop(pointer, None)
        if watched is not None:
            self.orphaned.discard(pointer)
            self._commit_intact(watched[1])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Runs for every torch call while the mode is on the stack: keep the common path
        # (an op that never writes) to a dict lookup and the call itself.
        if self.pending:
            try:
                kind, detail = _write_kind(func)
            except TypeError:  # an unhashable callable: classify it every time
                kind, detail = _write_kind.__wrapped__(func)
            if kind != _NEVER or (kwargs and "out" in kwargs):
                self.busy = True
                try:  # the copies are convscope's own: no mode below this one sees them
                    with _no_torch_function():
                        for target in _written_tensors(kind, detail, args, kwargs or {}):
                            self.protect(target)
                finally:
                    self.busy = False
        if kwargs:
            return func(*args, **kwargs)
        return func(*args)

    def settle(self) -> tuple[list[_Verified], list[str]]:
        """At exit: copy what may still be written; find writes the mode could not see.

        Returns the aliases kept without a copy, with the version to check on access (a
        written one among them raises when read), and the names of written outputs.
        """
        self.closed = True
        self._remove_from_stack()
        for storage, entries in self.pending.values():
            shared = any(entry.origin() is not None for entry in entries) or (
                _storage_users(storage._cdata) > 1 + len(entries))
            if shared:  # the caller (or the model) still holds that memory: copy it now
                self._commit_intact(entries)
            else:
                self._release_all(entries)
        self.pending.clear()
        corrupted, kept = self.corrupted, self.kept
        self.kept, self.corrupted = [], []
        for entry in kept:  # no reference from the stored values back to this guard
            entry.origin = entry.calls = None
        for name, calls, index, alias, version in self.proven:
            if alias._version != version:
                corrupted.append(name)
                kept.append(_Verified(name, alias, version))  # reading it raises
            elif _storage_users(alias.untyped_storage()._cdata) > 2:  # alias, handle
                calls[index] = alias.clone()  # still shared at exit (a frame kept by an
            else:                             # exception): copy, as for the guard's outputs
                kept.append(_Verified(name, alias, version))
        self.proven = []
        return kept, corrupted


def _commit_all(entries: list[_Pending]) -> None:
    """Copy aliases that share one storage; equal views share one copy (a container and
    its last child return the same tensor), so memory stays what was requested."""
    copies: dict[tuple, torch.Tensor] = {}
    for entry in entries:
        alias = entry.tensor
        key = (alias.data_ptr(), alias.dtype, tuple(alias.shape), alias.stride())
        copies[key] = entry.commit(copies.get(key))


@contextmanager
def _pre_hook(module: nn.Module, hook: Callable[[nn.Module, tuple], None]) -> Iterator[None]:
    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _Probe(nn.Module):
    def forward(self) -> object:
        return object()


def _fresh_output_refs() -> int:
    """How many references a forward hook sees to an output nobody else holds (counted
    as ``capture``'s hook counts them: through ``forward_hooks`` and ``nn.Module``'s call,
    ``sys.getrefcount`` of the hook's own argument). Measured here, not assumed: it
    depends on the Python and torch versions."""
    seen: list[int] = []
    probe = _Probe()
    with forward_hooks({"probe": probe},
                       lambda _name, _module, _inputs, output: seen.append(
                           sys.getrefcount(output))):
        probe()
    return seen[0]


# Modules whose forward picks a fused fast path only when no torch-function mode is
# active (``torch.overrides.has_torch_function``): under the write guard they would take
# their slower, numerically different path, so capture copies at once for such models.
_MODE_SENSITIVE = (nn.MultiheadAttention, nn.TransformerEncoder, nn.TransformerEncoderLayer)


def _guard_changes_computation(model: nn.Module) -> bool:
    # A plain walk of ``_modules``: ``model.modules()`` costs several times more per call,
    # and this runs on every capture.
    stack = [model]
    while stack:
        module = stack.pop()
        if isinstance(module, _MODE_SENSITIVE):
            return True
        stack.extend(child for child in module._modules.values() if child is not None)
    return False


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

    ``layers`` accepts anything :func:`~convscope.layers.resolve_layers` does. The model
    computes exactly what it computes without capture (every op runs as written), and the
    stored values are detached and exactly what each module returned, even when a later
    in-place op (VGG's ``ReLU(inplace=True)``) rewrites that memory:

    - ``copy="auto"`` (default) keeps the module's own output and copies it only just
      before a torch op writes to it, or at exit when anything besides convscope still
      holds its memory (the output itself, a view, a ``.detach()`` or ``.data`` alias).
      The write guard, a torch-function mode, is on the stack only while the model can
      still reach a stored output, and not at all for outputs that the calling code
      provably only passes to stock readers before dropping them (:mod:`convscope.flow`:
      ResNet's ``out = self.conv1(x)`` followed by ``out = self.bn1(out)``, a conv and
      its BatchNorm in an ``nn.Sequential``). Outputs made on another thread than the one
      that entered ``capture``, or inside a torch-function mode entered in the forward, are
      copied at once. Inference tensors (``torch.inference_mode``) carry no version
      counter to prove an alias intact, so they are copied at once; so are all outputs of
      models with PyTorch's fused attention fast paths (``nn.MultiheadAttention``,
      ``nn.TransformerEncoder[Layer]``), which an active write guard would switch to their
      slower, numerically different path.
      Handing an output's memory outside torch (``.numpy()``, ``__array__``, DLPack, its
      storage or pointer) counts as a write: it is copied first.
    - ``copy=True`` always copies at once: exact whatever runs after the module.
    - ``copy=False`` never copies: reading an output that something rewrote in place
      raises :class:`CaptureIntegrityError` instead of showing the wrong values; under
      ``torch.inference_mode`` it refuses with a :class:`ConvscopeError`. It has no
      guard and trusts the autograd version counter alone, which writes through
      ``.data``, NumPy, DLPack or a raw storage do not move: for models that write that
      way, keep the default.

    Outputs are moved ``to`` a device (``None`` keeps them where they were made) and cast
    to ``dtype`` when given (``torch.float16`` halves memory). Hooks are removed on exit
    and on exceptions; the model is never modified.
    """
    if copy not in (True, False, "auto"):
        raise ValueError(f"copy must be True, False or 'auto'; got {copy!r}")
    modules = resolve_layers(model, layers)
    acts = Activations(modules, model)
    with torch._C.DisableTorchFunction():  # convscope's own call: no user mode sees it
        target = torch.device(to) if to is not None else None
    guard = None
    proven: dict[nn.Module, Proven] = {}
    fresh_refs = -1
    if copy == "auto" and not _guard_changes_computation(model):
        guard = _CopyOnWrite()
        # Outputs that the calling code only passes to stock readers need no guard.
        proven = proven_call_sites(model, frozenset(modules.values()))
        if any(entry.check_fresh for entry in proven.values()):
            fresh_refs = _fresh_output_refs()
    eager = copy is True or (copy == "auto" and guard is None)
    on_cpu = target is not None and target.type == "cpu"

    def kept_as_is(output: Any) -> bool:
        """Stored without a conversion: a tensor already on ``to`` and in ``dtype``."""
        return (
            isinstance(output, torch.Tensor)
            and (target is None or (output.is_cpu if on_cpu else output.device == target))
            and (dtype is None or output.dtype == dtype or not output.is_floating_point())
        )

    as_made = dtype is None and (target is None or on_cpu)  # no conversion but to the CPU
    capture_thread = threading.get_ident()

    def guarded_hook(name: str, module: nn.Module, inputs: tuple, output: Any) -> None:
        # copy="auto": runs once per captured call, so it is kept short. Python run between
        # two kernels is several times slower than alone (the kernels evict its data), so
        # the common case, an output the calling code only passes to stock readers, comes
        # first and touches little. No torch-function mode is active there (so tensor
        # calls dispatch directly); elsewhere the bookkeeping's own tensor calls need not
        # pass through any mode, hence DisableTorchFunction.
        entry = proven.get(module)
        if (entry is not None and as_made and type(output) is torch.Tensor
                and not _stack_depth() and (target is None or output.is_cpu)
                and not output.is_inference() and threading.get_ident() == capture_thread
                and called_from(entry.sites, sys._getframe(1))
                and (not entry.check_fresh or (  # a custom module: nobody else holds it
                    sys.getrefcount(output) == fresh_refs
                    and _storage_users(output.untyped_storage()._cdata) == 2))):
            calls = acts._calls[name]
            alias = output.detach()
            calls.append(alias)
            guard.proven.append((name, calls, len(calls) - 1, alias, alias._version))
            return
        modes_on = _function_state() != _ALL_DISABLED
        with _no_torch_function():
            guard.busy = True
            try:
                if guard.deferred or guard.orphaned:
                    guard.checkpoint()
                if not (kept_as_is(output) and not output.is_inference() and modes_on):
                    acts._record(name, copy_output(output, to, dtype))  # converted, inference
                elif guard.activate():
                    guard.watch(name, acts._calls[name], output)
                else:  # a thread or a context the write guard cannot see
                    acts._record(name, copy_output(output, to, dtype))
            finally:
                guard.busy = False
            if guard.deferred:
                guard.checkpoint()
            if guard.on_stack and not guard.pending:
                guard.maybe_pop()

    def hook(name: str, module: nn.Module, inputs: tuple, output: Any) -> None:
        # copy=True, copy=False, or "auto" on a model the guard would change.
        with _no_torch_function():
            if eager or not kept_as_is(output):
                acts._record(name, copy_output(output, to, dtype))
            elif output.is_inference():
                raise ConvscopeError(
                    "capture(copy=False) cannot verify outputs under torch.inference_mode "
                    "(inference tensors have no version counter); use copy='auto' or True"
                )
            else:  # copy=False: each read checks the version counter
                calls = acts._calls[name]
                calls.append(output.detach())
                acts._verify.append(_Verified(name, calls[-1], calls[-1]._version))

    def note_input(_module: nn.Module, inputs: tuple) -> None:
        with torch._C.DisableTorchFunction():
            image = first_tensor(inputs)
            if isinstance(image, torch.Tensor) and image.dim() == 4:
                acts.input_hw = (int(image.shape[-2]), int(image.shape[-1]))
                acts.batch_size = int(image.shape[0])

    with forward_hooks(modules, hook if guard is None else guarded_hook), \
            _pre_hook(model, note_input):
        if guard is None:
            yield acts  # copy=False or copy=True: nothing to watch
            return
        failed = False
        try:
            yield acts
        except BaseException:
            failed = True
            raise
        finally:
            with torch._C.DisableTorchFunction():
                kept, corrupted = guard.settle()
            acts._verify.extend(kept)
            if corrupted and not failed:
                raise CaptureIntegrityError(
                    "the output of " + ", ".join(sorted(set(corrupted))) + " was modified in "
                    "place by an operation convscope could not intercept (C++/TorchScript code "
                    "or another thread); capture again with copy=True"
                )


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
