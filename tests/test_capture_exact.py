"""The observer never changes the observed: a conformance zoo for capture().

For every model here and every copy mode, ``capture(model, "all")`` must leave the model's
output bit-identical to an uncaptured run, store for every module exactly what it returned
(checked against plain hooks that clone each output the moment it is produced), and leave
no hook behind, after a normal exit and after an exception. Receptive fields of every
torchvision classifier are checked against gradient support in test_receptive_fields.py.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from convscope import capture
from convscope.errors import ConvscopeError
from convscope.hooks import CaptureIntegrityError

MODES = ("auto", True, False)


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_clone(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def reference_outputs(model: nn.Module, run: Callable[[], Any]) -> tuple[Any, dict[str, list]]:
    """Every module's output of every call, cloned by a plain hook the moment it is made
    (the independent truth: no aliasing tricks), and the model's result."""
    calls: dict[str, list] = {}
    handles = []
    for name, module in model.named_modules():
        if name:
            def hook(_m, _i, out, name=name):
                calls.setdefault(name, []).append(_clone(out))
            handles.append(module.register_forward_hook(hook))
    try:
        result = run()
    finally:
        for handle in handles:
            handle.remove()
    return result, calls


def assert_identical(actual: Any, expected: Any, where: str) -> None:
    """Bit-identical, NaN-aware, through tuples, lists, dicts and named tuples."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert torch.equal(actual, expected) or torch.allclose(
            actual, expected, rtol=0, atol=0, equal_nan=True), f"{where}: values differ"
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), where
        for key in expected:
            assert_identical(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_identical(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, where


# --------------------------------------------------------------------------------------
# Toy models that break naive capture.


class UNetSkip(nn.Module):
    """pix2pix's innermost pattern: the block's input is kept for the skip connection
    while its first child, an in-place LeakyReLU, rewrites it."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 4, 3, padding=1)
        self.model = nn.Sequential(
            nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(4, 4, 3, padding=1),
            nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return torch.cat([x, self.model(x)], 1)


class InplaceZoo(nn.Module):
    """Every kind of write capture must see: functional inplace flags, ``out=``, slices,
    augmented assignment, ``Tensor.clamp_``, a module reused three times, a tuple output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.shared = nn.Hardtanh(-0.5, 0.5)
        self.act = nn.ReLU6(inplace=True)
        self.split = nn.Conv2d(4, 8, 1)
        self.drop = nn.Dropout(0.3, inplace=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(x)
        a = self.shared(h)
        h = self.act(h)
        F.leaky_relu(h, 0.1, True)
        h[:, :1] = 0.5
        h += a
        if torch.is_grad_enabled():  # out= is not differentiable
            h.mul_(2.0)
        else:
            torch.mul(h, 2.0, out=h)
        h.clamp_(-1, 3)
        b = self.shared(self.drop(self.split(h)))
        first, second = b[:, :4], b[:, 4:]
        c = self.shared(second)
        first.mul_(3)
        return first, c


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)

    def forward(self, x):
        y = self.conv(x)
        return y, {"neg": -y}


class Structured(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = TupleOut()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y, extra = self.pair(x)
        return self.relu(y) + extra["neg"]


class ConvTransformer(nn.Module):
    """A conv stem feeding nn.TransformerEncoder, whose fused fast path (taken only when
    no torch-function mode is active) differs from its slow path in the last bits."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.encoder(tokens).mean(1))


def _lite0() -> nn.Module:
    from convscope.models import load_model

    return load_model("efficientnet_lite0", device="cpu").module


# name -> (builder, input size). One model per torchvision classification family plus the
# bundled model and the toys; random weights, small inputs.
ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "unet_skip": (UNetSkip, (2, 3, 16, 16)),
    "inplace_zoo": (InplaceZoo, (2, 3, 12, 10)),
    "structured": (Structured, (1, 3, 9, 7)),
    "conv_transformer": (ConvTransformer, (2, 3, 32, 32)),
    "alexnet": (torchvision.models.alexnet, (1, 3, 64, 64)),
    "vgg11_bn": (torchvision.models.vgg11_bn, (1, 3, 32, 32)),
    "resnet18": (torchvision.models.resnet18, (2, 3, 64, 48)),
    "resnext50_32x4d": (torchvision.models.resnext50_32x4d, (1, 3, 32, 32)),
    "squeezenet1_1": (torchvision.models.squeezenet1_1, (1, 3, 64, 64)),
    "densenet121": (torchvision.models.densenet121, (1, 3, 32, 32)),
    "googlenet": (lambda: torchvision.models.googlenet(aux_logits=False, init_weights=False),
                  (1, 3, 64, 64)),
    "inception_v3": (lambda: torchvision.models.inception_v3(aux_logits=False,
                                                             init_weights=False),
                     (1, 3, 80, 80)),
    "shufflenet_v2_x0_5": (torchvision.models.shufflenet_v2_x0_5, (1, 3, 64, 64)),
    "mobilenet_v2": (torchvision.models.mobilenet_v2, (1, 3, 64, 64)),
    "mobilenet_v3_small": (torchvision.models.mobilenet_v3_small, (2, 3, 64, 64)),
    "mnasnet0_5": (torchvision.models.mnasnet0_5, (1, 3, 64, 64)),
    "efficientnet_b0": (torchvision.models.efficientnet_b0, (1, 3, 64, 64)),
    "regnet_y_400mf": (torchvision.models.regnet_y_400mf, (1, 3, 64, 64)),
    "convnext_tiny": (torchvision.models.convnext_tiny, (1, 3, 64, 64)),
    "swin_t": (torchvision.models.swin_t, (1, 3, 64, 64)),
    "vit_b_16": (lambda: torchvision.models.vit_b_16(image_size=32), (1, 3, 32, 32)),
    "maxvit": (lambda: torchvision.models.maxvit.MaxVit(  # maxvit_t's blocks, made small
        input_size=(64, 64), stem_channels=16, partition_size=2, block_channels=[16, 32, 64, 64],
        block_layers=[1, 2, 1, 1], head_dim=8, stochastic_depth_prob=0.0), (1, 3, 64, 64)),
    "efficientnet_lite0": (_lite0, (1, 3, 64, 64)),
}

