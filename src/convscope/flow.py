"""Prove, from the calling code, that a module's output is only read before it is dropped.

``capture(copy="auto")`` must store each module's true output even when a later in-place
op rewrites that memory. Its write guard (a torch-function mode in :mod:`convscope.hooks`)
makes that exact for any code, but it runs Python for every torch call that can reach a
stored output. Most conv outputs need none of it: ResNet's ``out = self.conv1(x)`` is read
by ``out = self.bn1(out)`` and dropped. This module recognises that case:

- the caller stores the module's result in a local variable and, in straight-line code
  that no exception handler covers, passes that variable only as the sole argument of
  calls ``self.<child>(var)`` until the variable is rebound or the function returns; or
  passes the result straight to one such call (``self.bn(self.conv(x))``); or the caller
  is ``nn.Sequential``'s own loop and the next child reads it;
- every such reader is a stock PyTorch module known to read its input and return a new
  tensor (a conv, a norm, a pooling, a non-in-place activation), with no hooks but
  convscope's own and no global module hooks;
- the module that made the output is registered in one parent and has no hooks; a stock
  one allocates its output and keeps no reference to it, any other one's output is shown
  fresh when it is stored (``capture`` compares its reference count with that of a fresh
  object seen the same way, and nothing else shares its memory).

Anything else (another pattern, a custom reader, a closure, a loop) is not proven and goes
through the write guard. The reading of the bytecode is cached per code object and call
offset; the modules are checked at each call. A proof that a later forward contradicts
cannot give a wrong value silently: stored aliases are still checked against their version
counter when read.
"""

from __future__ import annotations

import dis
import functools
import sys
from types import CodeType, FrameType
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules import module as _module_internals

_MODULE_FILE = nn.Module._call_impl.__code__.co_filename
_SEQUENTIAL_FORWARD = nn.Sequential.forward
_SEQUENTIAL_CODE = _SEQUENTIAL_FORWARD.__code__
_storage_users = torch._C._storage_Use_Count

# Stock modules whose forward reads its input, returns a newly allocated tensor and keeps
# no reference to input or output. Activations only when not in place (checked per call).
_READERS: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.ELU, nn.SiLU, nn.Hardswish,
    nn.Hardsigmoid, nn.Mish, nn.GELU, nn.Sigmoid, nn.Tanh,
)
# Exact classes: a subclass may keep ``forward`` and replace what it calls
# (``Conv2d._conv_forward``, ``_BatchNorm._check_input_dim``).
_READER_TYPES = frozenset(_READERS)

_CALLS = frozenset({"CALL", "CALL_FUNCTION", "CALL_METHOD"})
_ATTRIBUTE_LOADS = frozenset({"LOAD_ATTR", "LOAD_METHOD"})
_ENDS = frozenset({"RETURN_VALUE", "RETURN_CONST"})
_NEUTRAL = frozenset({
    "NOP", "RESUME", "CACHE", "EXTENDED_ARG", "PUSH_NULL", "POP_TOP", "COPY", "SWAP",
    "LOAD_CONST", "LOAD_GLOBAL", "LOAD_NAME", "LOAD_ATTR", "LOAD_METHOD", "LOAD_FAST",
    "LOAD_FAST_CHECK", "STORE_FAST", "PRECALL", "CALL", "CALL_FUNCTION", "CALL_METHOD",
    "KW_NAMES", "CALL_KW", "CALL_FUNCTION_KW", "BINARY_OP", "BINARY_SUBSCR", "COMPARE_OP",
    "BUILD_TUPLE", "BUILD_LIST", "BUILD_MAP", "BUILD_CONST_KEY_MAP", "UNARY_NEGATIVE",
    "UNARY_NOT", "UNARY_INVERT", "TO_BOOL", "LOAD_SMALL_INT", "IS_OP", "CONTAINS_OP",
    "BINARY_ADD", "BINARY_SUBTRACT", "BINARY_MULTIPLY", "BINARY_TRUE_DIVIDE",  # 3.10
    "BINARY_MATRIX_MULTIPLY",
})


class _Op(NamedTuple):
    name: str
    arg: int | None
    value: object
    offset: int


