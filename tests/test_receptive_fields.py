"""Receptive fields of list_layers against an independent computation: the input pixels
whose gradient is non-zero for one output position (all its channels), on a builder of
every torchvision architecture; shapes only (meta device), a square final field for all
other builders, the largest included.

With positive weights, positive inputs and every activation and normalisation made the
identity (max pools become average pools of the same geometry), no path from an input
pixel to a unit can cancel, so the gradient support is exactly the set of pixels the unit
depends on, and its bounding box is the receptive field clipped to the image.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode

from convscope.errors import ConvscopeError
from convscope.layers import InputSizeError, LayerInfo, ReceptiveField, list_layers

ALL_MODELS = torchvision.models.list_models(module=torchvision.models)

#: One builder per family and block type, checked against the gradient support (float64
#: forward and backward passes are too slow for all 80 builders here); every builder is
#: checked for a square final field on the meta device below.
CHECKED = [
    "alexnet", "vgg11_bn", "squeezenet1_1", "resnet18", "resnet50", "resnext50_32x4d",
    "densenet121", "googlenet", "inception_v3", "mobilenet_v2", "mobilenet_v3_small",
    "mnasnet0_5", "shufflenet_v2_x0_5", "efficientnet_b0", "efficientnet_v2_s",
    "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny", "vit_b_16", "swin_t", "swin_v2_t",
    "maxvit_t",
]
#: Input size per family: the smallest convenient size the architecture runs at (ViT
#: checks its position embedding against it, MaxViT's 7x7 partitions need 224).
_SIZES = {"inception_v3": 299, "googlenet": 96, "vit": 32, "maxvit": 224}
#: Layers checked besides the automatic picks: Inception's joins of parallel branches,
#: where a field guessed from the newest map of the same size was wrong (the 1x7 branch
#: is wider than tall, a functional average pool feeds branch_pool).
_EXTRA = {"inception_v3": ["Mixed_5b.branch_pool", "Mixed_6b.branch7x7dbl_3"]}
#: Where the deepest map (a field far larger than any image here) is checked at a
#: smaller size than the branches above, to save a full float64 pass at 299 px.
_FINAL_SMALL = {"inception_v3": 80}
#: Transformers: a field up to the patch embedding / convolutional stem, none after the
#: first attention (tokens are reshaped and mixed across the whole window or image).
_AFTER_ATTENTION = {"vit": None, "swin": "features.1", "maxvit": "blocks.0.layers.0"}


def _family(name: str) -> str:
    for prefix in ("vit", "swin", "maxvit"):
        if name.startswith(prefix):
            return prefix
    return name


class _Linearised(TorchFunctionMode):
    """Runs a model with identity activations and normalisations and average pools in
    place of max pools, whether they are modules or functional calls inside ``forward``."""

    _IDENTITY = frozenset({"relu", "relu_", "relu6", "hardtanh", "hardtanh_", "silu", "gelu",
                 "hardswish", "hardsigmoid", "sigmoid", "tanh", "batch_norm", "layer_norm",
                 "group_norm", "dropout"})

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in self._IDENTITY:
            return args[0] if args else kwargs["input"]
        if name in ("max_pool2d", "max_pool2d_with_indices", "_max_pool2d"):
            x, kernel, stride, padding, dilation, ceil_mode = (
                list(args) + [None] * 6)[:6]
            kernel = kwargs.get("kernel_size", kernel)
            stride = kwargs.get("stride", stride) or kernel
            padding = kwargs.get("padding", padding) or 0
            ceil_mode = bool(kwargs.get("ceil_mode", ceil_mode))
            assert kwargs.get("dilation", dilation) in (None, 1, (1, 1))
            return F.avg_pool2d(x, kernel, stride, padding, ceil_mode)
        if name == "adaptive_max_pool2d":
            return F.adaptive_avg_pool2d(*args, **kwargs)
        return func(*args, **kwargs)


@contextmanager
def _no_init() -> Iterator[None]:
    """Skip torch.nn.init while building: the test sets every parameter itself, and the
    random initialisation of the large models would dominate this file's run time."""
    saved = {name: getattr(nn.init, name) for name in dir(nn.init)
             if name.endswith("_") and not name.startswith("_")}
    try:
        for name in saved:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, func in saved.items():
            setattr(nn.init, name, func)


