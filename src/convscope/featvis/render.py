"""``visualize``: synthesise the images that maximise objectives, many at once.

Every objective gets its own image(s), parameterised and transformed independently with
its own random generator, so a result depends on the seed and the objective, not on which
other objectives share its batch. Batches are bounded in memory (``batch_size``); the
caller's model is borrowed and left exactly as it was (training flags, ``requires_grad``,
``.grad``, hooks). Layer outputs are read through forward hooks without detaching, so the
gradient flows from the objective back to the image.
"""

from __future__ import annotations

import contextlib
import html
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..hooks import forward_hooks
from ..layers import first_tensor, resolve_layers
from ..methods.common import borrowed, model_device
from ..spatial import SpatialLayout
from .objectives import (
    Channel,
    ClassLogit,
    Context,
    ModelInfo,
    Neuron,
    NoSpatialReadingError,
    Objective,
    ObjectiveError,
    OptimizationError,
    ParsedSpec,
    expand_channels,
    parse_objective,
)
from .param import make_param
from .transforms import RandomView, make_transform

log = logging.getLogger(__name__)

#: Memory the activations of one optimisation batch may take when ``batch_size`` is None
#: (forward outputs of one image times three, for what backpropagation keeps).
DEFAULT_BATCH_BYTES = 2 * 2**30

from ..progress import ProgressCallback, TqdmProgress  # noqa: E402  (one progress mechanism)

#: The phase name visualize reports its optimisation steps under.
PHASE = "visualize: steps"
ObjectiveSpec = str | Objective
#: Pixels per tile in a notebook's view of a :class:`Visualization`.
REPR_TILE = 128
#: Images a notebook's HTML view shows at most (the rest stay in ``.grid()`` / ``.save()``).
REPR_MAX_IMAGES = 64


# --------------------------------------------------------------------------------------
# Reading a layer as maps: the one place where a module output becomes (N, C, H, W).


def read_maps(name: str, output: Any, layout: SpatialLayout | None = None) -> torch.Tensor:
    """``(N, C, H, W)`` maps of a layer's output, with its graph kept.

    ``layout`` (decided once by :func:`decide_layout`) reads conv outputs as they are,
    channels-last blocks permuted and token sequences as their patch grid; an ``(N, C)``
    output (a linear layer, the logits) is a 1x1 map.
    """
    tensor = first_tensor(output)
    if tensor is None:
        raise NoSpatialReadingError(f"layer {name!r} returns no tensor, so it has no maps to read")
    if tensor.ndim == 2:
        return tensor[:, :, None, None]
    if layout is None:
        layout = decide_layout(name, output, None, None, None)
    return layout.apply(tensor)


def decide_layout(name: str, output: Any, module: nn.Module | None, hints: Any,
                  input_hw: tuple[int, int] | None) -> SpatialLayout | None:
    """How ``name``'s output reads as maps (``convscope.spatial``); None for ``(N, C)``.
    An output with no spatial reading raises :class:`NoSpatialReadingError`."""
    from ..spatial import NoSpatialMapError, spatial_layout

    tensor = first_tensor(output)
    if tensor is None:
        raise NoSpatialReadingError(f"layer {name!r} returns no tensor, so it has no maps to read")
    if tensor.ndim == 2:
        return None
    try:
        return spatial_layout(tensor.shape, model=hints, module=module, input_hw=input_hw,
                              batch_size=int(tensor.shape[0]), name=f"layer {name!r}")
    except NoSpatialMapError as error:
        raise NoSpatialReadingError(
            f"{error}; an objective needs a layer with a spatial reading (a conv output, a "
            "channels-last block or transformer tokens; convscope.list_layers shows shapes)"
        ) from None


# --------------------------------------------------------------------------------------
# Result.