class Reads(NamedTuple):
    """A call ``<owner>.<callee>(var)`` whose result only ``<owner>.<child>(...)`` calls
    read before it is dropped: ``owner`` is a local, the others attribute names."""

    owner: str
    callee: str
    children: tuple[str, ...]


@functools.lru_cache(maxsize=512)
def _ops(code: CodeType) -> tuple[tuple[_Op, ...], dict[int, int], tuple[tuple[int, int], ...]]:
    """The code's instructions (superinstructions split in two), the index of each offset,
    and the offset ranges that an exception handler covers."""
    ops: list[_Op] = []
    index: dict[int, int] = {}
    bytecode = dis.Bytecode(code)
    for ins in bytecode:
        index[ins.offset] = len(ops)
        name = ins.opname
        if "_FAST_" in name and name.count("FAST") == 2 and isinstance(ins.argval, tuple):
            first, second = name.split("_FAST_")  # LOAD_FAST_LOAD_FAST, STORE_FAST_LOAD_FAST
            ops.append(_Op(first + "_FAST", None, ins.argval[0], ins.offset))
            ops.append(_Op(second.replace("_FAST", "") + "_FAST", None, ins.argval[1],
                           ins.offset))
        else:
            ops.append(_Op(name, ins.arg, ins.argval, ins.offset))
    handlers = tuple((entry.start, entry.end)
                     for entry in getattr(bytecode, "exception_entries", ()))
    if sys.version_info < (3, 11) and any(op.name.startswith("SETUP_") for op in ops):
        handlers = ((0, sys.maxsize),)  # 3.10 blocks: give up on any try/with
    return tuple(ops), index, handlers


def _is_call(op: _Op) -> bool:
    return op.name in _CALLS and op.arg == 1


def _method_call_before(ops: tuple[_Op, ...], at: int) -> tuple[str, str] | None:
    """``(owner, attribute)`` when the call ending at ``ops[at]`` is
    ``<owner>.<attribute>(<local>)`` (one argument, read from a local variable)."""
    if not _is_call(ops[at]):
        return None
    if ops[at - 1].name == "PRECALL":
        at -= 1
    if at < 3 or ops[at - 1].name != "LOAD_FAST" or ops[at - 2].name not in _ATTRIBUTE_LOADS \
            or ops[at - 3].name != "LOAD_FAST":
        return None
    return str(ops[at - 3].value), str(ops[at - 2].value)


def _enclosing_reader(ops: tuple[_Op, ...], at: int, owner: str) -> tuple[str, int] | None:
    """``(reader, offset of its call)`` when the call ending at ``ops[at]`` is the sole
    argument of an enclosing ``<owner>.<reader>(...)``, as in ``self.bn(self.conv(x))``:
    the reader was loaded just before this call began and is called with one argument
    right after it ends, so that argument is this call's result and nothing else sees it."""
    start = at - 1 if ops[at - 1].name == "PRECALL" else at
    start -= 3  # LOAD_FAST owner, LOAD_ATTR callee, LOAD_FAST argument
    after = at + 1
    if after < len(ops) and ops[after].name == "PRECALL":
        after += 1
    if (start < 2 or after >= len(ops) or not _is_call(ops[after])
            or ops[start - 1].name not in _ATTRIBUTE_LOADS or ops[start - 2].name != "LOAD_FAST"
            or ops[start - 2].value != owner):
        return None
    return str(ops[start - 1].value), ops[after].offset


