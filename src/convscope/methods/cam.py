"""Class activation maps: which regions of the input a layer's features use for a class.

``cam(model, x)`` runs one forward pass with a forward hook on the chosen layer and, for the
gradient methods, one ``torch.autograd.grad`` from the target score to that layer's output.

Why gradients are taken w.r.t. the stored forward output, not with module backward hooks:
a module's backward hook reports the gradient of whatever tensor the module returned, and
when an in-place op follows (VGG's ``ReLU(inplace=True)`` after ``features.28``, ResNet's
``out += identity``) that tensor is rewritten after the hook ran: the hook then pairs the
post-ReLU gradient with a pre- or post-ReLU activation depending on timing. The hook here
keeps the true output ``a`` and hands the rest of the network a clone of it, so in-place ops
modify the clone and ``autograd.grad(score, a)`` is exactly d score / d output. A module
called several times (EfficientNet-Lite's shared ``_swish``) is handled by counting calls:
``call=-1`` (default) explains the last call, ``call=0`` the first.

Methods (weights ``w_k`` of the activation maps ``A_k``; ``g = d score / d A``):

* ``gradcam`` (Selvaraju et al., 2017): ``w_k = mean(g_k)``; ``relu(sum_k w_k A_k)``.
* ``gradcam++`` (Chattopadhyay et al., 2018), the paper's closed form:
  ``alpha = g^2 / (2 g^2 + sum_ab(A_k) g^3)``, ``w_k = sum(alpha * relu(g_k))``.
* ``xgradcam`` (Fu et al., 2020): ``w_k = sum(g_k A_k) / sum(A_k)``.
* ``layercam`` (Jiang et al., 2021): ``relu(sum_k relu(g_k) A_k)`` (element-wise weights).
* ``scorecam`` (Wang et al., 2020): each channel, min-max normalised and upsampled, masks
  the input; ``w = softmax_k(score(x * M_k))``. One forward per channel, batched.
* ``fasterscorecam`` (Faster Score-CAM): Score-CAM over only the ``top_channels`` channels
  with the largest spatial variance; an approximation, so it has its own name.
* ``ablationcam`` (Desai & Ramaswamy, 2020): ``w_k = (y - y_k) / y`` where ``y_k`` is the
  score with channel ``k`` set to zero. One forward per channel, batched.
* ``eigencam`` (Muhammad & Yeasin, 2020): projection of the mean-centred activations on
  their first principal component (no target, no gradient); the sign is chosen so the
  map correlates positively with the mean activation (SVD's sign is arbitrary).
* ``guided_gradcam`` (Selvaraju et al., 2017): :func:`guided_gradcam`'s ``(N, C, H, W)``
  attribution shown as a map like the others: the largest absolute value over channels,
  scaled to [0, 1] (:func:`~convscope.methods.gradients.heatmap`). It is at input
  resolution, so ``return_raw`` gives the signed ``(N, C, H, W)`` attribution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import UnknownNameError
from ..hooks import did_not_run, forward_hooks
from ..layers import resolve_layers
from ..progress import ProgressCallback, track
from ..spatial import NoSpatialMapError, SpatialLayout, spatial_layout
from . import CAM_METHODS
from .common import borrowed, check_finite, check_input, chunks, log, normalize, upsample
from .targets import (
    AttributionError,
    ClassTarget,
    LayerOutputError,
    OutputSpec,
    TargetSpec,
    _PerSample,
    resolve_targets,
    select_output,
    split_target,
    unwrap_model,
)

GRADIENT_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam")
SCORE_METHODS = ("scorecam", "fasterscorecam", "ablationcam")
METHODS = CAM_METHODS
_ALIASES = {"grad-cam": "gradcam", "gradcampp": "gradcam++", "grad-cam++": "gradcam++",
            "score-cam": "scorecam", "faster-scorecam": "fasterscorecam",
            "ablation-cam": "ablationcam", "eigen-cam": "eigencam", "layer-cam": "layercam",
            "xgrad-cam": "xgradcam", "guidedgradcam": "guided_gradcam",
            "guided-gradcam": "guided_gradcam", "guided-grad-cam": "guided_gradcam"}


class UnknownMethodError(UnknownNameError):
    """A CAM method name that convscope does not implement."""

    kind = "CAM method"
    hint = "one of " + ", ".join(METHODS)


def method_name(method: str) -> str:
    """Canonical method name (case-insensitive, a few spellings accepted)."""
    key = str(method).strip().lower().replace("_", "")
    key = _ALIASES.get(key, key)
    key = {name.replace("_", ""): name for name in METHODS}.get(key, key)
    if key not in METHODS:
        raise UnknownMethodError(method, METHODS)
    return key


# --------------------------------------------------------------------------------------
# Layer choice


def default_layer(model: nn.Module, x: torch.Tensor) -> str:
    """Name of the last module (in execution order) whose output reads as spatial maps
    with more than one position and whose map the top-1 score depends on.

    For CNNs this is the usual CAM layer (ResNet ``layer4``, VGG ``features``). For vision
    transformers the last block's patch tokens often carry no gradient (the head reads
    only the class token), so the choice falls on the last token layer of the model's
    width whose map does (a ViT's last ``norm1``, as pytorch-grad-cam recommends): one
    forward and backward pass on the first sample decides.
    """
    from ..spatial import model_hints

    module, _ = unwrap_model(model)
    modules = {name: m for name, m in module.named_modules() if name}
    hints = model_hints(module)
    probe = check_input(x, module)[:1].detach().clone().requires_grad_(True)
    found: list[tuple[str, torch.Tensor, SpatialLayout]] = []

    def hook(name: str, m: nn.Module, _i: tuple, output: Any) -> Any:
        tensor = output[0] if isinstance(output, (tuple, list)) and output else output
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            return None
        try:
            layout = spatial_layout(tensor.shape, model=hints, module=m,
                                    input_hw=tuple(probe.shape[-2:]), batch_size=1, name=name)
        except NoSpatialMapError:
            return None
        if layout.grid[0] * layout.grid[1] <= 1:
            return None
        found.append((name, tensor, layout))
        # Later in-place ops rewrite a copy, so the kept tensor stays differentiable.
        copy = tensor.clone()
        return copy if tensor is output else type(output)([copy, *output[1:]])

    with borrowed(module, what="layer search"), forward_hooks(modules, hook), \
            torch.enable_grad():
        logits = select_output(module(probe), None)
        if not found:
            raise LayerOutputError(
                "no layer of the model returns a spatial map larger than 1x1 ((N, C, H, W), "
                "channels-last or patch tokens), so there is nothing to localise; pass "
                "layer= explicitly"
            )
        score = logits.reshape(1, -1).max(dim=1).values.sum()
        grads = torch.autograd.grad(score, [t for _, t, _ in found], allow_unused=True) \
            if score.requires_grad else [None] * len(found)
    # Token layers count only at the model's final width: an attention block's qkv
    # projection (3x wider) is not a feature map of the network.
    widths = [layout.channels for _, _, layout in found if layout.kind == "tokens"]
    for (name, _, layout), grad in zip(reversed(found), reversed(grads)):
        if layout.kind == "tokens" and layout.channels != widths[-1]:
            continue
        if grad is not None and bool(layout.apply(grad).ne(0).any()):
            return name
    log.info("cam: no spatial layer's map affects the top score; taking the last one")
    return found[-1][0]


def _one_layer(module: nn.Module, layer: Any, x: torch.Tensor) -> tuple[str, nn.Module]:
    if layer is None:
        name = default_layer(module, x)
        log.info("cam: using layer %r (the last layer with a spatial output)", name)
        return name, dict(module.named_modules())[name]
    found = resolve_layers(module, layer)
    if len(found) != 1:
        raise LayerOutputError(
            f"cam explains one layer; {layer!r} matched {len(found)}: "
            + ", ".join(list(found)[:8])
        )
    return next(iter(found.items()))


# --------------------------------------------------------------------------------------
# The forward pass that keeps the layer's true output


@dataclass
class _Probe:
    """Forward hook state: which call to keep, and the outputs kept."""

    name: str
    call: int
    grad: bool
    count: int = 0
    kept: list[torch.Tensor] = field(default_factory=list)

    def __call__(self, _name: str, _module: nn.Module, _inputs: tuple, output: Any) -> Any:
        index = self.count
        self.count += 1
        if self.call >= 0 and index != self.call:
            return None
        # A tensor, or a tuple/list led by one (Hugging Face blocks return ``(hidden,)``);
        # whether it reads as spatial maps is decided after the pass (spatial_layout).
        tensor = output[0] if isinstance(output, (tuple, list)) and output else output
        if not isinstance(tensor, torch.Tensor):
            raise LayerOutputError(
                f"layer {self.name!r} returns {type(output).__name__}, not a feature map; "
                "choose a convolutional or transformer block layer "
                "(convscope.list_layers(model) shows the shapes)"
            )
        if not self.grad:
            self.kept.append(tensor.detach().clone())
            return None
        # The first kept call starts the graph (parameters do not require grad, so nothing
        # before the layer is recorded); later calls are nodes inside it.
        kept = tensor if tensor.requires_grad else tensor.detach().requires_grad_(True)
        self.kept.append(kept)
        # Downstream modules get a copy: an in-place op after this layer modifies the copy,
        # never the tensor we differentiate and read.
        if tensor is output:
            return kept.clone()
        return type(output)([kept.clone(), *output[1:]])

    def chosen(self) -> torch.Tensor:
        if self.count == 0:
            raise LayerOutputError(did_not_run(self.name))
        if self.call >= 0:
            if self.call >= self.count:
                raise LayerOutputError(
                    f"layer {self.name!r} ran {self.count} time(s) per forward pass; "
                    f"call={self.call} does not exist (use 0..{self.count - 1} or -1)"
                )
            return self.kept[0]
        if -self.call > self.count:
            raise LayerOutputError(
                f"layer {self.name!r} ran {self.count} time(s) per forward pass; call={self.call}"
                " does not exist"
            )
        return self.kept[self.call]


def _layout(module: nn.Module, layer: tuple[str, nn.Module], acts: torch.Tensor,
            x: torch.Tensor) -> SpatialLayout:
    """How the layer's output reads as ``(N, C, H, W)`` maps (conv maps as they are,
    channels-last transposed, transformer tokens without prefix tokens on the patch grid),
    or a :class:`LayerOutputError` that says why it has no such reading."""
    try:
        return spatial_layout(acts.shape, model=module, module=layer[1],
                              input_hw=tuple(x.shape[-2:]), batch_size=x.shape[0],
                              name=f"layer {layer[0]!r}")
    except NoSpatialMapError as error:
        raise LayerOutputError(
            f"layer {layer[0]!r} returns {tuple(acts.shape)}, not an (N, C, H, W) feature map "
            f"nor a layout that reads as one ({error}); choose a convolutional or transformer "
            "block layer (convscope.list_layers(model) shows the shapes)"
        ) from None


def _forward(module: nn.Module, layer: tuple[str, nn.Module], x: torch.Tensor, call: int,
             grad: bool) -> tuple[Any, torch.Tensor, int]:
    """``(model output, layer output of the chosen call, number of calls)``."""
    probe = _Probe(layer[0], call, grad)
    with forward_hooks({layer[0]: layer[1]}, probe), torch.set_grad_enabled(grad):
        raw = module(x)
    return raw, probe.chosen(), probe.count


def _scores(target: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor,
            n: int) -> torch.Tensor:
    scores = target(logits)
    if not isinstance(scores, torch.Tensor) or scores.shape != (n,):
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise AttributionError(
            f"a target must return one score per sample, shape ({n},); got {shape}"
        )
    return scores


def _row_scores(target: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor,
                samples: torch.Tensor) -> torch.Tensor:
    """Score of each row of ``logits`` for the target of the sample it came from."""
    if isinstance(target, ClassTarget):
        return target(logits)
    if isinstance(target, _PerSample):
        out = logits.new_empty(logits.shape[0])
        for s in samples.unique().tolist():
            rows = (samples == s).nonzero().flatten()
            out[rows] = target.targets[s](logits[rows])
        return out
    return _scores(target, logits, logits.shape[0])


# --------------------------------------------------------------------------------------
# Weights


def _gradient_cam(method: str, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    dims = (2, 3)
    if method == "gradcam":
        weights = grads.mean(dim=dims, keepdim=True)
        return torch.relu((weights * acts).sum(dim=1))
    if method == "gradcam++":
        g2 = grads.pow(2)
        g3 = g2 * grads
        denom = 2 * g2 + acts.sum(dim=dims, keepdim=True) * g3
        alpha = torch.where(grads != 0, g2 / torch.where(denom != 0, denom, 1.0), 0.0)
        weights = (alpha * torch.relu(grads)).sum(dim=dims, keepdim=True)
        return torch.relu((weights * acts).sum(dim=1))
    if method == "xgradcam":
        total = acts.sum(dim=dims, keepdim=True)
        weights = (grads * acts).sum(dim=dims, keepdim=True) / (total + 1e-7)
        return torch.relu((weights * acts).sum(dim=1))
    if method == "layercam":
        return torch.relu((torch.relu(grads) * acts).sum(dim=1))
    raise AssertionError(method)  # unreachable: method_name() validated it


def _eigen_cam(acts: torch.Tensor) -> torch.Tensor:
    maps = []
    for a in acts.double():
        c, h, w = a.shape
        flat = a.reshape(c, h * w).T  # positions x channels
        centred = flat - flat.mean(dim=0, keepdim=True)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        projection = (centred @ vh[0]).reshape(h, w)
        mean_map = a.mean(dim=0)
        if ((projection - projection.mean()) * (mean_map - mean_map.mean())).sum() < 0:
            projection = -projection
        maps.append(torch.relu(projection))
    return torch.stack(maps).to(acts.dtype)


@torch.no_grad()
def _score_cam(module: nn.Module, layer: tuple[str, nn.Module], x: torch.Tensor,
               acts: torch.Tensor, target: Callable, output: OutputSpec, batch_size: int,
               top_channels: int | None, progress: ProgressCallback | None = None
               ) -> torch.Tensor:
    n, c = acts.shape[:2]
    flat = acts.reshape(n, c, -1)
    low = flat.min(dim=2, keepdim=True).values
    span = flat.max(dim=2, keepdim=True).values - low
    masks = ((flat - low) / (span + 1e-8)).reshape(acts.shape)
    if top_channels is not None:
        k = max(1, min(int(top_channels), c))
        channels = acts.reshape(n, c, -1).var(dim=2).topk(k, dim=1).indices  # (n, k)
    else:
        channels = torch.arange(c, device=acts.device).expand(n, c)
    k = channels.shape[1]
    samples = torch.arange(n, device=acts.device).repeat_interleave(k)
    picked = channels.reshape(-1)
    scores = acts.new_empty(n * k)
    size = tuple(x.shape[-2:])
    parts = list(chunks(n * k, batch_size))
    for part in track(parts, progress, "score-cam: masked passes"):
        mask = upsample(masks[samples[part], picked[part]], size)[:, None]
        # one sample: broadcast instead of gathering copies of the input first
        masked = mask * x if n == 1 else mask * x[samples[part]]
        logits = select_output(module(masked), output)
        scores[part] = _row_scores(target, logits, samples[part]).to(scores.dtype)
    weights = torch.softmax(scores.reshape(n, k), dim=1)
    chosen = acts.gather(1, channels[:, :, None, None].expand(n, k, *acts.shape[2:]))
    return torch.relu((weights[:, :, None, None] * chosen).sum(dim=1))


@torch.no_grad()
def _ablation_cam(module: nn.Module, layer: tuple[str, nn.Module], x: torch.Tensor,
                  acts: torch.Tensor, call: int, base: torch.Tensor, target: Callable,
                  output: OutputSpec, batch_size: int, layout: SpatialLayout,
                  progress: ProgressCallback | None = None) -> torch.Tensor:
    n, c = acts.shape[:2]
    samples = torch.arange(n, device=x.device).repeat_interleave(c)
    channels = torch.arange(c, device=x.device).repeat(n)
    scores = acts.new_empty(n * c)
    state = {"count": 0, "channels": channels[:0]}

    def hook(_name: str, _m: nn.Module, _i: tuple, output: Any) -> Any:
        index = state["count"]
        state["count"] += 1
        if index != call:
            return None
        tensor = output[0] if isinstance(output, (tuple, list)) else output
        ablated = tensor.clone()
        # Zero the channel where the map reads it (a view: tokens' patch part, NHWC's last dim).
        view = layout.apply(ablated)
        view[torch.arange(view.shape[0]), state["channels"]] = 0
        return ablated if tensor is output else type(output)([ablated, *output[1:]])

    with forward_hooks({layer[0]: layer[1]}, hook):
        parts = list(chunks(n * c, batch_size))
        for part in track(parts, progress, "ablation-cam: ablated passes"):
            state["count"] = 0
            state["channels"] = channels[part]
            logits = select_output(module(x[samples[part]]), output)
            scores[part] = _row_scores(target, logits, samples[part]).to(scores.dtype)
    y = base.to(scores.dtype)[samples]
    weights = ((y - scores) / torch.where(y != 0, y, 1e-7)).reshape(n, c)
    return torch.relu((weights[:, :, None, None] * acts).sum(dim=1))


# --------------------------------------------------------------------------------------
# Public API


def cam(
    model: Any,
    x: torch.Tensor,
    *,
    layer: Any = None,
    target: TargetSpec = None,
    method: str = "gradcam",
    call: int = -1,
    output: OutputSpec = None,
    batch_size: int = 32,
    top_channels: int = 10,
    return_raw: bool = False,
    progress: ProgressCallback | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Class activation maps ``(N, H, W)`` in [0, 1] at the input's size.

    >>> maps = convscope.cam(model, x, layer="layer4", target=281)
    >>> maps, raw = convscope.cam(loaded, x, target="tiger cat", return_raw=True)

    ``model`` is an ``nn.Module`` or a ``LoadedModel`` (whose class names resolve string
    targets). ``layer`` is any single selector :func:`~convscope.resolve_layers` accepts;
    None picks the last layer with a spatial output and logs which. ``target``: None (each
    sample's top-1 class), an int, a class name, a list (one per sample) or a callable
    ``output -> (N,)`` such as :class:`ClassTarget`; per-sample targets (a list, a tuple,
    a 1-D tensor) are split with the batch, and a callable is applied to each part's
    output. ``method``: one of
    :data:`METHODS` (see the module docstring). ``call`` picks which call of a module that
    runs several times per forward pass (-1: the last). ``output`` picks the logits when the
    model returns a tuple/dict. ``batch_size`` bounds the samples per forward pass (the
    masked or ablated copies for Score-/Ablation-CAM). ``top_channels`` is Faster
    Score-CAM's channel count. With ``return_raw`` the layer-resolution maps (after the
    ReLU, before scaling) come back too: ``(maps, raw)`` (for ``guided_gradcam``, the
    signed ``(N, C, H, W)`` attribution). ``progress(phase, done, total)`` hears of each
    batch of Score-/Ablation-CAM passes (:mod:`convscope.progress`); raising from it
    cancels the computation, leaving the model as it was.

    The model is left as it was: training flags, ``requires_grad``, ``.grad`` and hooks.
    A model in training mode is explained in eval mode, with a warning.
    """
    kind = method_name(method)
    module, class_names = unwrap_model(model)
    x = check_input(x, module)
    n = x.shape[0]
    split_target(target, slice(0, n), n)  # a wrong number of targets fails before any work
    if kind == "guided_gradcam":
        from .gradients import heatmap

        attribution = guided_gradcam(model, x, layer=layer, target=target, call=call,
                                     output=output, batch_size=batch_size)
        guided_maps = heatmap(attribution)
        return (guided_maps, attribution) if return_raw else guided_maps
    chosen = _one_layer(module, layer, x)
    raws = []
    with borrowed(module, what="class activation map"):
        parts = list(chunks(n, batch_size))
        for part in parts:
            part_target = split_target(target, part, n)
            heard = progress
            if progress is not None and len(parts) > 1:  # one bar per part of the batch
                span = f" (samples {part.start + 1}-{part.stop} of {n})"

                def heard(phase: str, done: int, total: int | None, span: str = span) -> None:
                    progress(phase + span, done, total)

            raw = _cam_batch(module, chosen, x[part], kind, part_target, call, output,
                             class_names, batch_size, top_channels, heard)
            check_finite(raw, f"the {kind} map of layer {chosen[0]!r}")
            raws.append(raw.detach())
    raw_maps = torch.cat(raws)
    maps = normalize(upsample(raw_maps.float(), tuple(x.shape[-2:])))
    return (maps, raw_maps) if return_raw else maps