def _positive(model: nn.Module) -> nn.Module:
    """Makes ``model`` float64 with every weight 1 / fan-in and every other parameter 0.01,
    module by module just before each first runs (modules after the last checked layer
    are never converted, which keeps the large heads and transformer blocks cheap).
    Squeeze-and-excitation gates are made constant: global context lies outside any
    receptive field by convention."""
    gates = {id(m.fc1) for m in model.modules()
             if isinstance(m, torchvision.ops.SqueezeExcitation)}
    done: set[int] = set()

    def convert(module: nn.Module, _inputs: Any) -> None:
        if id(module) in done:
            return
        done.add(id(module))
        for pname, param in module.named_parameters(recurse=False):
            value = 0.01
            if pname == "weight" and param.dim() > 1:
                value = 0.0 if id(module) in gates else 1.0 / param[0].numel()
            param.data = torch.full(param.shape, value, dtype=torch.float64)
            param.requires_grad_(False)
        for bname, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point():
                setattr(module, bname, buffer.double())

    for module in model.modules():
        module.register_forward_pre_hook(convert)
    return model.eval()


def _build(name: str, size: int | None = None, device: str = "cpu") -> nn.Module:
    """A torchvision classifier without running its random initialisation."""
    kwargs: dict[str, Any] = {}
    if name in ("inception_v3", "googlenet"):
        kwargs = {"aux_logits": False, "init_weights": False}
    if name.startswith("vit") and size is not None:
        kwargs = {"image_size": size}
    with _no_init():
        return torchvision.models.get_model(name, **kwargs).to(device).eval()


def _support(grad: torch.Tensor) -> tuple[int, int, int, int]:
    """Bounding box (top, left, bottom, right), exclusive, of the non-zero gradient."""
    hits = grad.abs().sum(dim=(0, 1))
    rows = torch.nonzero(hits.sum(dim=1))[:, 0]
    cols = torch.nonzero(hits.sum(dim=0))[:, 0]
    return (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)


def _assert_box(rf: ReceptiveField, units: list[tuple[int, int]], height: int, width: int,
                support: tuple[int, int, int, int], label: str) -> None:
    """The gradient support of the sum of ``units`` against the union of their boxes.

    Each edge of the box that lies inside the image must be the support's edge. An edge
    clipped by the image only bounds the support: convolutions without padding (stride 2)
    can leave the last rows and columns of an image unread."""
    tops = [math.floor(rf.start[0] + r * rf.stride[0] - (rf.size[0] - 1) / 2) for r, _ in units]
    lefts = [math.floor(rf.start[1] + c * rf.stride[1] - (rf.size[1] - 1) / 2) for _, c in units]
    top, left = min(tops), min(lefts)
    bottom, right = max(tops) + rf.size[0], max(lefts) + rf.size[1]
    boxes = [rf.box(r, c, height, width) for r, c in units]
    box = (min(b[0] for b in boxes), min(b[1] for b in boxes),
           max(b[2] for b in boxes), max(b[3] for b in boxes))
    s_top, s_left, s_bottom, s_right = support
    where = (label, units, rf, box, support)
    assert s_top == top if top >= 0 else s_top >= box[0], where
    assert s_left == left if left >= 0 else s_left >= box[1], where
    assert s_bottom == bottom if bottom <= height else s_bottom <= box[2], where
    assert s_right == right if right <= width else s_right <= box[3], where
    if len(units) == 1 and top >= 0 and left >= 0 and bottom <= height and right <= width:
        assert rf.box(*units[0], height, width) == support, where


def _inside(rf: ReceptiveField, row: int, col: int, height: int, width: int) -> bool:
    top = rf.start[0] + row * rf.stride[0] - (rf.size[0] - 1) / 2
    left = rf.start[1] + col * rf.stride[1] - (rf.size[1] - 1) / 2
    return top > 0 and left > 0 and top + rf.size[0] < height and left + rf.size[1] < width