_built: dict[str, nn.Module] = {}


def _model(name: str) -> nn.Module:
    if name not in _built:
        torch.manual_seed(0)
        builder, _ = ZOO[name]
        model = builder().eval()
        for module in model.modules() if name != "efficientnet_lite0" else ():  # non-trivial statistics, so BN is not an identity
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        _built[name] = model
    return _built[name]


GRAD_MODES: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
    "grad": torch.enable_grad,
}


@contextlib.contextmanager
def _seeded() -> Iterator[None]:
    """Dropout and other random ops draw the same numbers in every run."""
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        yield


def _check_model(name: str, grad_modes: tuple[str, ...]) -> None:
    model = _model(name)
    shape = ZOO[name][1]
    torch.manual_seed(7)
    x = torch.randn(shape)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    for grad_name in grad_modes:
        grad_mode = GRAD_MODES[grad_name]
        with grad_mode(), _seeded():
            plain = model(x.clone())
        with grad_mode(), _seeded():
            expected_out, expected = reference_outputs(model, lambda: model(x.clone()))
        assert_identical(expected_out, plain, f"{name}: reference run")
        for mode in MODES:
            where = f"{name} [{grad_name}, copy={mode}]"
            if mode is False and grad_name == "inference_mode":
                with pytest.raises(ConvscopeError, match="inference_mode"), grad_mode(), \
                        capture(model, "all", copy=False):
                    model(x.clone())
                assert _hook_count(model) == 0
                continue
            with grad_mode(), _seeded(), capture(model, "all", copy=mode) as acts:
                out = model(x.clone())
            assert _hook_count(model) == 0, where
            assert torch._C._len_torch_function_stack() == 0, f"{where}: a mode left behind"
            assert_identical(out, plain, f"{where}: model output")
            assert set(acts) == set(expected), where
            for layer, outputs in expected.items():
                if mode is False:
                    try:
                        stored = acts.calls(layer)
                    except CaptureIntegrityError:
                        continue  # rewritten in place and refused: never a wrong value
                else:
                    stored = acts.calls(layer)
                assert len(stored) == len(outputs), f"{where}: {layer} calls"
                for i, (value, truth) in enumerate(zip(stored, outputs)):
                    assert_identical(value, truth, f"{where}: {layer} call {i}")
    for key, value in model.state_dict().items():
        assert torch.equal(value, params[key]), f"{name}: {key} changed"