@functools.lru_cache(maxsize=4096)
def call_site_reads(code: CodeType, offset: int) -> Reads | None:
    """Read the bytecode after the call at ``offset``: the readers of its result, or None
    when the result may flow anywhere else."""
    ops, index, handlers = _ops(code)
    at = index.get(offset)
    if at is None or at + 1 >= len(ops):
        return None
    called = _method_call_before(ops, at)
    if called is None:
        return None
    nested = _enclosing_reader(ops, at, called[0])
    if nested is not None:
        reader, end = nested
        if any(start <= end and offset < stop for start, stop in handlers):
            return None
        return Reads(called[0], called[1], (reader,))
    store = ops[at + 1]
    if store.name != "STORE_FAST":
        return None
    var = store.value
    children: list[str] = []
    end = None
    i = at + 2
    while i < len(ops):
        op = ops[i]
        if op.name not in _NEUTRAL and op.name not in _ENDS:
            return None  # a jump, a loop, a closure, a with block: not straight-line
        if op.name in _ENDS:
            end = op.offset
            break
        if op.value == var and op.name == "STORE_FAST":
            end = op.offset
            break
        if op.value == var:
            # Only ``<owner>.<child>(var)``: LOAD_FAST owner, LOAD_ATTR child, LOAD_FAST var,
            # [PRECALL 1,] CALL 1.
            if op.name != "LOAD_FAST" or i + 1 >= len(ops):
                return None
            following = i + 1
            if ops[following].name == "PRECALL" and following + 1 < len(ops):
                following += 1
            reader = _method_call_before(ops, following)
            if reader is None or reader[0] != called[0]:
                return None
            children.append(reader[1])
        elif op.name == "STORE_FAST" and op.value == called[0]:
            return None  # the owner rebound: its children are others
        i += 1
    if end is None:
        return None
    if any(start <= end and offset < stop for start, stop in handlers):
        return None  # an exception handler could see the variable
    return Reads(called[0], called[1], tuple(children))


def _child(owner: nn.Module, attribute: str) -> nn.Module | None:
    """``owner.<attribute>`` when it is surely the registered child module (no property,
    instance attribute or custom ``__getattr__`` in the way)."""
    kind = type(owner)
    if kind.__getattr__ is not nn.Module.__getattr__ or attribute in owner.__dict__:
        return None
    for cls in kind.__mro__:  # a class attribute (a property) would win over the child
        if attribute in cls.__dict__:
            return None
    return owner._modules.get(attribute)


def _no_global_hooks() -> bool:
    return not (_module_internals._global_forward_hooks
                or _module_internals._global_forward_pre_hooks
                or _module_internals._global_backward_hooks
                or _module_internals._global_backward_pre_hooks)


def _unhooked(module: nn.Module) -> bool:
    """No hooks of its own, no forward set on the instance, not in place."""
    state = module.__dict__  # plain dict reads: a missing attribute would cost a raise
    return (
        "forward" not in state
        and not state.get("inplace", False)
        and not state.get("_forward_pre_hooks")
        and not state.get("_forward_hooks")
        and not state.get("_backward_hooks")
        and not state.get("_backward_pre_hooks")
    )


def stock_module(module: nn.Module) -> bool:
    """A stock reader (its exact class) with no hooks (checked before convscope registers
    its own)."""
    return type(module) in _READER_TYPES and _unhooked(module)


@functools.lru_cache(maxsize=512)
def _proven_sites_in(code: CodeType) -> tuple[tuple[int, Reads], ...]:
    """The call sites of a method whose result only ``self``'s children read."""
    if not code.co_argcount:
        return ()
    this = code.co_varnames[0]
    ops, _, _ = _ops(code)
    if any(op.value == this and op.name != "LOAD_FAST" for op in ops):
        return ()  # ``self`` rebound or deleted somewhere: the owner is not the instance
    sites = []
    for op in ops:
        if op.name in _CALLS:
            reads = call_site_reads(code, op.offset)
            if reads is not None and reads.owner == this:
                sites.append((op.offset, reads))
    return tuple(sites)


def _method_codes(kind: type) -> list[CodeType]:
    """Code of the plain functions a module class defines (below ``nn.Module``)."""
    codes = []
    for cls in kind.__mro__:
        if cls is nn.Module or not issubclass(cls, nn.Module):
            break
        for value in vars(cls).values():
            code = getattr(value, "__code__", None)
            if isinstance(code, CodeType):
                codes.append(code)
    return codes


#: ``(id(code), offset)`` of a call -> that code (kept so that its id stays its own)
Sites = dict[tuple[int, int], CodeType]


class Proven(NamedTuple):
    """A hooked module's proven call sites; ``check_fresh``: its class is not a stock one,
    so each output must also be shown fresh when it is stored (see ``capture``)."""

    sites: Sites
    check_fresh: bool