def _pick(rows: list[LayerInfo], height: int, width: int,
          extra: list[str]) -> tuple[list[LayerInfo], LayerInfo]:
    """Layers to check: three spread over the depth whose centre unit's field lies inside
    the image (so every edge is tested), up to two with a non-square field, the ``extra``
    ones; and, separately, the one with the largest field (the final feature map)."""
    spatial = [r for r in rows if r.receptive_field is not None and r.output_shape
               and len(r.output_shape) == 3]
    final = max(spatial, key=lambda r: math.prod(r.receptive_field.size))
    inside = [r for r in spatial if _inside(
        r.receptive_field, r.output_shape[1] // 2, r.output_shape[2] // 2, height, width)]
    picked = [inside[round(i * (len(inside) - 1) / 2)] for i in range(3)] if inside else []
    picked += [r for r in inside if r.receptive_field.size[0] != r.receptive_field.size[1]][:2]
    picked += [r for r in rows if r.name in extra]
    # One layer per distinct (field, shape): a block and its last child give the same check.
    distinct = {(r.receptive_field, r.output_shape): r for r in reversed(picked)}
    distinct.pop((final.receptive_field, final.output_shape), None)
    return list(distinct.values()), final


class _Stop(Exception):
    """Ends the forward pass once every checked layer has run."""


def _check(model: nn.Module, rows: list[LayerInfo], height: int, width: int,
           extra: list[str] = (), *, picks: bool = True, final: bool = True) -> int:
    """Compares the clipped field of the centre unit of several layers with the gradient
    support (all channels of the unit, so branches joined by concatenation count), and for
    the final feature map also the top-left edges of unit (0, 0) and the bottom-right
    edges of the last unit. Returns how many centre units' fields lay fully inside the
    image, where every edge of the box is tested."""
    picked, deepest = _pick(rows, height, width, list(extra))
    picked = (picked if picks else []) + ([deepest] if final else [])
    modules = dict(model.named_modules())
    outputs: dict[str, torch.Tensor] = {}

    def keep(layer: str, output: torch.Tensor) -> torch.Tensor:
        outputs[layer] = output
        if len(outputs) == len(picked):
            raise _Stop
        return output.clone()  # later in-place ops (``out += identity``) hit the clone

    handles = [modules[r.name].register_forward_hook(
        lambda _m, _i, out, layer=r.name: keep(layer, out)) for r in picked]
    x = torch.ones(1, 3, height, width, dtype=torch.float64, requires_grad=True)
    try:
        with _Linearised():
            model(x)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    fitted = 0
    for row in picked:
        out, rf = outputs[row.name], row.receptive_field
        centre = (out.shape[2] // 2, out.shape[3] // 2)
        checks = [[centre]]
        if row is deepest:  # one backward pass for both corners: the union of two boxes
            checks.append([(0, 0), (out.shape[2] - 1, out.shape[3] - 1)])
        for units in checks:
            unit_sum = sum(out[0, :, r, c].sum() for r, c in units)
            (grad,) = torch.autograd.grad(unit_sum, x, retain_graph=True)
            _assert_box(rf, units, height, width, _support(grad), row.name)
        fitted += _inside(rf, *centre, height, width)
    return fitted


@pytest.mark.slow
@pytest.mark.parametrize("name", CHECKED)
def test_fields_equal_gradient_support(name):
    size = _SIZES.get(_family(name), 64)
    # Taller than wide where the architecture allows, so a swapped axis shows.
    height, width = (size, size) if _family(name) in ("vit", "maxvit") else (size + 8, size)
    # Fields from a shapes-only copy (meta device): the same geometry, no float64 pass.
    rows = list_layers(_build(name, size, device="meta"), (3, height, width))
    model = _positive(_build(name, size))
    if name in _FINAL_SMALL:  # the deepest map at a small size, the branches at full size
        small = _FINAL_SMALL[name]
        _check(model, list_layers(_build(name, device="meta"), (3, small + 8, small)),
               small + 8, small, picks=False)
    fitted = _check(model, rows, height, width, _EXTRA.get(name, []),
                    final=name not in _FINAL_SMALL)
    if _family(name) not in ("vit", "swin", "maxvit"):
        assert fitted >= 2, f"{name}: too few layers with a field inside the image"


def test_checked_builders_cover_every_architecture():
    """Every torchvision architecture file (resnet.py also builds ResNeXt and Wide ResNet)
    has a builder in the gradient check."""
    def module(name: str) -> str:
        return torchvision.models.get_model_builder(name).__module__

    assert set(CHECKED) <= set(ALL_MODELS)
    missing = {module(n) for n in ALL_MODELS} - {module(n) for n in CHECKED}
    assert not missing


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ALL_MODELS if n not in CHECKED])
def test_every_other_builder_has_a_square_final_field(name):
    """Shapes only (meta device), so every builder not in the gradient check, the largest
    included: the deepest spatial map has a field, square in size and stride (the
    classifiers are symmetric)."""
    model = _build(name, device="meta")
    rows = list_layers(model, (3, 224, 224))
    spatial = [r for r in rows if r.output_shape and len(r.output_shape) == 3
               and r.receptive_field is not None]
    deepest = max(spatial, key=lambda r: math.prod(r.receptive_field.size)).receptive_field
    assert deepest.size[0] == deepest.size[1] and deepest.stride[0] == deepest.stride[1]
    assert deepest.start[0] == deepest.start[1]
    if _family(name) not in ("vit", "swin", "maxvit"):
        assert deepest.stride[0] in (16, 32) and deepest.size[0] > 100


@pytest.mark.parametrize("name", ["vit_b_16", "swin_t", "maxvit_t"])
def test_transformers_have_fields_only_before_attention(name):
    model = _build(name, 224, device="meta")
    rows = {r.name: r for r in list_layers(model, (3, 224, 224))}
    embed = {"vit": "conv_proj", "swin": "features.0.0", "maxvit": "stem.1.0"}[_family(name)]
    assert rows[embed].receptive_field is not None
    after = _AFTER_ATTENTION[_family(name)]
    if after is None:  # ViT: everything after the patch embedding is tokens (N, L, D)
        assert [r.name for r in rows.values() if r.receptive_field is not None] == [embed]
    else:
        assert rows[after].output_shape is not None and rows[after].receptive_field is None


def test_inception_v3_fields_are_square_and_match_a_hand_count():
    """Mixed_6b joins 1x7/7x1 branches; its field is square. Hand count from Mixed_6a
    (159 px, stride 16): the longest path per axis is branch7x7dbl, whose two 1x7 and two
    7x1 convs add 2 * 6 taps per axis at stride 16: 159 + 12 * 16 = 351. Its branch7x7_2
    (a 1x7 conv after a 1x1) is 6 * 16 px wider than tall."""
    rows = {r.name: r for r in list_layers(_build("inception_v3", device="meta"),
                                           (3, 299, 299))}
    assert rows["Mixed_6a"].receptive_field.size == (159, 159)
    assert rows["Mixed_6b"].receptive_field.size == (351, 351)
    assert rows["Mixed_6b"].receptive_field.stride == (16, 16)
    assert rows["Mixed_6b.branch7x7_2"].receptive_field.size == (159, 159 + 6 * 16)


def test_published_alexnet_and_vgg16_pool5():
    """Araujo, Norris & Sim, "Computing receptive fields of CNNs" (Distill 2019):
    AlexNet pool5 195 px / stride 32, VGG16 pool5 212 px / stride 32."""
    alex = {r.name: r for r in list_layers(_build("alexnet", device="meta"))}
    assert alex["features.12"].receptive_field.size == (195, 195)
    assert alex["features.12"].receptive_field.stride == (32, 32)
    vgg = {r.name: r for r in list_layers(_build("vgg16", device="meta"), (1, 3, 224, 224))}
    assert vgg["features.30"].receptive_field.size == (212, 212)
    assert vgg["features.30"].receptive_field.stride == (32, 32)


def _rf_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 1, (3, 5), stride=(1, 2), padding=(1, 0)),
                         nn.AvgPool2d(2))