def _cam_batch(module: nn.Module, layer: tuple[str, nn.Module], x: torch.Tensor, kind: str,
               target: TargetSpec, call: int, output: OutputSpec,
               class_names: list[str] | None, batch_size: int,
               top_channels: int | None, progress: ProgressCallback | None = None
               ) -> torch.Tensor:
    grad = kind in GRADIENT_METHODS
    raw, acts, count = _forward(module, layer, x, call, grad)
    layout = _layout(module, layer, acts, x)
    logits = select_output(raw, output)
    if kind == "eigencam":
        return _eigen_cam(layout.apply(acts.detach()))
    fn = resolve_targets(target, logits.detach(), class_names=class_names)
    if grad:
        scores = _scores(fn, logits, x.shape[0])
        if not scores.requires_grad:
            raise AttributionError(
                "the target score does not depend on the layer's output (the model ran "
                "without gradients, e.g. under torch.no_grad inside forward)"
            )
        (grads,) = torch.autograd.grad(scores.sum(), acts, allow_unused=True)
        if grads is None:
            raise AttributionError(
                f"the target score does not depend on layer {layer[0]!r} (call {call})"
            )
        check_finite(grads, f"the gradient of the target w.r.t. layer {layer[0]!r}")
        # The layout only indexes, so applied to the gradient it gives the map's gradient.
        return _gradient_cam(kind, layout.apply(acts.detach()), layout.apply(grads))
    maps = layout.apply(acts)
    if kind == "ablationcam":
        absolute = call if call >= 0 else count + call
        base = _scores(fn, logits, x.shape[0])
        return _ablation_cam(module, layer, x, maps, absolute, base, fn, output, batch_size,
                             layout, progress)
    return _score_cam(module, layer, x, maps, fn, output, batch_size,
                      top_channels if kind == "fasterscorecam" else None, progress)