FAST = ("unet_skip", "inplace_zoo", "structured", "conv_transformer", "resnet18", "mobilenet_v3_small",
        "efficientnet_lite0", "alexnet")


@pytest.mark.parametrize("name", FAST)
def test_zoo_every_mode_bit_identical(name):
    _check_model(name, tuple(GRAD_MODES))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ZOO if n not in FAST])
def test_zoo_torchvision_families(name):
    _check_model(name, ("no_grad", "inference_mode"))
    _built.pop(name, None)  # free the big ones


# timm families whose forwards write in place in ways torchvision's do not: split-and-add
# (Res2Net), dual paths (DPN), LeakyReLU/SiLU in place (Darknet, CSP), scaled weight-
# standardised convs (NFNet), reparameterised blocks (FastViT), ghost modules, HRNet fusion,
# a conv+attention hybrid (MobileViT). Random weights, 64 px.
TIMM_ZOO = ("res2net50_14w_8s", "dpn68", "darknet53", "cs3darknet_s", "nf_resnet26",
            "fastvit_t8", "ghostnet_050", "hrnet_w18_small", "mobilevit_xxs")


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_ZOO)
def test_zoo_timm_families(name):
    import timm

    def build(name: str = name) -> nn.Module:
        return timm.create_model(name, pretrained=False, num_classes=10)

    ZOO[name] = (build, (1, 3, 64, 64))
    try:
        _check_model(name, ("no_grad", "inference_mode", "grad"))
    finally:
        ZOO.pop(name)
        _built.pop(name, None)


def test_unet_skip_was_changed_by_the_old_out_of_place_trick():
    """The case from the issue: capturing the layer before a skip block whose first child
    is an in-place activation must not change what the block concatenates."""
    model = _model("unet_skip")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        plain = model(x.clone())
        for mode in MODES:
            with capture(model, ["down", "model.1"], copy=mode) as acts:
                out = model(x.clone())
            assert torch.equal(out, plain)
            down = model.down(x)
            if mode is False:
                with pytest.raises(CaptureIntegrityError, match="down"):
                    acts["down"]
            else:
                assert torch.equal(acts["down"], down)
                assert (acts["down"] < 0).any()  # the pre-LeakyReLU value


@pytest.mark.parametrize("mode", MODES)
def test_exception_in_body_or_forward_leaves_no_hooks(mode):
    model = _model("inplace_zoo")
    with pytest.raises(ZeroDivisionError), capture(model, "all", copy=mode):
        model(torch.randn(1, 3, 8, 8))
        raise ZeroDivisionError
    assert _hook_count(model) == 0
    with pytest.raises(RuntimeError), capture(model, "all", copy=mode):
        model(torch.randn(1, 5, 8, 8))  # wrong channel count: the forward fails
    assert _hook_count(model) == 0
    with torch.no_grad():  # and the model still runs unchanged afterwards
        model(torch.randn(1, 3, 8, 8))