def test_boxes_on_non_square_images_clip_each_axis_to_its_own_size():
    """A field that differs per axis, on images taller than wide and wider than tall:
    box() and boxes() must clip rows to the height and columns to the width."""
    rf = ReceptiveField(size=(5, 9), stride=(2, 4), start=(1.0, 3.0))
    # rows: centre 1 + 2 * r, half-size 2; cols: centre 3 + 4 * c, half-size 4.
    assert rf.box(0, 0, 40, 10) == (0, 0, 4, 8)
    assert rf.box(10, 2, 40, 10) == (19, 7, 24, 10)
    assert rf.box(19, 0, 40, 10) == (37, 0, 40, 8)
    assert rf.box(2, 9, 6, 100) == (3, 35, 6, 44)
    rows, cols = [[0, 10], [19, 2]], [[0, 2], [0, 9]]
    for height, width in [(40, 10), (6, 100)]:
        vectorised = rf.boxes(rows, cols, height, width)
        for i in range(2):
            for j in range(2):
                assert tuple(vectorised[i][j]) == rf.box(rows[i][j], cols[i][j], height, width)


def test_non_square_input_boxes_equal_gradient_support():
    net = _rf_net().double()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    height, width = 12, 30
    rf = list_layers(net, (1, height, width))[-1].receptive_field
    assert rf.size == (4, 7) and rf.stride == (2, 4)
    out = net(torch.zeros(1, 1, height, width, dtype=torch.float64))
    for r in range(out.shape[2]):
        for c in range(out.shape[3]):
            x = torch.ones(1, 1, height, width, dtype=torch.float64, requires_grad=True)
            (grad,) = torch.autograd.grad(net(x)[0, 0, r, c], x)
            assert rf.box(r, c, height, width) == _support(grad), (r, c)