def guided_gradcam(
    model: Any,
    x: torch.Tensor,
    *,
    layer: Any = None,
    target: TargetSpec = None,
    call: int = -1,
    output: OutputSpec = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """Guided Grad-CAM (Selvaraju et al., 2017): guided backpropagation ``(N, C, H, W)``
    multiplied by the upsampled Grad-CAM map (scaled to [0, 1]), so the fine detail of
    guided backpropagation is kept only where Grad-CAM says the class evidence is.

    Guided backpropagation needs ReLU-family activations (see
    :mod:`convscope.methods.guided`); a model without any raises ``GuidedBackpropError``.
    ``cam(..., method="guided_gradcam")`` returns the same attribution as ``(N, H, W)``
    maps in [0, 1].
    """
    from .gradients import saliency

    module, _ = unwrap_model(model)
    x = check_input(x, module)
    if target is None:  # fix the top-1 class once, so both parts explain the same class
        with borrowed(module, what="guided Grad-CAM"), torch.no_grad():
            target = torch.cat([select_output(module(x[part]), output).argmax(dim=1)
                                for part in chunks(x.shape[0], batch_size)]).tolist()
    maps = cam(model, x, layer=layer, target=target, method="gradcam", call=call,
               output=output, batch_size=batch_size)
    guided = saliency(model, x, target, method="guided_backprop", output=output,
                      batch_size=batch_size)
    return guided * maps[:, None]