def test_autocast_half_models_and_channels_last():
    resnet = _model("resnet18")
    x = torch.randn(2, 3, 48, 40)
    cases = {
        "autocast_bf16": (resnet, x, lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
        "channels_last": (resnet, x.to(memory_format=torch.channels_last),
                          contextlib.nullcontext),
    }
    import copy as copy_module

    for dtype in (torch.bfloat16, torch.float16):
        half = copy_module.deepcopy(_model("unet_skip")).to(dtype)
        cases[f"model_{dtype}"] = (half, torch.randn(2, 3, 16, 16, dtype=dtype),
                                   contextlib.nullcontext)
    for label, (model, inp, ctx) in cases.items():
        with torch.no_grad(), ctx():
            plain = model(inp.clone())
            truth_out, truth = reference_outputs(model, lambda m=model, i=inp: m(i.clone()))
        assert_identical(truth_out, plain, label)
        for mode in ("auto", True):
            with torch.no_grad(), ctx(), capture(model, "all", copy=mode) as acts:
                out = model(inp.clone())
            assert_identical(out, plain, f"{label} copy={mode}")
            for layer, outputs in truth.items():
                assert_identical(acts.calls(layer), outputs, f"{label} copy={mode} {layer}")
        if label == "autocast_bf16":
            assert acts["conv1"].dtype == torch.bfloat16
        if label == "channels_last":
            assert acts["conv1"].is_contiguous(memory_format=torch.channels_last)


def test_grad_flags_and_grads_untouched():
    model = _model("unet_skip")
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    torch.manual_seed(0)
    model(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    x_grad = x.grad.clone()
    for p in model.parameters():
        p.grad = None
    x.grad = None
    model.model[1].weight.requires_grad_(False)
    try:
        flags = [p.requires_grad for p in model.parameters()]
        for mode in MODES:
            with capture(model, "all", copy=mode):
                model(x).square().sum().backward()
            for n, p in model.named_parameters():
                if p.requires_grad:
                    assert torch.equal(p.grad, grads[n]), n
                else:
                    assert p.grad is None
                p.grad = None
            assert torch.equal(x.grad, x_grad)
            x.grad = None
            assert [p.requires_grad for p in model.parameters()] == flags
    finally:
        model.model[1].weight.requires_grad_(True)


def test_writes_after_the_block_never_show_in_stored_values():
    """The caller keeps the model output, a view of it, or a detached alias and writes to
    it after the block: the stored value stays the module's output, or reading it fails."""
    net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten())
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        truth = net[0](x)
        for mode in MODES:
            with capture(net, ["0", "1"], copy=mode) as acts:
                out = net(x)  # Flatten returns a view of the conv output
            out.mul_(0)
            if mode is False:
                with pytest.raises(CaptureIntegrityError):
                    acts["0"]
            else:
                assert torch.equal(acts["0"], truth)
                assert torch.equal(acts["1"], truth.flatten(1))

        class Stash(nn.Module):
            """Keeps an alias of its input that holds the memory without referencing the
            conv's output tensor: ``.detach()`` (shares the version counter) or ``.data``
            (does not)."""

            def __init__(self, how: str):
                super().__init__()
                self.how = how

            def forward(self, y):
                self.kept = y.detach() if self.how == "detach" else y.data
                return y * 1

        for how in ("detach", "data"):
            stash = nn.Sequential(nn.Conv2d(3, 2, 3), Stash(how))
            truth = stash[0](x)
            # copy="auto" sees the memory still shared at exit and copies it then.
            with capture(stash, "0") as acts:
                stash(x)
            stash[1].kept.fill_(0)
            assert torch.equal(acts["0"], truth), how
            # A write while the model still holds the alias, inside the body, is seen too.
            with capture(stash, "0") as acts:
                stash(x)
                stash[1].kept.fill_(0)
            assert torch.equal(acts["0"], truth), how
        stash = nn.Sequential(nn.Conv2d(3, 2, 3), Stash("detach"))
        with capture(stash, "0", copy=False) as acts:
            stash(x)
        stash[1].kept.fill_(0)
        with pytest.raises(CaptureIntegrityError, match="after it was captured"):
            acts["0"]


class UnseenWrite(nn.Module):
    """Writes its conv's output where no torch-function mode sees it (as TorchScript or a
    C++ extension would), then either writes it again where the guard does see it or
    lets it die unwritten."""

    def __init__(self, then: str):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.then = then

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        with torch._C.DisableTorchFunction():
            h.add_(1)
        if self.then == "seen write":
            return h.relu_()
        return h * 2


@pytest.mark.parametrize("then", ["seen write", "dies"])
@pytest.mark.parametrize("body_raises", [False, True])
def test_a_write_no_mode_sees_is_reported_and_never_read(then, body_raises):
    """The guard never copies a rewritten output as if it were the module's (the seen
    write used to copy conv + 1 silently), and reading it raises, also when the body's
    own exception takes the place of the report at exit."""
    net = UnseenWrite(then).eval()
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        expected = pytest.raises(KeyError) if body_raises else pytest.raises(
            CaptureIntegrityError, match="conv")
        with expected, capture(net, "conv") as acts:
            net(x)
            if body_raises:
                raise KeyError("the user's own error")
    with pytest.raises(CaptureIntegrityError, match="conv"):
        acts["conv"]
    with pytest.raises(CaptureIntegrityError, match="conv"):
        acts.calls("conv")
    assert _hook_count(net) == 0 and torch._C._len_torch_function_stack() == 0


class ListWrite(nn.Module):
    """Writes its conv's output through a list argument: ``torch._foreach_add_`` or the
    ATen overload whose schema marks the list as written."""

    def __init__(self, how: str):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        g = h * 1
        if self.how == "torch":
            torch._foreach_add_([g, h], 1.0)
        else:
            torch.ops.aten._foreach_add_.Scalar([g, h], 1.0)
        return h + g


@pytest.mark.parametrize("how", ["torch", "aten"])
def test_writes_through_a_list_argument_are_seen(how):
    """The guard copies before a write to any tensor of a written list (it used to look at
    single tensors only, so the version counter refused the capture)."""
    net = ListWrite(how).eval()
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        truth, plain = net.conv(x), net(x)
        with capture(net, "conv") as acts:
            out = net(x)
    assert torch.equal(out, plain)
    assert torch.equal(acts["conv"], truth)


class WritesItsConvOutput(nn.Module):
    """Rewrites its conv's output after the conv: through memory handed outside torch
    (NumPy, DLPack, the raw storage or pointer) or ``.data``, where no version counter
    moves and only a guard that sees the hand-off keeps the stored value exact; or through
    ``x[i] = v``, an in-place op on a view at an offset, or ``out=``."""

    def __init__(self, how: str):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.how == "numpy":
            array = h.detach().numpy()
            array += 1
        elif self.how == "numpy view":  # a slice of the output, written by a NumPy ufunc
            part = h[:, :2].detach().numpy()
            np.multiply(part, 2, out=part)
        elif self.how == "array protocol":
            np.asarray(h.detach())[0, 0] = 0
        elif self.how == "dlpack":
            torch.from_dlpack(h.detach()).add_(1)
        elif self.how == "storage":
            torch.tensor([], dtype=h.dtype).set_(h.untyped_storage()).add_(1)
        elif self.how == "data_ptr":  # raw memory: no mode sees it, no version counter moves
            ctypes.memset(h.data_ptr(), 0, h.element_size() * h.nelement())
        elif self.how == "setitem":
            h[0] = 0.0
        elif self.how == "offset view":  # a view that starts past the storage's beginning
            h[1:].zero_()
        elif self.how == "out=":  # an out-of-place op told to write into (an alias of) h
            torch.mul(h.detach(), 0.0, out=h.detach())
        else:  # ".data": its own version counter, the same memory
            h.data.mul_(2)
        return h * 1


WRITES = ["numpy", "numpy view", "array protocol", "dlpack", "storage", "data_ptr", ".data",
          "setitem", "offset view", "out="]


@pytest.mark.parametrize("how", WRITES)
@pytest.mark.parametrize("grad_mode", ["no_grad", "enable_grad", "inference_mode"])
@pytest.mark.parametrize("copy", ["auto", True])
def test_each_kind_of_write_after_the_conv_leaves_its_true_value(how, grad_mode, copy):
    """Every kind of write makes the guard copy the stored output first: the stored value
    is the conv's and no CaptureIntegrityError is raised (the guard saw the write, it did
    not guess). NumPy's ``+=`` on ``h.detach().numpy()`` used to rewrite the stored alias
    with no error under the default."""
    torch.manual_seed(0)
    net = WritesItsConvOutput(how).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        truth = net.conv(x)
    with getattr(torch, grad_mode)():
        plain = net(x)
        with capture(net, "conv", copy=copy) as acts:
            out = net(x)
    assert not torch.equal(plain, truth)  # the forward did rewrite that memory
    assert torch.equal(out, plain)
    assert torch.equal(acts["conv"], truth)
    assert _hook_count(net) == 0 and torch._C._len_torch_function_stack() == 0


class FlagOnly(nn.Module):
    """Calls ``requires_grad_``/``detach_`` on its conv's output: names that end in ``_``
    but write no values."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h.requires_grad_(False)
        h.detach_()
        return h * 1


def test_flag_changes_on_a_stored_output_cost_no_copy():
    """The stored value is the conv's own memory (no copy), and exact."""
    net = FlagOnly().eval()
    x = torch.randn(1, 3, 6, 6)
    made: list[int] = []
    spy = net.conv.register_forward_hook(lambda _m, _i, out: made.append(out.data_ptr()))
    try:
        with torch.no_grad():
            truth = net.conv(x)
            made.clear()
            with capture(net, "conv") as acts:
                net(x)
    finally:
        spy.remove()
    assert torch.equal(acts["conv"], truth)
    assert acts["conv"].data_ptr() == made[0]


class _Counting(torch.overrides.TorchFunctionMode):
    """A user's own torch-function mode: counts the calls it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


class ModeInForward(nn.Module):
    """Enters a torch-function mode inside its forward, around and between captured
    convs and the in-place writes that follow them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _Counting():
            h = self.a(x)  # stored while another mode is on top of the stack
            h.mul_(2)
        h = self.b(h)  # stored with the guard on the stack ...
        with _Counting():
            h.add_(1)  # ... and written while another mode sits above it
        return self.relu(h)


def test_modes_entered_inside_the_forward_or_around_capture():
    """The guard goes on the torch-function stack only when it can come off again in
    order: values stay exact, the user's modes see every call, the stack is restored."""
    torch.manual_seed(0)
    model = ModeInForward()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected_out, expected = reference_outputs(model, lambda: model(x))
        for mode in ("auto", True):
            with capture(model, "all", copy=mode) as acts:
                out = model(x)
            assert torch._C._len_torch_function_stack() == 0
            assert_identical(out, expected_out, "output")
            for name in ("a", "b", "relu"):
                assert_identical(acts[name], expected[name][0], name)
        # A mode the user holds around the capture keeps seeing the model's calls.
        plain = _Counting()
        with plain:
            model(x)
        outer = _Counting()
        with outer, capture(model, "all") as acts:
            out = model(x)
            assert torch._C._len_torch_function_stack() >= 1
        assert torch._C._len_torch_function_stack() == 0
        assert outer.calls == plain.calls
        assert_identical(out, expected_out, "output under an outer mode")
        assert_identical(acts["b"], expected["b"][0], "b under an outer mode")
        # A mode entered in the body and left open is kept; the guard comes off under it.
        user = _Counting()
        truth_b = model.b(model.a(x))
        with capture(model, "all") as acts:
            h = model.b(model.a(x))  # the guard is on the stack: b's output is alive
            user.__enter__()
        try:
            assert torch._C._len_torch_function_stack() == 1
            assert torch._C._get_function_stack_at(0) is user
        finally:
            user.__exit__(None, None, None)
        h.mul_(0)  # the caller still held b's output at exit: it was copied then
        assert torch.equal(acts["b"], truth_b) and truth_b.abs().sum() > 0
        assert torch._C._len_torch_function_stack() == 0


def test_forward_on_another_thread_and_nested_captures():
    import threading

    torch.manual_seed(0)
    model = UNetSkip().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected_out, expected = reference_outputs(model, lambda: model(x))
        # The forward runs on a worker thread: its hooks copy at once (the guard's mode
        # lives on the capturing thread's stack and would not see that thread's writes).
        result: list[torch.Tensor] = []

        def work() -> None:
            with torch.no_grad():
                result.append(model(x))

        with capture(model, "all") as acts:
            worker = threading.Thread(target=work)
            worker.start()
            worker.join()
        assert_identical(result[0], expected_out, "thread output")
        for name, values in expected.items():
            assert_identical(acts.calls(name), values, f"thread: {name}")
        # A pool thread that keeps running after the capture, holding the model's output
        # (a captured tensor): nothing of convscope's stays on that thread's mode stack.
        chain = nn.Sequential(nn.Conv2d(3, 3, 3), nn.Conv2d(3, 3, 3))
        truth = chain(x)
        go, done, held, depth = threading.Event(), threading.Event(), [], []

        def pool_worker() -> None:
            with torch.no_grad():
                held.append(chain(x))  # returns the last conv's own output
            done.set()
            go.wait(10)
            depth.append(torch._C._len_torch_function_stack())

        worker = threading.Thread(target=pool_worker)
        with capture(chain, "all") as acts:
            worker.start()
            assert done.wait(10)
        go.set()
        worker.join()
        assert depth == [0]
        held[0].mul_(0)
        assert torch.equal(acts["1"], truth)
        # Two captures at once on one model: both exact, the stack restored.
        with capture(model, "all") as outer, capture(model, ["down", "model.1"]) as inner:
            out = model(x)
        assert torch._C._len_torch_function_stack() == 0
        assert_identical(out, expected_out, "nested output")
        for name, values in expected.items():
            assert_identical(outer.calls(name), values, f"outer: {name}")
        for name in ("down", "model.1"):
            assert_identical(inner.calls(name), expected[name], f"inner: {name}")


def test_exception_mid_forward_restores_the_stack():
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)

        def forward(self, x):
            y = self.conv(x)  # stored; the guard is on the stack while y lives
            raise RuntimeError(f"boom at {tuple(y.shape)}")

    model = Boom()
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), \
            capture(model, "conv"):
        model(torch.randn(1, 3, 5, 5))
    assert torch._C._len_torch_function_stack() == 0
    assert _hook_count(model) == 0