class _Branches(nn.Module):
    """Two branches with different paddings and kernels joined by cat and add: the
    joined field is not centred on any kernel tap."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 1, (1, 7), padding=(0, 1))
        self.b = nn.Conv2d(1, 1, (5, 1), padding=(4, 0))
        self.c = nn.Conv2d(2, 1, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)  # output (H, W - 4): cols shifted right
        b = self.b(x)[:, :, 2:-2, 2:-2]  # crop to (H, W - 4)
        joined = torch.cat([a, b], dim=1) + F.pad(x, (-2, -2))
        return self.c(F.pad(joined, (0, 1, 1, 0)))


def test_asymmetric_union_is_exact():
    net = _Branches().double()
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(0.5)
    height, width = 13, 21
    rows = {r.name: r for r in list_layers(net, (1, height, width))}
    rf = rows["c"].receptive_field
    out = net(torch.zeros(1, 1, height, width, dtype=torch.float64))
    for r in range(out.shape[2]):
        for c in range(out.shape[3]):
            x = torch.ones(1, 1, height, width, dtype=torch.float64, requires_grad=True)
            (grad,) = torch.autograd.grad(net(x)[0, 0, r, c], x)
            assert rf.box(r, c, height, width) == _support(grad), (r, c)
    # By hand: rows [0, 1) from a, [-2, 3) from the cropped b, [0, 1) from x; padding
    # one row on top gives [-3, 2); the 3x3 stride-2 conv (pad 1) gives [-4, 3). Columns:
    # [-1, 6) from a, [2, 3) from b and x; then [-2, 7). Position 0 is centred on the box.
    assert (rf.size, rf.stride, rf.start) == ((7, 9), (2, 2), (-1.0, 2.0))


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_functional_same_padding_and_reflect_padding_equal_gradient_support():
    """timm's Conv2dSame and AvgPool2dSame pad inside ``forward`` (F.pad, then F.conv2d or
    F.avg_pool2d), PyTorch's padding="same" pads an even kernel more after than before,
    and padding_mode="reflect" pads with F.pad: every unit of a non-square map."""
    from timm.layers import Conv2dSame
    from timm.layers.pool2d_same import AvgPool2dSame

    net = nn.Sequential(
        Conv2dSame(1, 2, 3, stride=2), AvgPool2dSame(3, stride=2),
        Conv2dSame(2, 2, (2, 5), stride=(1, 2), dilation=(2, 1)),
        nn.Conv2d(2, 2, 4, padding="same"),
        nn.Conv2d(2, 1, 3, padding=1, padding_mode="reflect"),
    ).double()
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(0.25)
    height, width = 45, 71
    rf = list_layers(net, (1, height, width))[-1].receptive_field
    assert rf.stride == (4, 8)
    out = net(torch.zeros(1, 1, height, width, dtype=torch.float64))
    for r in range(out.shape[2]):
        for c in range(out.shape[3]):
            x = torch.ones(1, 1, height, width, dtype=torch.float64, requires_grad=True)
            (grad,) = torch.autograd.grad(net(x)[0, 0, r, c], x)
            _assert_box(rf, [(r, c)], height, width, _support(grad), "timm")


def test_input_size_accepts_chw_and_nchw_and_names_the_problem(tiny_net):
    three = list_layers(tiny_net, (3, 16, 12))
    four = list_layers(tiny_net, (2, 3, 16, 12))
    assert [r.output_shape for r in three] == [r.output_shape for r in four]
    assert [r.receptive_field for r in three] == [r.receptive_field for r in four]
    assert dict((r.name, r.output_shape) for r in four)["features.0"] == (4, 16, 12)
    for bad in [(16, 16), (1, 1, 3, 16, 16), (3, 0, 16), ("3", "x", 16)]:
        with pytest.raises(InputSizeError, match=r"\(C, H, W\) or \(N, C, H, W\)"):
            list_layers(tiny_net, bad)
    with pytest.raises(ConvscopeError, match="cannot run on a zero input of shape"):
        list_layers(tiny_net, (1, 16, 16))  # one channel for a three-channel model
    assert issubclass(InputSizeError, ValueError)


def test_list_layers_leaves_the_model_untouched(resnet18):
    before = {k: v.clone() for k, v in resnet18.state_dict().items()}
    resnet18.layer1.train()
    try:
        list_layers(resnet18, (3, 64, 64))
        assert resnet18.layer1.training and not resnet18.layer2.training
        assert all(torch.equal(before[k], v) for k, v in resnet18.state_dict().items())
        assert all(not m._forward_hooks for m in resnet18.modules())
        assert all(p.requires_grad and p.grad is None for p in resnet18.parameters())
    finally:
        resnet18.layer1.eval()


@pytest.mark.slow
def test_tf_same_padding_of_lite0_matches_gradient_support(lite0):
    """The bundled EfficientNet-Lite0 pads TF-"same" with a ZeroPad2d before F.conv2d
    (right/bottom only at stride 2): its fields against the gradient support, on a copy."""
    model = _positive(copy.deepcopy(lite0.module))
    assert _check(model, list_layers(lite0.module, (3, 96, 80)), 96, 80) >= 2
    rows = {r.name: r for r in list_layers(lite0.module)}
    assert rows["_conv_head"].receptive_field.stride == (32, 32)
    assert rows["_conv_head"].receptive_field.size[0] == rows["_conv_head"].receptive_field.size[1]


# Cases a mutation run (stop 20) found unpinned.


def _every_box_is_the_gradient_support(net: nn.Module, rf: ReceptiveField, height: int,
                                       width: int) -> None:
    """Each unit's field against the bounding box of its non-zero input gradient: an edge
    inside the image is exactly the support's edge; an edge the image clips only bounds it
    (dilated taps can skip the pixels next to the border). At least one unit must have
    all four edges inside the image, so the check cannot pass on clipping alone."""
    out = net(torch.zeros(1, 1, height, width, dtype=torch.float64))
    inside = 0
    for r in range(out.shape[2]):
        for c in range(out.shape[3]):
            x = torch.ones(1, 1, height, width, dtype=torch.float64, requires_grad=True)
            (grad,) = torch.autograd.grad(net(x)[0, 0, r, c], x)
            support = _support(grad)
            top = math.floor(rf.start[0] + r * rf.stride[0] - (rf.size[0] - 1) / 2)
            left = math.floor(rf.start[1] + c * rf.stride[1] - (rf.size[1] - 1) / 2)
            edges = (top, left, top + rf.size[0], left + rf.size[1])
            limits = (0, 0, height, width)
            for at, (edge, got, limit) in enumerate(zip(edges, support, limits)):
                clipped = edge < limit if at < 2 else edge > limit
                if clipped:
                    assert (got >= limit) if at < 2 else (got <= limit), (r, c, at)
                else:
                    assert got == edge, (r, c, at, edges, support)
            inside += all(not (e < lim if i < 2 else e > lim)
                          for i, (e, lim) in enumerate(zip(edges, limits)))
    assert inside > 0


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_same_padding_of_a_dilated_conv_shifts_by_the_dilated_half_kernel() -> None:
    """padding='same' with dilation pads dilation * (kernel - 1) / 2 before: a 3x4 kernel
    at dilation (2, 3) on a 9x14 input, every unit against its gradient support."""
    net = nn.Sequential(nn.Conv2d(1, 1, (3, 4), padding="same", dilation=(2, 3))).double()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    rf = list_layers(net, (1, 9, 14))[-1].receptive_field
    assert rf.size == (5, 10)
    _every_box_is_the_gradient_support(net, rf, 9, 14)


def test_dilated_max_pool_window_spans_its_dilation() -> None:
    """A max pool with dilation (2, 3) and stride (2, 1) has the window of a conv of the
    same geometry; the field of that conv is read from its gradient support."""
    def layers(pool: bool) -> nn.Sequential:
        window = (nn.MaxPool2d(3, stride=(2, 1), padding=1, dilation=(2, 3)) if pool
                  else nn.Conv2d(1, 1, 3, stride=(2, 1), padding=1, dilation=(2, 3)))
        return nn.Sequential(nn.Conv2d(1, 1, 1), window).double()

    pooled = list_layers(layers(True), (1, 11, 16))[-1].receptive_field
    reference = layers(False)
    with torch.no_grad():
        for p in reference.parameters():
            p.fill_(1.0)
    assert pooled == list_layers(reference, (1, 11, 16))[-1].receptive_field
    assert pooled.size == (5, 7)
    _every_box_is_the_gradient_support(reference, pooled, 11, 16)


class _Strided(nn.Module):
    """A conv, then a strided slice that starts at row 1 and column 2 (Swin-style), then a
    conv: the slice's start moves the field by start * the stride so far."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 1, 3, stride=(1, 2))
        self.b = nn.Conv2d(1, 1, (2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)[:, :, 1::2, 2::3])