def proven_call_sites(root: nn.Module, hooked: frozenset[nn.Module]) -> dict[nn.Module, Proven]:
    """For each hooked module, the call sites in its parent's code after which nothing can
    write its output: only stock readers read it before it is dropped.

    Checked when ``capture`` starts. A module qualifies when it is registered in exactly
    one parent and has no hooks, and a site when it calls ``self.<that child's name>(...)``:
    then the code running at that site is the parent's own, so the readers checked here
    are the ones that run. A stock module makes a new output and keeps no reference to it;
    any other module's output must be shown fresh at each call (no other reference to the
    tensor, no other tensor on its memory). At each call the hook compares its caller's
    code and offset with these (:func:`called_from`).
    """
    if not _no_global_hooks():
        return {}
    parents: dict[nn.Module, list[tuple[nn.Module, str]]] = {}
    stack, seen = [root], {id(root)}
    while stack:
        parent = stack.pop()
        for attribute, child in parent._modules.items():
            if child is None:
                continue
            if child in hooked:
                parents.setdefault(child, []).append((parent, attribute))
            if id(child) not in seen:
                seen.add(id(child))
                stack.append(child)
    proven: dict[nn.Module, Proven] = {}
    by_parent: dict[int, dict[str, Sites]] = {}
    for child, places in parents.items():
        if len(places) != 1 or not _unhooked(child):
            continue  # registered twice (shared): its caller is ambiguous
        check_fresh = type(child) not in _READER_TYPES
        parent, attribute = places[0]
        if isinstance(parent, nn.Sequential):
            if _next_in_sequence_reads(parent, child):
                proven[child] = Proven(
                    {(id(_SEQUENTIAL_CODE), _SEQUENTIAL_CALL): _SEQUENTIAL_CODE}, check_fresh)
            continue
        sites = by_parent.get(id(parent))
        if sites is None:
            sites = by_parent[id(parent)] = _sites_of(parent)
        if attribute in sites and _child(parent, attribute) is child:
            proven[child] = Proven(sites[attribute], check_fresh)
    return proven


@functools.lru_cache(maxsize=256)
def _class_sites(kind: type) -> tuple[tuple[CodeType, int, Reads], ...]:
    """Per module class: each proven call site of its methods (keyed by class; a method
    replaced later has new code, which matches no site here)."""
    return tuple((code, offset, reads)
                 for code in _method_codes(kind) for offset, reads in _proven_sites_in(code))


def _sites_of(parent: nn.Module) -> dict[str, Sites]:
    """The proven call sites of ``parent``'s methods by the child they call, keeping those
    whose readers, resolved on ``parent``, are all stock readers."""
    if "forward" in parent.__dict__:
        return {}
    readable: dict[str, bool] = {}
    sites: dict[str, Sites] = {}
    for code, offset, reads in _class_sites(type(parent)):
        for name in reads.children:
            ok = readable.get(name)
            if ok is None:
                child = _child(parent, name)
                ok = readable[name] = child is not None and stock_module(child)
            if not ok:
                break
        else:
            sites.setdefault(reads.callee, {})[(id(code), offset)] = code
    return sites


def called_from(sites: Sites, frame: FrameType | None) -> bool:
    """Whether the hook's caller frame is at one of the proven call sites."""
    while frame is not None and frame.f_code.co_filename == _MODULE_FILE:
        frame = frame.f_back
    if frame is None:
        return False
    code = frame.f_code
    return sites.get((id(code), frame.f_lasti)) is code


def _sequential_call() -> int:
    calls = [op.offset for op in _ops(_SEQUENTIAL_CODE)[0] if op.name in _CALLS]
    if len(calls) != 1:
        return -1  # a changed nn.Sequential.forward: prove nothing there
    return calls[0]


_SEQUENTIAL_CALL = _sequential_call()


def _next_in_sequence_reads(sequence: nn.Sequential, module: nn.Module) -> bool:
    """``nn.Sequential.forward`` passes each child's result to the next child only."""
    kind = type(sequence)
    if kind.__iter__ is not nn.Sequential.__iter__ or kind.forward is not _SEQUENTIAL_FORWARD \
            or "forward" in sequence.__dict__ or _SEQUENTIAL_CALL < 0:
        return False
    children = list(sequence._modules.values())
    positions = [i for i, child in enumerate(children) if child is module]
    if len(positions) != 1 or positions[0] + 1 >= len(children):
        return False  # reused in the sequence, or the last child (its result is returned)
    following = children[positions[0] + 1]
    return following is not None and stock_module(following)