def test_stored_values_are_freed_with_the_activations_without_garbage_collection():
    """Dropping ``acts`` frees every stored tensor at once: no reference cycle through
    the write guard's bookkeeping keeps them until a garbage collection."""
    import gc
    import weakref

    enabled = gc.isenabled()
    gc.disable()
    try:
        for keep_output in (False, True):
            net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).eval(),
                                nn.ReLU(inplace=True))
            with torch.no_grad(), capture(net, "all") as acts:
                out = net(torch.randn(1, 3, 8, 8))
            if not keep_output:
                del out
            refs = [weakref.ref(acts[name]) for name in ("0", "1", "2")]
            del acts
            assert [ref() is None for ref in refs] == [True, True, True], keep_output
    finally:
        if enabled:
            gc.enable()


# Rules of the write guard that a mutation run (stop 20) found unpinned.


class _Transpose(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(2, 3)


class _TwoViewsThenWrite(nn.Module):
    """Two captured outputs on one storage, equal in shape but not in strides (a square
    map and its transpose), then a write that makes the guard copy both."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.t = _Transpose()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        t = self.t(h)
        h.add_(1.0)
        return t * 2


def test_views_sharing_memory_but_not_strides_get_their_own_copies() -> None:
    """Aliases of one storage may share a copy only when they are the same view: a
    transposed output copied as its untransposed base would be stored with wrong values."""
    torch.manual_seed(0)
    net = _TwoViewsThenWrite().eval()
    x = torch.randn(2, 3, 7, 7)  # a 5x5 map: the transpose has the conv output's shape
    with torch.no_grad():
        expected = net.conv(x)
        with capture(net, ["conv", "t"]) as acts:
            net(x)
    assert torch.equal(acts["conv"], expected)
    assert torch.equal(acts["t"], expected.transpose(2, 3))
    assert not torch.equal(expected, expected.transpose(2, 3))


class _DropsItsConvOutput(nn.Module):
    """Reads its conv output with an op the flow proofs do not accept (so the write guard
    watches it), drops it, and notes how many torch-function modes are active then."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.depth_while_held = -1
        self.depth_after_drop = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        y = h * 2.0
        self.depth_while_held = torch._C._len_torch_function_stack()
        del h  # the last reference: only capture's stored alias holds that memory now
        self.depth_after_drop = torch._C._len_torch_function_stack()
        return y.relu_()


def test_the_write_guard_leaves_the_stack_when_the_watched_output_dies() -> None:
    """The guard is on the torch-function stack only while the model can still reach a
    stored output: once the conv output is dropped mid-forward, it must come off at once
    (later calls of the forward would otherwise all run through it, and code that checks
    for an active mode would see one), and the stored value stays the conv's."""
    torch.manual_seed(0)
    net = _DropsItsConvOutput().eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = net.conv(x)
        with capture(net, "conv") as acts:
            net(x)
    assert net.depth_while_held == 1  # the guard was watching the live output
    assert net.depth_after_drop == 0
    assert torch._C._len_torch_function_stack() == 0
    assert torch.equal(acts["conv"], expected)


class _Size(nn.Module):
    """A captured module whose output is no tensor (nothing for the guard to watch)."""

    def forward(self, x: torch.Tensor) -> tuple[int, ...]:
        return tuple(x.shape)


class _DetachedAliasOutlivesOutput(nn.Module):
    """The conv output dies while a ``.detach()`` alias still holds its memory; the alias
    is dropped later, and then another captured module runs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.size = _Size()
        self.depth_after_alias_dropped = -1
        self.depth_after_next_hook = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        alias = h.detach()  # shares the memory without referencing h
        y = h * 2.0
        del h  # the output is gone but ``alias`` can still write that memory
        del alias
        self.depth_after_alias_dropped = torch._C._len_torch_function_stack()
        self.size(y)  # a hook: capture re-examines storages that were still shared
        self.depth_after_next_hook = torch._C._len_torch_function_stack()
        return y.relu_()


def test_a_storage_shared_when_its_output_died_is_released_at_the_next_hook() -> None:
    """When a watched output dies while another alias still holds its memory, the guard
    keeps watching; once that alias is gone too, the next hook must see it and take the
    guard off the stack instead of leaving every later call of the forward under it."""
    torch.manual_seed(0)
    net = _DetachedAliasOutlivesOutput().eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = net.conv(x)
        with capture(net, ["conv", "size"]) as acts:
            net(x)
    assert net.depth_after_alias_dropped == 1  # still watched: no hook has run since
    assert net.depth_after_next_hook == 0
    assert torch.equal(acts["conv"], expected)
    assert acts["size"] == tuple(expected.shape)