def test_a_strided_slice_offsets_the_field_by_its_start_times_the_stride() -> None:
    """Every unit after ``x[:, :, 1::2, 2::3]`` on a 15x40 input against its gradient."""
    net = _Strided().double()
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
    rf = list_layers(net, (1, 15, 40))[-1].receptive_field
    assert rf.stride == (2, 6)
    _every_box_is_the_gradient_support(net, rf, 15, 40)


class _FunctionalPool(nn.Module):
    """``F.avg_pool2d`` / ``F.max_pool2d`` called without a stride: the stride is the kernel."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = F.avg_pool2d if self.kind == "avg" else F.max_pool2d
        return pool(x, (2, 3))


@pytest.mark.parametrize("kind", ["avg", "max"])
def test_functional_pool_without_a_stride_steps_by_its_kernel(kind: str) -> None:
    """PyTorch's pooling functions default the stride to the kernel size: a (2, 3) pool
    after a 3x3 conv on a 12x20 input has stride (2, 3); the average pool's boxes are its
    gradient support, and the max pool has the same geometry."""
    net = nn.Sequential(nn.Conv2d(1, 1, 3), _FunctionalPool(kind)).double()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    rf = list_layers(net, (1, 12, 20))[-1].receptive_field
    assert (rf.size, rf.stride) == ((4, 5), (2, 3))
    if kind == "avg":
        _every_box_is_the_gradient_support(net, rf, 12, 20)