@dataclass
class Visualization:
    """Images that maximise objectives.

    ``images`` is ``(N, 3, size, size)`` in [0, 1] (display space), ``objectives`` the
    objective of each image, ``values`` the objective each image reaches (measured on the
    final image without transforms), ``history`` ``(steps, N)`` the values during
    optimisation (under the random transforms).
    """

    images: torch.Tensor
    objectives: list[Objective]
    values: torch.Tensor
    history: torch.Tensor
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """The objective of each image as text."""
        return [o.name for o in self.objectives]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return f"Visualization({len(self)} images of {self.images.shape[-1]} px: {self.names[:4]}...)"

    def image(self, index: int) -> Any:
        """Image ``index`` as a ``PIL.Image``."""
        from ..render.convert import to_pil

        return to_pil(self.images[index])

    def grid(self, cols: int | None = None, *, labels: bool = True, pad: int = 2,
             tile_size: int | None = None) -> Any:
        """All images in one ``PIL.Image``, row-major, labelled with their objectives."""
        import math

        from PIL import Image

        from ..render.grid import _draw_labels, layout

        tiles = self.images.detach().float().cpu()
        if tile_size is not None and tile_size != tiles.shape[-1]:
            tiles = torch.nn.functional.interpolate(
                tiles, size=(tile_size, tile_size), mode="bilinear", antialias=True,
                align_corners=False).clamp(0, 1)
        count = tiles.shape[0]
        cols = cols or max(1, math.ceil(math.sqrt(count)))
        array = (tiles.permute(0, 2, 3, 1).numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
        canvas = Image.fromarray(layout(array, min(cols, count), pad))
        if labels:
            _draw_labels(canvas, self.names, min(cols, count), array.shape[1], array.shape[2], pad)
        return canvas

    def _repr_png_(self) -> bytes:
        """The labelled grid as PNG bytes (what a notebook shows when HTML is off)."""
        import io

        buffer = io.BytesIO()
        self.grid(tile_size=min(int(self.images.shape[-1]), REPR_TILE)).save(buffer, format="PNG")
        return buffer.getvalue()

    def _repr_html_(self) -> str:
        """One figure per image (the first :data:`REPR_MAX_IMAGES`) captioned with its
        objective and the value it reached, plus the settings: a notebook's rich view."""
        import base64
        import io

        shown = min(len(self), REPR_MAX_IMAGES)
        figures = []
        for i in range(shown):
            buffer = io.BytesIO()
            self.image(i).save(buffer, format="PNG")
            data = base64.b64encode(buffer.getvalue()).decode("ascii")
            name = html.escape(self.names[i])
            figures.append(
                '<figure style="margin:0 6px 6px 0;display:inline-block;text-align:center;'
                'font-size:12px">'
                f'<img src="data:image/png;base64,{data}" alt="{name}" '
                f'style="width:{REPR_TILE}px;height:{REPR_TILE}px;image-rendering:auto"/>'
                f"<figcaption>{name}<br>{float(self.values[i]):.3g}</figcaption></figure>")
        more = (f"<div><small>first {shown} of {len(self)} images shown; .grid() or .save() "
                "has all</small></div>" if shown < len(self) else "")
        settings = html.escape(", ".join(f"{k}={v}" for k, v in self.settings.items()))
        return ('<div class="convscope-visualization">'
                f"<div><b>{len(self)} feature visualisation(s)</b> <small>{settings}</small>"
                "</div>" + "".join(figures) + more + "</div>")

    def save(self, directory: str | os.PathLike, *, title: str | None = None) -> Path:
        """Write ``grid.png``, one ``NNN_<objective>.png`` per image, ``values.json`` and an
        ``index.html`` that shows them with their values; returns the folder."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.grid().save(folder / "grid.png")
        rows = []
        for i, name in enumerate(self.names):
            file = f"{i:03d}_{_safe(name)}.png"
            self.image(i).save(folder / file)
            rows.append({"file": file, "objective": name, "value": float(self.values[i])})
        (folder / "values.json").write_text(json.dumps(
            {"settings": self.settings, "images": rows}, indent=1))
        heading = html.escape(title or "Feature visualisations")
        figures = "\n".join(
            f'<figure><img src="{html.escape(r["file"])}" alt="{html.escape(r["objective"])}">'
            f'<figcaption>{html.escape(r["objective"])}<br>{r["value"]:.3g}</figcaption></figure>'
            for r in rows)
        settings = html.escape(", ".join(f"{k}={v}" for k, v in self.settings.items()))
        (folder / "index.html").write_text(
            "<!doctype html><meta charset=utf-8>"
            f"<title>{heading}</title><style>body{{font-family:sans-serif}}"
            "figure{display:inline-block;margin:4px;text-align:center;font-size:12px}"
            "img{width:160px;height:160px;image-rendering:auto}</style>"
            f"<h1>{heading}</h1><p>{settings}</p><p><img src=grid.png alt=grid "
            "style='width:auto;height:auto;max-width:100%'></p>\n"
            f"{figures}\n")
        return folder


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:80] or "objective"


# --------------------------------------------------------------------------------------
# Model plumbing.


@dataclass(frozen=True)
class _Normalizer:
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std


def _unpack(model: Any, transform: Any) -> tuple[nn.Module, _Normalizer, list[str] | None]:
    """Module, normalisation and class names of a LoadedModel or a plain module."""
    from ..models import LoadedModel

    if isinstance(model, LoadedModel):
        module, names, given = model.module, model.class_names, transform or model.transform
    elif isinstance(model, nn.Module):
        module, names, given = model, None, transform
    else:
        raise TypeError(f"model must be a LoadedModel or an nn.Module; got {type(model).__name__}")
    if given is None:
        return module, _Normalizer((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), names
    if hasattr(given, "mean") and hasattr(given, "std"):
        return module, _Normalizer(tuple(given.mean), tuple(given.std)), names
    if isinstance(given, (tuple, list)) and len(given) == 2:
        return module, _Normalizer(tuple(given[0]), tuple(given[1])), names
    raise TypeError("transform must be a convscope Preprocess (anything with .mean and .std) "
                    f"or a (mean, std) pair; got {type(given).__name__}")


class _StopForward(Exception):
    """Raised from a hook once every watched layer has run and no logits are needed."""


@dataclass
class _Watch:
    modules: dict[str, nn.Module]
    calls: dict[str, int]  # how often each module runs per forward; the last call is read
    need_logits: bool
    layouts: dict[str, SpatialLayout | None] = field(default_factory=dict)


def _run(module: nn.Module, x: torch.Tensor, watch: _Watch) -> Context:
    """Forward ``x``, reading the watched layers' last calls as maps (graph kept)."""
    maps: dict[str, torch.Tensor] = {}
    seen: Counter[str] = Counter()
    missing = set(watch.modules)

    def hook(name: str, _module: nn.Module, _inputs: tuple, output: Any) -> None:
        seen[name] += 1
        if seen[name] == watch.calls[name]:
            # clone(): an in-place op after this layer (ReLU(inplace=True)) must not rewrite
            # what the objective reads; clone keeps the graph, unlike detach.
            maps[name] = read_maps(name, output, watch.layouts.get(name)).clone()
            missing.discard(name)
            if not missing and not watch.need_logits:
                raise _StopForward  # the rest of the network cannot change the objective

    output = None
    with forward_hooks(watch.modules, hook):
        with contextlib.suppress(_StopForward):
            output = module(x)
    logits = None
    if watch.need_logits:
        logits = first_tensor(output)
    return Context(maps, logits)


def _probe(module: nn.Module, layers: dict[str, nn.Module], size: int,
           normalize: _Normalizer, device: torch.device) -> tuple[dict, dict, int | None, int, dict]:
    """One no-grad forward of a grey image: each layer's map shape, calls per forward and
    spatial layout, the class count, and the bytes of every leaf module's outputs for one
    image."""
    from ..spatial import model_hints

    hints = model_hints(module)
    shapes: dict[str, tuple[int, int, int]] = {}
    layouts: dict[str, SpatialLayout | None] = {}
    calls: Counter[str] = Counter()
    nbytes = [0]

    def hook(name: str, sub: nn.Module, _inputs: tuple, output: Any) -> None:
        tensor = first_tensor(output)
        if tensor is not None:
            nbytes[0] += tensor.numel() * tensor.element_size()
        if name in layers:
            calls[name] += 1
            layouts[name] = decide_layout(name, output, sub, hints, (size, size))
            maps = read_maps(name, output, layouts[name])
            shapes[name] = tuple(int(s) for s in maps.shape[1:])  # type: ignore[assignment]

    leaves = {name: m for name, m in module.named_modules() if name and not list(m.children())}
    watched = {**leaves, **layers}
    x = normalize(torch.full((1, 3, size, size), 0.5, device=device))
    with torch.no_grad(), forward_hooks(watched, hook):
        output = module(x)
    logits = first_tensor(output)
    num_classes = int(logits.shape[1]) if logits is not None and logits.ndim == 2 else None
    return shapes, dict(calls), num_classes, nbytes[0], layouts


def _resolve_one(module: nn.Module, selector: str) -> str:
    """The dotted name of the single layer a selector means (close matches if none)."""
    names = list(resolve_layers(module, selector))
    if len(names) != 1:
        raise ObjectiveError(
            f"layer selector {selector!r} matches {len(names)} layers ({', '.join(names[:4])}"
            f"{', ...' if len(names) > 4 else ''}); an objective object reads one layer, "
            "give its dotted name (the string form LAYER:CHANNEL expands globs)"
        )
    return names[0]


def _expand(spec: ParsedSpec, layer_names: list[str], shapes: dict) -> list[Objective]:
    """Objectives of one string spec, for every layer its selector matched."""
    if spec.layer is None:
        return [ClassLogit(spec.channels)]
    out: list[Objective] = []
    for name in layer_names:
        channels = shapes[name][0]
        if spec.unit:
            out.append(Neuron(name, int(spec.channels), spec.y, spec.x))
        else:
            out.extend(Channel(name, c) for c in expand_channels(spec.channels, channels, name))
    return out


def _groups(counts: int, per: int, batch_size: int) -> list[list[int]]:
    """Objective indices per batch: ``per`` images each, never split, ``batch_size`` images
    per batch at most (a single objective with more images gets a batch of its own)."""
    batches: list[list[int]] = [[]]
    for index in range(counts):
        if batches[-1] and (len(batches[-1]) + 1) * per > batch_size:
            batches.append([])
        batches[-1].append(index)
    return batches


def _image_seed(seed: int, index: int) -> int:
    """Seed of image ``index``: independent of the batch it lands in."""
    return (int(seed) * 1_000_003 + index * 7919 + 17) % (2**63 - 1)


def _tqdm_callback(total: int) -> tuple[ProgressCallback, Callable[[], None]]:
    bar = TqdmProgress(unit="step", leave=False)
    return bar, bar.close


# --------------------------------------------------------------------------------------


def visualize(
    model: Any,
    objectives: ObjectiveSpec | Sequence[ObjectiveSpec],
    *,
    steps: int = 512,
    size: int = 224,
    seed: int = 0,
    batch_size: int | None = None,
    param: str = "fft",
    transforms: str | RandomView = "standard",
    lr: float | None = None,
    progress: bool | ProgressCallback = True,
    transform: Any = None,
    images_per_objective: int = 1,
) -> Visualization:
    """Synthesise the image(s) that maximise each objective.

    ``model`` is a :class:`~convscope.models.LoadedModel` (its normalisation is applied
    inside, images stay in [0, 1]) or an ``nn.Module`` with ``transform`` giving its
    normalisation (a ``Preprocess`` or ``(mean, std)``; none by default). ``objectives`` are
    strings (``"LAYER:CHANNEL"``, ``"LAYER:CHANNEL@Y,X"``, ``"LAYER:0-63"``, ``"LAYER:*"``,
    ``"class:285"``, ``"class:Egyptian cat"``; globs in LAYER expand) or
    :class:`~convscope.featvis.objectives.Objective` objects (sums, weights, directions,
    diversity). ``param`` is ``"fft"`` (Fourier, decorrelated colour), ``"maco"``
    (phase-only, Fel et al. 2023) or ``"pixel"``; ``transforms`` ``"standard"``,
    ``"lucent"``, ``"none"`` or a :class:`RandomView`. ``progress`` is True (a tqdm bar on
    stderr, :class:`convscope.progress.TqdmProgress`), False, or a
    :data:`convscope.progress.ProgressCallback` ``(phase, done_steps, total_steps)``; raising
    from it stops the optimisation. Deterministic for a seed on
    the CPU, whatever ``batch_size``.
    """
    if steps < 1 or size < 8 or images_per_objective < 1:
        raise ObjectiveError(
            f"steps must be >= 1, size >= 8 and images_per_objective >= 1; got steps={steps}, "
            f"size={size}, images_per_objective={images_per_objective}")
    if batch_size is not None and batch_size < 1:
        raise ObjectiveError(f"batch_size must be at least 1, got {batch_size}")
    module, normalize, class_names = _unpack(model, transform)
    items = [objectives] if isinstance(objectives, (str, Objective)) else list(objectives)
    if not items:
        raise ObjectiveError("no objectives given")
    view = make_transform(transforms)
    device = model_device(module)

    # Layers: strings may use globs (one objective per matched layer); objects read one.
    parsed: list[tuple[ParsedSpec | Objective, list[str]]] = []
    canonical: dict[str, str] = {}
    for item in items:
        if isinstance(item, str):
            spec = parse_objective(item)
            names = [] if spec.layer is None else list(resolve_layers(module, spec.layer))
            parsed.append((spec, names))
        elif isinstance(item, Objective):
            for selector in item.layers():
                canonical[selector] = _resolve_one(module, selector)
            parsed.append((item, []))
        else:
            raise TypeError(f"an objective is a string or an Objective; got {type(item).__name__}")
    needed = {name for _, names in parsed for name in names} | set(canonical.values())
    layer_modules = {n: m for n, m in module.named_modules() if n in needed}

    with borrowed(module, what="feature visualisation"):
        shapes, calls, num_classes, one_image_bytes, layouts = _probe(
            module, layer_modules, size, normalize, device)
        info = ModelInfo(shapes, num_classes, class_names, canonical)
        objs: list[Objective] = []
        for item, names in parsed:
            found = _expand(item, names, shapes) if isinstance(item, ParsedSpec) else [item]
            objs.extend(o.prepare(info) for o in found)
        watch = _Watch(layer_modules, calls, any(o.needs_logits for o in objs), layouts)
        if batch_size is None:
            per_image = max(1, 3 * one_image_bytes)
            batch_size = max(1, min(len(objs) * images_per_objective,
                                    DEFAULT_BATCH_BYTES // per_image))
        batches = _groups(len(objs), images_per_objective, batch_size)
        total = steps * len(batches)
        callback, close = (None, None)
        if progress is True:
            callback, close = _tqdm_callback(total)
        elif callable(progress):
            callback = progress
        try:
            results = [
                _optimise(module, [objs[i] for i in batch], batch, images_per_objective,
                          steps=steps, size=size, seed=seed, param=param, view=view, lr=lr,
                          normalize=normalize, watch=watch, device=device,
                          callback=callback, done=b * steps, total=total)
                for b, batch in enumerate(batches)
            ]
        finally:
            if close is not None:
                close()
    images = torch.cat([r[0] for r in results])
    values = torch.cat([r[1] for r in results])
    history = torch.cat([r[2] for r in results], dim=1)
    per_image = [o for o in objs for _ in range(images_per_objective)]
    settings = {"steps": steps, "size": size, "seed": seed, "param": param,
                "transforms": transforms if isinstance(transforms, str) else repr(transforms),
                "lr": lr, "batch_size": batch_size, "images_per_objective": images_per_objective}
    return Visualization(images, per_image, values, history, settings)


def _optimise(module: nn.Module, objs: list[Objective], indices: list[int], per: int, *,
              steps: int, size: int, seed: int, param: str, view: RandomView,
              lr: float | None, normalize: _Normalizer, watch: _Watch, device: torch.device,
              callback: ProgressCallback | None, done: int, total: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optimise one batch: ``per`` images for each objective of ``objs``."""
    generators = [torch.Generator().manual_seed(_image_seed(seed, i * per + j))
                  for i in indices for j in range(per)]
    image_param = make_param(param, size, generators, device)
    optimizer = torch.optim.Adam(image_param.params, lr=lr or image_param.default_lr)
    parts = [slice(k * per, (k + 1) * per) for k in range(len(objs))]

    def evaluate(ctx: Context) -> torch.Tensor:
        return torch.cat([obj(ctx.slice(part)) for obj, part in zip(objs, parts, strict=True)])

    history = torch.empty(steps, len(generators))
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        x = normalize(view(image_param(), generators, size))
        values = evaluate(_run(module, x, watch))
        _check_finite(values, objs, per, step)
        if values.requires_grad:
            (-values.sum()).backward()
        grads = [p.grad.flatten(1).sum(1) for p in image_param.params if p.grad is not None]
        if not grads:
            raise OptimizationError(
                f"objectives {', '.join(repr(o.name) for o in objs)} do not depend on the image "
                "(no gradient reaches it); pick a layer the input flows through")
        _check_finite(torch.stack(grads).sum(0), objs, per, step, what="gradient")
        optimizer.step()
        history[step] = values.detach().float().cpu()
        if callback is not None:
            callback(PHASE, done + step + 1, total)
    with torch.no_grad():
        images = image_param().detach()
        final = evaluate(_run(module, normalize(images), watch)).float().cpu()
    _check_finite(final, objs, per, steps)
    return images.float().cpu(), final, history


def _check_finite(values: torch.Tensor, objs: list[Objective], per: int, step: int,
                  what: str = "value") -> None:
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if bad:
        names = list(dict.fromkeys(objs[i // per].name for i in bad))
        raise OptimizationError(
            f"the {what} of objective {', '.join(repr(n) for n in names)} became NaN or inf at "
            f"step {step}; stopped (a lower lr, or a model that is finite on its inputs, helps)"
        )
