"""Spatial maps from any layer: one reading of a layer output as ``(N, C, H, W)``.

Convolution outputs are already ``(N, C, H, W)``. Swin- and ConvNeXt-style blocks keep
their features channels-last, ``(N, H, W, C)``. Vision transformers emit token sequences
``(N, T, D)``: ``P`` prefix tokens (class, distillation, register tokens) followed by the
``h * w`` patch tokens in row-major order. :func:`spatial_layout` decides which reading a
layer output has, from (in this order) what the user says, the module that produced it,
what the model tells (timm's ``num_prefix_tokens``, a ``cls_token``/``dist_token``/
``register_tokens`` parameter, the patch embedding) and the input size; an output that has
no spatial reading, or an ambiguous one, raises :class:`NoSpatialMapError` instead of
drawing a wrong picture. :meth:`SpatialLayout.apply` then returns a view (never a copy):
the same tensor for conv outputs, a permuted view for channels-last outputs, a slice,
``view`` and permute for tokens. Because it only indexes, the same layout applied to a
gradient gives the gradient of the map, which is what Grad-CAM on a transformer needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .errors import ConvscopeError

Kind = Literal["nchw", "nhwc", "tokens"]

MAX_INFERRED_PREFIX = 16
"""Largest number of prefix tokens tried when the model does not say how many it has."""

_NCHW_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d,
    nn.Upsample, nn.UpsamplingBilinear2d, nn.UpsamplingNearest2d, nn.PixelShuffle,
    nn.Dropout2d, nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.LocalResponseNorm,
)
_NOT_SPATIAL_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm3d, nn.MaxPool1d, nn.AvgPool1d,
    nn.MaxPool3d, nn.AvgPool3d, nn.Flatten,
)
_CLASS_TOKENS = ("cls_token", "class_token", "dist_token", "distillation_token")
_REGISTER_TOKENS = ("reg_token", "reg_tokens", "register_tokens")


class NoSpatialMapError(ConvscopeError, ValueError):
    """A layer output that cannot be read as ``(N, C, H, W)`` without guessing."""

    exit_code = 2


@dataclass(frozen=True)
class ModelHints:
    """What a model says about its layout, read once (see :func:`model_hints`).

    ``prefix_tokens``: class/distillation/register tokens before the patch tokens (None when
    the model does not say). ``patch_size``: stride of the patch embedding, ``(ph, pw)``.
    ``grid``: the patch grid at the model's own input size. ``channels_last``: the model
    declares channels-last feature maps (timm Swin's ``output_fmt="NHWC"``); only breaks ties.
    ``channels_last_modules``: the model has a module that works on channels-last tensors
    (a plain ``nn.LayerNorm``, ``data_format="channels_last"``); without one, a 4-D output
    that fits both readings is read as ``(N, C, H, W)``.
    """

    prefix_tokens: int | None = None
    patch_size: tuple[int, int] | None = None
    grid: tuple[int, int] | None = None
    channels_last: bool = False
    channels_last_modules: bool = True
    feat_size: Any = field(default=None, repr=False, compare=False)  # the patch embedding's ``dynamic_feat_size`` (timm), if any

    def grid_for(self, input_hw: tuple[int, int] | None) -> tuple[int, int] | None:
        """The patch grid for an input of ``input_hw`` (the model's own size when None)."""
        if input_hw is None:
            return self.grid
        if self.feat_size is not None:
            try:
                h, w = self.feat_size(tuple(input_hw))
                return int(h), int(w)
            except Exception:  # a patch embedding that rejects this size: derive below
                pass
        if self.patch_size is not None:
            return input_hw[0] // self.patch_size[0], input_hw[1] // self.patch_size[1]
        return None


@dataclass(frozen=True)
class SpatialLayout:
    """How a layer output maps to ``(N, C, H, W)``; :meth:`apply` does it as a view.

    ``kind`` is ``"nchw"`` (unchanged), ``"nhwc"`` (``permute(0, 3, 1, 2)``) or
    ``"tokens"`` (drop ``prefix`` tokens, then ``(N, h*w, D) -> (N, h, w, D) -> (N, D, h,
    w)`` with ``grid = (h, w)``). ``reason`` says how it was decided (for messages and tests).
    """

    kind: Kind
    grid: tuple[int, int]
    channels: int
    prefix: int = 0
    reason: str = ""

    def apply(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` (an output or its gradient, same shape) as ``(N, C, H, W)``, a view."""
        if self.kind == "nchw":
            return value
        if self.kind == "nhwc":
            return value.permute(0, 3, 1, 2)
        h, w = self.grid
        patches = value[:, self.prefix:, :]
        return patches.view(value.shape[0], h, w, value.shape[-1]).permute(0, 3, 1, 2)

    def reshape_transform(self, value: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`apply`; named like pytorch-grad-cam's ``reshape_transform``."""
        return self.apply(value)

    def prefix_tokens(self, value: torch.Tensor) -> torch.Tensor:
        """The prefix tokens ``(N, P, D)`` of a token output (empty for maps)."""
        if self.kind != "tokens":
            return value.new_empty((value.shape[0], 0, self.channels))
        return value[:, : self.prefix, :]


def model_hints(model: Any) -> ModelHints:
    """Read prefix tokens, patch size and layout declarations from a model.

    Accepts an ``nn.Module`` or anything with a ``.module`` (a ``LoadedModel``). Understands
    timm (``num_prefix_tokens``, ``patch_embed.patch_size``/``grid_size``/
    ``dynamic_feat_size``, ``output_fmt``), Hugging Face (``config.patch_size``/
    ``image_size``, ``cls_token``, ``distillation_token``, ``register_tokens``) and
    torchvision ViT (``class_token``, ``patch_size``, ``image_size``).
    """
    if isinstance(model, ModelHints):
        return model
    module = getattr(model, "module", model)
    if not isinstance(module, nn.Module):
        return ModelHints()
    prefix: int | None = None
    for sub in module.modules():
        value = getattr(sub, "num_prefix_tokens", None)
        if isinstance(value, int) and not isinstance(value, bool):
            prefix = value
            break
    if prefix is None:
        counted = 0
        found = False
        for name, param in _tensors(module):
            leaf = name.rsplit(".", 1)[-1]
            if leaf in _CLASS_TOKENS or leaf in _REGISTER_TOKENS:
                found = True
                counted += int(param.shape[-2]) if param.dim() >= 2 else 1
        prefix = counted if found else None
    patch, grid, feat_size = _patch_info(module)
    if prefix is None and patch is not None:
        prefix = 0  # a patch embedding and no class/register tokens (Swin): patch tokens only
    fmt = str(getattr(module, "output_fmt", "") or "")
    return ModelHints(prefix_tokens=prefix, patch_size=patch, grid=grid,
                      channels_last=fmt.upper().endswith("NHWC"),
                      channels_last_modules=any(_works_channels_last(m) for m in module.modules()),
                      feat_size=feat_size)


def _works_channels_last(module: nn.Module) -> bool:
    data_format = str(getattr(module, "data_format", "") or "").lower()
    if data_format in ("channels_last", "nhwc"):
        return True
    return (isinstance(module, nn.LayerNorm) and not type(module).__name__.endswith("2d")
            and data_format not in ("channels_first", "nchw"))


def _tensors(module: nn.Module):
    yield from module.named_parameters()
    yield from module.named_buffers()


def _pair(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value, value
    try:
        first, second = value
        return int(first), int(second)
    except (TypeError, ValueError):
        return None


def _patch_info(module: nn.Module) -> tuple[tuple[int, int] | None, tuple[int, int] | None, Any]:
    embed = getattr(module, "patch_embed", None)
    if isinstance(embed, nn.Module):  # timm
        patch = _pair(getattr(embed, "patch_size", None))
        grid = _pair(getattr(embed, "grid_size", None))
        return patch, grid, getattr(embed, "dynamic_feat_size", None)
    config = getattr(module, "config", None)
    if config is not None and getattr(config, "patch_size", None) is not None:  # Hugging Face
        patch = _pair(config.patch_size)
        size = _pair(getattr(config, "image_size", None))
        grid = (size[0] // patch[0], size[1] // patch[1]) if size and patch else None
        return patch, grid, None
    patch = _pair(getattr(module, "patch_size", None))  # torchvision ViT
    if patch is not None:
        size = _pair(getattr(module, "image_size", None))
        grid = (size[0] // patch[0], size[1] // patch[1]) if size else None
        return patch, grid, None
    return None, None, None


def spatial_layout(
    shape: Sequence[int] | torch.Tensor,
    *,
    model: Any = None,
    module: nn.Module | None = None,
    input_hw: Sequence[int] | None = None,
    batch_size: int | None = None,
    prefix_tokens: int | None = None,
    layout: Kind | None = None,
    name: str = "layer",
) -> SpatialLayout:
    """Decide how an output of ``shape`` reads as ``(N, C, H, W)``.

    ``model``: the whole model (or its :func:`model_hints`, to read them once);
    ``module``: the module that produced the output; ``input_hw``: the input's ``(H, W)``
    (strongly recommended: it resolves channels-last outputs and non-square token grids);
    ``batch_size``: the input's batch size (refuses windowed attention outputs whose first
    dimension is not the batch); ``prefix_tokens``/``layout``: override the inference.
    ``name`` is only used in error messages. Raises :class:`NoSpatialMapError`.
    """
    dims = tuple(int(d) for d in (shape.shape if isinstance(shape, torch.Tensor) else shape))
    hints = model_hints(model) if model is not None else ModelHints()
    hw = (int(input_hw[0]), int(input_hw[1])) if input_hw is not None else None
    where = f"{name} output {dims}"
    if module is not None and isinstance(module, _NOT_SPATIAL_MODULES):
        raise NoSpatialMapError(f"{where} from {type(module).__name__} has no spatial map")
    if batch_size is not None and dims and dims[0] != batch_size:
        raise NoSpatialMapError(
            f"{where} has no spatial map: its first dimension is not the batch of "
            f"{batch_size} (windowed attention or a reshaped internal tensor)"
        )
    if len(dims) == 4:
        return _layout_4d(dims, hints, module, hw, layout, where)
    if len(dims) == 3:
        if layout not in (None, "tokens"):
            raise NoSpatialMapError(f"{where} is 3-D; only the 'tokens' layout applies")
        return _layout_tokens(dims, hints, hw, prefix_tokens, where)
    raise NoSpatialMapError(
        f"{where} has no spatial map (expected (N, C, H, W), (N, H, W, C) or tokens (N, T, D))"
    )


def spatial_maps(output: Any, **kwargs: Any) -> torch.Tensor:
    """``output`` as ``(N, C, H, W)``, a view of it (see :func:`spatial_layout` for the
    keyword arguments). Tuples, lists and dicts are read through their first tensor."""
    from .layers import first_tensor

    tensor = first_tensor(output)
    if tensor is None:
        raise NoSpatialMapError(f"{kwargs.get('name', 'layer')} output holds no tensor")
    return spatial_layout(tensor.shape, **kwargs).apply(tensor)


# --------------------------------------------------------------------------------------


def _module_layout(module: nn.Module | None, dims: tuple[int, ...]) -> tuple[Kind, str] | None:
    """The layout a module's type implies for a 4-D output, if any."""
    if module is None:
        return None
    kind = type(module).__name__
    data_format = str(getattr(module, "data_format", "") or "").lower()
    if data_format in ("channels_first", "nchw"):
        return "nchw", f"{kind} data_format={data_format}"
    if data_format in ("channels_last", "nhwc"):
        return "nhwc", f"{kind} data_format={data_format}"
    if isinstance(module, _NCHW_MODULES) or kind.endswith("2d"):
        return "nchw", f"{kind} output"
    if isinstance(module, nn.Linear) and dims[-1] == module.out_features:
        return "nhwc", "nn.Linear acts on the last dimension"
    if isinstance(module, nn.LayerNorm) and tuple(module.normalized_shape) == (dims[-1],):
        return "nhwc", "nn.LayerNorm normalises the last dimension"
    return None


def _plausible_grid(h: int, w: int, hw: tuple[int, int] | None) -> bool:
    """Whether ``(h, w)`` can be an input of ``hw`` seen at one stride (within padding)."""
    if h < 1 or w < 1:
        return False
    if hw is None:
        return h == w
    low, high = 0.0, math.inf
    for size, cells in zip(hw, (h, w)):
        slack = 1 + 0.1 * cells
        low = max(low, size / (cells + slack))
        if cells - slack > 0:
            high = min(high, size / (cells - slack))
    return low <= high


def _exact_grid(h: int, w: int, hw: tuple[int, int] | None) -> bool:
    """Whether ``(h, w)`` is exactly ``hw`` at an integer stride (floor or ceil, as padded
    convolutions and patch embeddings give)."""
    if hw is None:
        return False
    for stride in range(1, max(hw) + 1):
        if (h in (hw[0] // stride, -(-hw[0] // stride))
                and w in (hw[1] // stride, -(-hw[1] // stride))):
            return True
    return False


def _layout_4d(dims: tuple[int, ...], hints: ModelHints, module: nn.Module | None,
               hw: tuple[int, int] | None, layout: Kind | None, where: str) -> SpatialLayout:
    _, a, b, c = dims
    chosen: tuple[Kind, str] | None = None
    if layout is not None:
        if layout == "tokens":
            raise NoSpatialMapError(f"{where} is 4-D; the 'tokens' layout needs (N, T, D)")
        chosen = (layout, "given")
    if chosen is None:
        chosen = _module_layout(module, dims)
    if chosen is None:
        as_nchw = _plausible_grid(b, c, hw)
        as_nhwc = _plausible_grid(a, b, hw)
        if as_nchw and not as_nhwc:
            chosen = ("nchw", "spatial size fits the input")
        elif as_nhwc and not as_nchw:
            chosen = ("nhwc", "spatial size fits the input (channels last)")
        elif as_nchw and as_nhwc:
            exact_nchw, exact_nhwc = _exact_grid(b, c, hw), _exact_grid(a, b, hw)
            if exact_nhwc and not exact_nchw:
                chosen = ("nhwc", "spatial size is the input at an integer stride (channels last)")
            elif exact_nchw and not exact_nhwc:
                chosen = ("nchw", "spatial size is the input at an integer stride")
            elif hints.channels_last:
                chosen = ("nhwc", "the model declares channels-last outputs")
            elif not hints.channels_last_modules:
                chosen = ("nchw", "the model has no channels-last modules")
            else:
                raise NoSpatialMapError(
                    f"{where} is ambiguous: (N, C, H, W) and (N, H, W, C) both fit; pass "
                    "layout='nchw' or 'nhwc'"
                )
        elif hw is None:
            chosen = ("nchw", "PyTorch's (N, C, H, W) convention (no input size given)")
        else:
            raise NoSpatialMapError(
                f"{where} has no spatial map for an input of {hw[0]}x{hw[1]}: neither "
                f"{b}x{c} (N, C, H, W) nor {a}x{b} (N, H, W, C) fits it"
            )
    kind, reason = chosen
    if kind == "nchw":
        return SpatialLayout("nchw", (b, c), a, reason=reason)
    return SpatialLayout("nhwc", (a, b), c, reason=reason)


def _grid_candidates(tokens: int, prefixes: Sequence[int],
                     hw: tuple[int, int] | None) -> set[tuple[int, tuple[int, int]]]:
    """``(prefix, grid)`` pairs that explain ``tokens`` tokens for an input of ``hw``."""
    found: set[tuple[int, tuple[int, int]]] = set()
    for prefix in prefixes:
        count = tokens - prefix
        if count < 1:
            continue
        if hw is None:
            side = math.isqrt(count)
            if side * side == count:
                found.add((prefix, (side, side)))
            continue
        for stride in range(1, max(hw) + 1):
            for h, w in ((hw[0] // stride, hw[1] // stride),
                         (-(-hw[0] // stride), -(-hw[1] // stride))):
                if h * w == count:
                    found.add((prefix, (h, w)))
    return found


def _layout_tokens(dims: tuple[int, ...], hints: ModelHints, hw: tuple[int, int] | None,
                   prefix_tokens: int | None, where: str) -> SpatialLayout:
    _, tokens, channels = dims
    told = prefix_tokens if prefix_tokens is not None else hints.prefix_tokens
    grid = hints.grid_for(hw)
    if grid is not None:
        count = grid[0] * grid[1]
        if told is not None and tokens == told + count:
            return SpatialLayout("tokens", grid, channels, told,
                                 reason=f"{told} prefix token(s) and the patch grid")
        if tokens == count:
            return SpatialLayout("tokens", grid, channels, 0, reason="patch tokens only")
    prefixes = [told, 0] if told is not None else list(range(MAX_INFERRED_PREFIX + 1))
    found = _grid_candidates(tokens, list(dict.fromkeys(prefixes)), hw)
    if len(found) == 1:
        prefix, found_grid = next(iter(found))
        return SpatialLayout("tokens", found_grid, channels, prefix,
                             reason=f"{prefix} prefix token(s), grid inferred from the input")
    size = f"an input of {hw[0]}x{hw[1]}" if hw else "a square input"
    if not found:
        known = f" with {told} prefix token(s)" if told is not None else ""
        raise NoSpatialMapError(
            f"{where} has no spatial map: {tokens} tokens{known} form no patch grid for {size}"
        )
    options = ", ".join(f"{p} prefix + {g[0]}x{g[1]}" for p, g in sorted(found)[:4])
    raise NoSpatialMapError(
        f"{where} is ambiguous: {tokens} tokens could be {options} for {size}; pass "
        "prefix_tokens= (the model does not say how many class/register tokens it has)"
    )
