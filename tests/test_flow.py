"""convscope.flow: which outputs capture may store without its write guard.

A proof here lets ``capture(copy="auto")`` keep a module's own output without watching the
calls that follow. Each unsafe pattern below must be refused (and the values stay exact
through the guard); the patterns that are proven must really be only read; a wrong proof
must surface as an error, never as a wrong value.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import nn

from convscope import capture, flow
from convscope.hooks import CaptureIntegrityError, _CopyOnWrite


def _convs(model: nn.Module) -> set[nn.Module]:
    return {m for m in model.modules() if isinstance(m, nn.Conv2d)}


def _proven(model: nn.Module, modules: set[nn.Module]) -> set[nn.Module]:
    return set(flow.proven_call_sites(model, frozenset(modules)))


def _every_output(module: nn.Module, run: Callable[[], object]) -> list[torch.Tensor]:
    """Each output of ``module`` while ``run()`` runs (no grad), cloned the moment it is
    made: an independent reference."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return seen


def _truth(model: nn.Module, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's last output in ``model(x)``, cloned the moment it is made."""
    return _every_output(module, lambda: model(x.clone()))[-1]


def _assert_same_calls(stored: list[torch.Tensor], truth: list[torch.Tensor]) -> None:
    assert len(stored) == len(truth) and all(torch.equal(a, b) for a, b in zip(stored, truth))


def _count_watched(monkeypatch) -> list[str]:
    """Names of the outputs that go through the write guard from now on."""
    watched: list[str] = []
    original = _CopyOnWrite.watch
    monkeypatch.setattr(_CopyOnWrite, "watch",
                        lambda self, *a: (watched.append(a[0]), original(self, *a))[1])
    return watched


def _captured(model: nn.Module, module: nn.Module, x: torch.Tensor, monkeypatch
              ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(stored value, model output, outputs that went through the write guard)."""
    original = _CopyOnWrite.watch
    watched = _count_watched(monkeypatch)
    name = next(n for n, m in model.named_modules() if m is module)
    with torch.no_grad(), capture(model, [name]) as acts:
        out = model(x.clone())
    monkeypatch.setattr(_CopyOnWrite, "watch", original)
    return acts[name], out, len(watched)


# --------------------------------------------------------------------------------------
# Proven: the patterns of real CNNs.


@pytest.mark.parametrize("builder", [torchvision.models.resnet18, torchvision.models.mobilenet_v3_small,
                                     torchvision.models.regnet_y_400mf])
def test_every_conv_of_resnet_mobilenet_regnet_is_proven_and_stored_without_the_guard(builder,
                                                                                       monkeypatch):
    torch.manual_seed(0)
    model = builder().eval()
    convs = _convs(model)
    assert _proven(model, convs) == convs
    watched = _count_watched(monkeypatch)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        expected = model(x)
        with capture(model, nn.Conv2d) as acts:
            out = model(x)
    assert watched == []
    assert torch.equal(out, expected)
    # Every stored value is the module's true output (independent clone-at-once hooks).
    for name, module in model.named_modules():
        if module in convs:
            assert torch.equal(acts[name], _truth(model, module, x)), name


def test_vgg_convs_are_not_proven_because_an_in_place_relu_reads_them():
    model = torchvision.models.vgg11()
    assert _proven(model, _convs(model)) == set()


def test_resnet_block_sites_read_from_the_bytecode():
    from torchvision.models.resnet import Bottleneck

    sites = {reads.callee: reads.children
             for _, reads in flow._proven_sites_in(Bottleneck.forward.__code__)}
    # Each conv's result goes to its BatchNorm only; bn3's result is added to the identity
    # and the downsample's result is kept as the identity: neither is proven.
    assert sites["conv1"] == ("bn1",) and sites["conv2"] == ("bn2",) and sites["conv3"] == ("bn3",)
    assert "bn3" not in sites and "downsample" not in sites


class _Calls:
    """Call shapes around a nested call, read from the bytecode only."""

    def nested(self, x):
        return self.act(self.bn(self.conv(x)))

    def added(self, x):
        return self.x + self.conv(x)

    def second_argument(self, x):
        return torch.add(self.x, self.conv(x))

    def attribute_chain(self, x):
        return self.a.b(self.conv(x))

    def keyword(self, x):
        return self.bn(input=self.conv(x))


@pytest.mark.parametrize(("method", "expected"), [
    ("nested", ("bn",)), ("added", None), ("second_argument", None),
    ("attribute_chain", None), ("keyword", None),
])
def test_a_result_passed_straight_to_a_reader(method, expected):
    sites = {reads.callee: reads.children
             for _, reads in flow._proven_sites_in(getattr(_Calls, method).__code__)}
    assert sites.get("conv") == expected


# --------------------------------------------------------------------------------------
# Refused: every way the output can still be written. Values stay exact (the guard).


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)


class AliasCopy(_Block):
    def forward(self, x):
        out = self.conv(x)
        alias = out
        alias.relu_()
        return self.bn(out)


class ReadThenWrite(_Block):
    def forward(self, x):
        out = self.conv(x)
        y = self.bn(out)
        out.mul_(2)
        return y + out


class InplaceReader(_Block):
    def forward(self, x):
        out = self.conv(x)
        out = self.act(out)
        return self.bn(out)


class Branch(_Block):
    flag = True

    def forward(self, x):
        out = self.conv(x)
        if self.flag:
            out.clamp_(min=0)
        out = self.bn(out)
        return out


class BranchSkipsKill(_Block):
    """Straight-line reading would see ``out`` read by ``bn`` and rebound; the branch can
    skip both, and then the conv output is written."""

    flag = False

    def forward(self, x):
        out = self.conv(x)
        if self.flag:
            out = self.bn(out)
        out.relu_()
        return out


class DataAlias(_Block):
    def forward(self, x):
        out = self.conv(x)
        raw = out.data
        y = self.bn(out)
        raw.mul_(3)
        return y


class TwoArguments(_Block):
    def forward(self, x):
        out = self.conv(x)
        out = self.combine(out, x)
        return self.bn(out)

    def combine(self, a, b):
        return a.add_(b.mean())


class TryHandler(_Block):
    def forward(self, x):
        try:
            out = self.conv(x)
            out = self.bn(out)
        except RuntimeError:
            out = x
        return out


class HelperMethodWrites(_Block):
    def forward(self, x):
        out = self.conv(x)
        out = self.helper(out)
        return out

    def helper(self, value):
        return value.sub_(1)


class ViaGetattr(_Block):
    def forward(self, x):
        out = getattr(self, "conv")(x)  # noqa: B009 - the pattern under test
        out.relu_()
        return self.bn(out)


class WritingBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        x.relu_()
        return super().forward(x)


class ConvWritingItsInput(nn.Conv2d):
    """Keeps the stock ``forward`` and replaces what it calls."""

    def _conv_forward(self, x, weight, bias):
        x.relu_()
        return super()._conv_forward(x, weight, bias)


class SubclassKeepsForward(_Block):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.reader = ConvWritingItsInput(4, 4, 1)

    def forward(self, x):
        out = self.conv(x)
        out = self.reader(out)
        return self.bn(out)


class SubclassReader(_Block):
    def __init__(self) -> None:
        super().__init__()
        self.bn = WritingBatchNorm(4)

    def forward(self, x):
        out = self.conv(x)
        out = self.bn(out)
        return out


class PropertyReader(_Block):
    """``self.bn`` is a property: the registered child is not what the code calls."""

    @property
    def bn(self):  # type: ignore[override]
        return self.act

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.add_module("bn", nn.BatchNorm2d(4))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.conv(x)
        out = self.bn(out)
        return out * 1.0


class ReboundSelf(_Block):
    def forward(self, x):
        out = self.conv(x)
        out = self.bn(out)
        self = self.act  # the pattern under test
        return self(out)


class NestedUnderTry(nn.Module):
    """``self.bn(self.conv(x))`` inside ``try``: the BatchNorm (built for the wrong channel
    count) raises, and the handler reaches the conv output through the traceback's frames,
    as any code given the exception can, and writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.bn(self.conv(x))
        except RuntimeError as error:
            tb = error.__traceback__
            while tb is not None:
                held = tb.tb_frame.f_locals.get("input")
                if isinstance(held, torch.Tensor):
                    held.zero_()
                    return held
                tb = tb.tb_next
            raise


class Side(nn.Module):
    """Holds a child named like the parent's stock reader, but one that writes its input."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.ReLU(inplace=True)


class ReaderOfAnotherOwner(nn.Module):
    """``other.bn(self.conv(x))``: the enclosing call's owner is not ``self``, so the
    ``bn`` that reads the conv output is ``other.bn`` (in place), not ``self.bn``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.side = Side()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        other = self.side
        return other.bn(self.conv(x))


class ShadowedReader(nn.Module):
    """``self.bn`` is registered as a stock BatchNorm, but an instance attribute of the
    same name (set past ``nn.Module.__setattr__``) wins the lookup: an in-place ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.__dict__["bn"] = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        out = self.bn(out)
        return out


REFUSED = [AliasCopy, ReadThenWrite, InplaceReader, Branch, BranchSkipsKill, DataAlias, TwoArguments,
           TryHandler, HelperMethodWrites, ViaGetattr, SubclassReader, SubclassKeepsForward,
           PropertyReader,
           ReboundSelf, NestedUnderTry, ReaderOfAnotherOwner, ShadowedReader]


@pytest.mark.parametrize("kind", REFUSED, ids=lambda k: k.__name__)
def test_unsafe_patterns_are_refused_and_values_stay_exact(kind, monkeypatch):
    torch.manual_seed(0)
    model = kind().eval()
    model._modules["bn"].running_mean.uniform_(-1, 1)  # BatchNorm is not an identity
    x = torch.randn(2, 3, 8, 6)
    assert model.conv not in _proven(model, {model.conv}), kind.__name__
    with torch.no_grad():
        expected = model(x.clone())
    stored, out, _ = _captured(model, model.conv, x, monkeypatch)
    assert torch.equal(out, expected)
    assert torch.equal(stored, _truth(model, model.conv, x))


class Plain(_Block):
    def forward(self, x):
        out = self.conv(x)
        out = self.bn(out)
        return self.act(out)


def test_the_plain_pattern_is_proven_and_each_hook_condition_refuses_it(monkeypatch):
    model = Plain().eval()
    assert _proven(model, {model.conv}) == {model.conv}
    stored, _, watched = _captured(model, model.conv, torch.randn(1, 3, 5, 5), monkeypatch)
    assert watched == 0

    # A hook on the reader (it could write its input), or on the captured module itself.
    handle = model.bn.register_forward_pre_hook(lambda _m, inputs: inputs[0].mul_(2))
    try:
        assert _proven(model, {model.conv}) == set()
        x = torch.randn(1, 3, 5, 5)
        stored, _, watched = _captured(model, model.conv, x, monkeypatch)
        assert watched == 1
        handle.remove()
        assert torch.equal(stored, _truth(model, model.conv, x))
    finally:
        handle.remove()
    handle = model.conv.register_forward_hook(lambda *_: None)
    try:
        assert _proven(model, {model.conv}) == set()
    finally:
        handle.remove()

    # A global module hook: nothing is proven.
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *_: None)
    try:
        assert _proven(model, {model.conv}) == set()
    finally:
        handle.remove()

    # A reader made in-place, or the module registered in two parents.
    model.bn = nn.ReLU(inplace=True)
    assert _proven(model, {model.conv}) == set()
    model.bn = nn.BatchNorm2d(4)
    holder = nn.Sequential(model.conv)
    wrapper = nn.ModuleList([model, holder])
    assert _proven(wrapper, {model.conv}) == set()


def test_a_module_shared_by_two_parents_is_not_proven():
    """Two blocks of one class share a conv; the second's reader writes in place. The
    code and offset of the call are the same in both, so only the parent could tell."""
    first, second = Plain().eval(), Plain().eval()
    second.conv = first.conv
    first.bn = nn.ReLU(inplace=True)
    model = nn.Sequential(first, second)
    for parents in (model, nn.Sequential(second, first)):  # either parent met first
        assert _proven(parents, {first.conv}) == set()
    x = torch.randn(1, 3, 5, 5)
    truth = _every_output(first.conv, lambda: (first(x), second(x)))
    assert len(truth) == 2
    with torch.no_grad(), capture(model, ["0.conv"]) as acts:
        first(x)
        second(x)
    _assert_same_calls(acts.calls("0.conv"), truth)


def test_sequential_next_child_must_be_a_stock_reader():
    conv_a, conv_b, conv_c = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
    seq = nn.Sequential(conv_a, nn.BatchNorm2d(3), conv_b, nn.ReLU(inplace=True), conv_c)
    assert _proven(seq, {conv_a, conv_b, conv_c}) == {conv_a}  # conv_c is last: returned

    class Reordered(nn.Sequential):
        def __iter__(self):
            return reversed(list(self._modules.values()))

    assert _proven(Reordered(conv_a, nn.BatchNorm2d(3)), {conv_a}) == set()


def _count_proven(monkeypatch) -> list[int]:
    counts: list[int] = []
    original = _CopyOnWrite.settle
    monkeypatch.setattr(_CopyOnWrite, "settle",
                        lambda self: (counts.append(len(self.proven)), original(self))[1])
    return counts


def test_a_forward_on_another_thread_copies_at_once(monkeypatch):
    model = Plain().eval()
    x = torch.randn(1, 3, 5, 5)
    counts = _count_proven(monkeypatch)
    with torch.no_grad(), capture(model, ["conv"]) as acts:
        model(x.clone())
    assert counts == [1]
    with torch.no_grad(), capture(model, ["conv"]) as acts:
        worker = threading.Thread(target=lambda: model(x.clone()))
        worker.start()
        worker.join()
    assert counts == [1, 0]
    assert torch.equal(acts["conv"], _truth(model, model.conv, x))


class TwoSites(_Block):
    """The same conv called at a proven site and at one whose result is written."""

    def forward(self, x):
        out = self.conv(x)
        out = self.bn(out)
        again = self.conv(x + 1)
        again.relu_()
        return out + again


def test_only_calls_from_a_proven_site_skip_the_guard(monkeypatch):
    model = TwoSites().eval()
    assert _proven(model, {model.conv}) == {model.conv}
    x = torch.randn(1, 3, 5, 5)
    results = []
    truth = _every_output(model.conv, lambda: results.append(model(x)))
    assert len(truth) == 2
    counts = _count_proven(monkeypatch)
    with torch.no_grad(), capture(model, ["conv"]) as acts:
        out = model(x)
    assert counts == [1]
    assert torch.equal(out, results[0])
    _assert_same_calls(acts.calls("conv"), truth)


def test_user_mode_around_the_capture_turns_proofs_off(monkeypatch):
    """Under any torch-function mode the output goes through the guard path."""
    from torch.overrides import TorchFunctionMode

    class Counting(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Counting.calls += 1
            return func(*args, **(kwargs or {}))

    model = Plain().eval()
    x = torch.randn(1, 3, 5, 5)
    with Counting():
        stored, _, watched = _captured(model, model.conv, x, monkeypatch)
    assert watched == 1
    assert torch.equal(stored, _truth(model, model.conv, x))


def test_an_exception_that_keeps_the_frame_alive_leaves_a_private_copy():
    """A reader raises while the output is still bound in the caller's frame: the stored
    value is copied at exit, so writing the frame's tensor later does not reach it."""
    model = Plain().train()  # BatchNorm in training on one value per channel raises
    x = torch.randn(1, 3, 1, 1)
    with pytest.raises(ValueError, match="more than 1 value") as excinfo, \
            capture(model, ["conv"]) as acts:
        model(x)
    frame_out = None
    tb = excinfo.tb
    while tb is not None:
        if tb.tb_frame.f_code is Plain.forward.__code__:
            frame_out = tb.tb_frame.f_locals["out"]
        tb = tb.tb_next
    assert frame_out is not None
    truth = frame_out.detach().clone()
    frame_out.detach().add_(100)
    assert torch.equal(acts["conv"], truth)


class Writer(nn.Module):
    """Not a reader: it writes its input in place."""

    def forward(self, x):
        return x.mul_(5)


class WriterBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.write = Writer()

    def forward(self, x):
        out = self.conv(x)
        out = self.write(out)
        return out


def test_a_wrong_proof_is_reported_never_a_wrong_value(monkeypatch):
    """If the list of stock readers were wrong, the stored alias's version counter would
    show the write: capture raises instead of returning the rewritten values."""
    model = WriterBlock()
    assert _proven(model, {model.conv}) == set()
    monkeypatch.setattr(flow, "_READER_TYPES", flow._READER_TYPES | {Writer})
    flow._class_sites.cache_clear()
    assert _proven(model, {model.conv}) == {model.conv}
    with pytest.raises(CaptureIntegrityError, match="conv"), torch.no_grad(), \
            capture(model, ["conv"]) as acts:
        model(torch.randn(1, 3, 4, 4))
    with pytest.raises(CaptureIntegrityError, match="conv"):
        acts["conv"]  # nor can the rewritten alias be read afterwards
    with pytest.raises(KeyError), torch.no_grad(), capture(model, ["conv"]) as acts:
        model(torch.randn(1, 3, 4, 4))
        raise KeyError("the body's own error replaces the report at exit")
    with pytest.raises(CaptureIntegrityError, match="conv"):
        acts["conv"]


# --------------------------------------------------------------------------------------
# Custom captured modules: proven sites, and each output shown fresh when stored.


class PaddedConv(nn.Conv2d):
    """Like EfficientNet-Lite's ``Conv2dStaticSamePadding``: its own forward, a new output."""

    def forward(self, x):
        x = nn.functional.pad(x, (1, 1, 1, 1))
        return nn.functional.conv2d(x, self.weight, self.bias)


class KeepsOutput(nn.Conv2d):
    """Keeps its last output and rewrites it at the next call."""

    def forward(self, x):
        if getattr(self, "last", None) is not None:
            self.last.zero_()
        self.last = super().forward(x)
        return self.last


class KeepsDataAlias(nn.Conv2d):
    """Keeps a ``.data`` alias (no shared version counter) and rewrites it later."""

    def forward(self, x):
        if getattr(self, "last", None) is not None:
            self.last.fill_(7.0)
        out = super().forward(x)
        self.last = out.data
        return out


class ReturnsItsBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("state", torch.zeros(1, 4, 5, 5))

    def forward(self, x):
        return self.state.add_(x.mean())


class CustomBlock(nn.Module):
    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        out = self.conv(x)
        out = self.bn(out)
        again = out[:, :3].contiguous()
        out = self.conv(again)
        out = self.bn(out)
        return out


@pytest.mark.parametrize(("conv", "stored_without_guard"), [
    (PaddedConv(3, 4, 3), 2), (KeepsOutput(3, 4, 3, padding=1), 0),
    (KeepsDataAlias(3, 4, 3, padding=1), 0), (ReturnsItsBuffer(), 0),
], ids=["fresh", "keeps-output", "keeps-data-alias", "returns-buffer"])
def test_custom_modules_skip_the_guard_only_for_fresh_outputs(conv, stored_without_guard,
                                                             monkeypatch):
    model = CustomBlock(conv).eval()
    assert _proven(model, {model.conv}) == {model.conv}  # the call sites qualify
    torch.manual_seed(0)
    x = torch.randn(1, 3, 5, 5)
    truth = _every_output(model.conv, lambda: model(x.clone()))
    assert len(truth) == 2
    if hasattr(conv, "last"):
        conv.last = None
    else:
        conv._buffers.get("state", torch.zeros(0)).zero_()
    counts = _count_proven(monkeypatch)
    with torch.no_grad(), capture(model, ["conv"]) as acts:
        model(x.clone())
    assert counts == [stored_without_guard]
    _assert_same_calls(acts.calls("conv"), truth)


def test_every_conv_of_the_bundled_model_is_proven():
    from convscope.models import load_model

    model = load_model("efficientnet_lite0", device="cpu").module
    convs = _convs(model)
    # Block convs are read as in ResNet; the stem and head as self._bn0(self._conv_stem(x)).
    assert _proven(model, convs) == convs


def _reader_instance(kind: type[nn.Module]) -> tuple[nn.Module, torch.Tensor]:
    """A small instance of a stock reader and an input of the right shape."""
    name = kind.__name__
    dims = 1 if name.endswith("1d") else 3 if name.endswith("3d") else 2
    spatial = (5,) * dims
    if name.startswith("ConvTranspose") or name.startswith("Conv"):
        return kind(4, 4, 3, padding=1), torch.randn(2, 4, *spatial)
    if name.startswith("BatchNorm") or name.startswith("InstanceNorm"):
        return kind(4, track_running_stats=True), torch.randn(2, 4, *spatial)
    if name in ("MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d"):
        return kind(1, 1), torch.randn(2, 4, *spatial)  # the pool that changes nothing
    if name == "GroupNorm":
        return kind(2, 4), torch.randn(2, 4, 5, 5)
    if name == "LayerNorm":
        return kind(5), torch.randn(2, 4, 5)
    if name == "Linear":
        return kind(5, 5), torch.randn(2, 5)
    return kind(), torch.randn(2, 4, 5, 5)  # activations, not in place


@pytest.mark.parametrize("kind", flow._READERS, ids=lambda k: k.__name__)
def test_stock_readers_return_new_memory_and_leave_their_input_alone(kind):
    """What the proof assumes of every stock reader, in eval and training, with and
    without grad: the result shares no memory with the input, which is not written."""
    module, x = _reader_instance(kind)
    for training in (False, True):
        module.train(training)
        for grad in (False, True):
            value = x.clone().requires_grad_(grad)
            before = value.detach().clone()
            version = value._version
            with torch.set_grad_enabled(grad):
                out = module(value)
            assert out.untyped_storage().data_ptr() != value.untyped_storage().data_ptr()
            assert value._version == version and torch.equal(value.detach(), before)
