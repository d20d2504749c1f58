"""What a feature visualisation maximises: composable objectives and their string form.

An objective maps what the model computed for a group of images (the spatial maps of the
layers it reads and the logits) to one value per image, to be *maximised*. Objectives
compose like numbers (``a + b``, ``a - 0.5 * b``, ``2 * a``), as in Lucid/Lucent, so a
user can mix channels, classes, directions and a diversity term. Strings are parsed by
:func:`parse_objective`: ``"LAYER:CHANNEL"``, ``"LAYER:CHANNEL@Y,X"``, ``"LAYER:0-63"``,
``"LAYER:*"``, ``"class:285"`` and ``"class:Egyptian cat"``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConvscopeError, UnknownClassError


class ObjectiveError(ConvscopeError, ValueError):
    """An objective that cannot be used with this model (bad syntax, channel out of range)."""

    exit_code = 2


class NoSpatialReadingError(ObjectiveError):
    """A layer whose output cannot be read as ``(N, C, H, W)`` maps."""


class OptimizationError(ConvscopeError, RuntimeError):
    """The optimisation broke down (NaN or inf values) for a named objective."""

    exit_code = 1


@dataclass(frozen=True)
class ModelInfo:
    """What objectives are checked against: the ``(C, H, W)`` of each layer they read (by
    canonical dotted name), the class count and names of the model's output."""

    shapes: Mapping[str, tuple[int, int, int]]
    num_classes: int | None
    class_names: Sequence[str] | None
    canonical: Mapping[str, str] = field(default_factory=dict)  # selector -> dotted name

    def layer(self, selector: str) -> tuple[str, tuple[int, int, int]]:
        name = self.canonical.get(selector, selector)
        return name, self.shapes[name]


class Context:
    """What one group of images produced: ``maps[name]`` is ``(k, C, H, W)`` with its graph
    intact (so gradients reach the image), ``logits`` is ``(k, classes)`` or None."""

    def __init__(self, maps: Mapping[str, torch.Tensor], logits: torch.Tensor | None):
        self.maps = maps
        self.logits = logits

    def layer(self, name: str) -> torch.Tensor:
        return self.maps[name]

    def slice(self, part: slice) -> Context:
        """The context of images ``part`` of the batch."""
        logits = self.logits[part] if self.logits is not None else None
        return Context({k: v[part] for k, v in self.maps.items()}, logits)


class Objective:
    """Base class: ``objective(context) -> (k,)`` values to maximise, one per image.

    Subclasses set ``name`` and implement :meth:`__call__`; :meth:`layers` lists the layer
    selectors read, :attr:`needs_logits` says whether the model's output is read, and
    :meth:`prepare` checks the objective against the model and binds canonical names.
    """

    name: str = "objective"
    needs_logits: bool = False

    def __call__(self, ctx: Context) -> torch.Tensor:
        raise NotImplementedError

    def layers(self) -> set[str]:
        """Layer selectors this objective reads."""
        return set()

    def prepare(self, info: ModelInfo) -> Objective:
        """A checked copy bound to canonical layer names and class indices."""
        return self

    # Arithmetic builds weighted sums; scalars only.
    def __add__(self, other: Any) -> Objective:
        if isinstance(other, (int, float)) and other == 0:
            return self  # sum() starts from 0
        return Sum.of(self, 1.0, _check_objective(other), 1.0)

    __radd__ = __add__

    def __sub__(self, other: Any) -> Objective:
        return Sum.of(self, 1.0, _check_objective(other), -1.0)

    def __rsub__(self, other: Any) -> Objective:
        return Sum.of(_check_objective(other), 1.0, self, -1.0)

    def __mul__(self, weight: Any) -> Objective:
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise TypeError(f"an objective can only be scaled by a number; got {type(weight).__name__}")
        return Sum([(float(weight), self)])

    __rmul__ = __mul__

    def __truediv__(self, weight: Any) -> Objective:
        return self * (1.0 / weight)

    def __neg__(self) -> Objective:
        return self * -1.0

    def __repr__(self) -> str:
        return f"<Objective {self.name}>"

    def __str__(self) -> str:
        return self.name


def _check_objective(value: Any) -> Objective:
    if isinstance(value, Objective):
        return value
    raise TypeError(f"objectives combine with objectives and numbers; got {type(value).__name__}")


def _format_weight(weight: float) -> str:
    return f"{weight:g}"


class Sum(Objective):
    """A weighted sum of objectives: ``sum(w_i * objective_i)``."""

    def __init__(self, terms: Sequence[tuple[float, Objective]]):
        self.terms = [(float(w), _check_objective(o)) for w, o in terms]
        if not self.terms:
            raise ObjectiveError("a sum of objectives needs at least one term")
        self.needs_logits = any(o.needs_logits for _, o in self.terms)
        parts = []
        for i, (w, o) in enumerate(self.terms):
            inner = f"({o.name})" if isinstance(o, Sum) and len(o.terms) > 1 else o.name
            if w == 1.0:
                text = inner
            elif w == -1.0:
                text = f"-{inner}"
            else:
                text = f"{_format_weight(w)}*{inner}"
            if i and text.startswith("-"):
                parts.append(" - " + text[1:])
            elif i:
                parts.append(" + " + text)
            else:
                parts.append(text)
        self.name = "".join(parts)

    @classmethod
    def of(cls, a: Objective, wa: float, b: Objective, wb: float) -> Sum:
        terms: list[tuple[float, Objective]] = []
        for obj, weight in ((a, wa), (b, wb)):
            if isinstance(obj, Sum):
                terms.extend((weight * w, o) for w, o in obj.terms)
            else:
                terms.append((weight, obj))
        return cls(terms)

    def __call__(self, ctx: Context) -> torch.Tensor:
        (first_weight, first), *rest = self.terms
        total = first_weight * first(ctx)
        for weight, obj in rest:
            total = total + weight * obj(ctx)
        return total

    def layers(self) -> set[str]:
        return set().union(*(o.layers() for _, o in self.terms))

    def prepare(self, info: ModelInfo) -> Objective:
        bound = Sum([(w, o.prepare(info)) for w, o in self.terms])
        bound.name = self.name
        return bound


def _check_channel(layer: str, channel: int, channels: int) -> None:
    if not 0 <= channel < channels:
        raise ObjectiveError(
            f"channel {channel} is out of range for layer {layer!r}, which has {channels} "
            f"channels (0..{channels - 1})"
        )


class Channel(Objective):
    """Mean activation of one channel over all positions of a layer."""

    def __init__(self, layer: str, channel: int):
        self.layer, self.channel = str(layer), int(channel)
        self.name = f"{self.layer}:{self.channel}"

    def __call__(self, ctx: Context) -> torch.Tensor:
        return ctx.layer(self.layer)[:, self.channel].mean(dim=(1, 2))

    def layers(self) -> set[str]:
        return {self.layer}

    def prepare(self, info: ModelInfo) -> Objective:
        name, (channels, _, _) = info.layer(self.layer)
        _check_channel(name, self.channel, channels)
        bound = Channel(name, self.channel)
        bound.name = self.name
        return bound


class Neuron(Objective):
    """One unit: channel ``channel`` at position ``(y, x)`` of the layer's map (the centre
    when ``y``/``x`` are None)."""

    def __init__(self, layer: str, channel: int, y: int | None = None, x: int | None = None):
        self.layer, self.channel = str(layer), int(channel)
        self.y, self.x = y, x
        where = f"@{'c' if y is None else y},{'c' if x is None else x}"  # c: the centre
        self.name = f"{self.layer}:{self.channel}{where}"

    def __call__(self, ctx: Context) -> torch.Tensor:
        maps = ctx.layer(self.layer)
        y = maps.shape[2] // 2 if self.y is None else self.y
        x = maps.shape[3] // 2 if self.x is None else self.x
        return maps[:, self.channel, y, x]

    def layers(self) -> set[str]:
        return {self.layer}

    def prepare(self, info: ModelInfo) -> Objective:
        name, (channels, height, width) = info.layer(self.layer)
        _check_channel(name, self.channel, channels)
        for what, value, limit in (("row", self.y, height), ("column", self.x, width)):
            if value is not None and not 0 <= value < limit:
                raise ObjectiveError(
                    f"{what} {value} is outside layer {name!r}'s {height}x{width} map at this "
                    f"image size (0..{limit - 1})"
                )
        bound = Neuron(name, self.channel, self.y, self.x)
        bound.name = self.name
        return bound


class ClassLogit(Objective):
    """The pre-softmax score of one class, given as an index or a class name."""

    needs_logits = True

    def __init__(self, target: int | str):
        self.target = target
        self.index = target if isinstance(target, int) else None
        self.name = f"class:{target}"

    def __call__(self, ctx: Context) -> torch.Tensor:
        if ctx.logits is None or self.index is None:
            raise ObjectiveError(f"objective {self.name!r} was not prepared for a model")
        return ctx.logits[:, self.index]

    def prepare(self, info: ModelInfo) -> Objective:
        index = self.target
        if isinstance(index, str):
            text = index.strip()
            if text.lstrip("-").isdigit():
                index = int(text)
            else:
                names = list(info.class_names or [])
                if not names:
                    raise ObjectiveError(
                        f"{self.name!r} names a class, but the model has no class names; give "
                        "its index (class:285) or a LoadedModel with labels"
                    )
                lowered = [n.lower() for n in names]
                if text.lower() not in lowered:
                    raise UnknownClassError(text, names)
                index = lowered.index(text.lower())
        if info.num_classes is None:
            raise ObjectiveError(
                f"{self.name!r} needs (N, classes) logits, but the model's output is not 2-D"
            )
        if not 0 <= index < info.num_classes:
            raise ObjectiveError(
                f"class {index} is out of range: the model has {info.num_classes} classes "
                f"(0..{info.num_classes - 1})"
            )
        bound = ClassLogit(int(index))
        bound.name = self.name
        return bound


class Direction(Objective):
    """Mean over positions of the projection of a layer's activation vectors onto a unit
    ``vector`` (``C`` values): a concept that is a direction rather than one channel."""

    def __init__(self, layer: str, vector: Any, name: str | None = None):
        self.layer = str(layer)
        self.vector = torch.as_tensor(vector, dtype=torch.float32).flatten()
        norm = self.vector.norm()
        if not torch.isfinite(norm) or norm == 0:
            raise ObjectiveError("a direction vector must be finite and not all zero")
        self.unit = self.vector / norm
        self.name = name or f"{self.layer}:direction"

    def __call__(self, ctx: Context) -> torch.Tensor:
        maps = ctx.layer(self.layer)
        unit = self.unit.to(device=maps.device, dtype=maps.dtype)
        return torch.einsum("nchw,c->n", maps, unit) / (maps.shape[2] * maps.shape[3])

    def layers(self) -> set[str]:
        return {self.layer}

    def prepare(self, info: ModelInfo) -> Objective:
        name, (channels, _, _) = info.layer(self.layer)
        if self.vector.numel() != channels:
            raise ObjectiveError(
                f"the direction has {self.vector.numel()} values, layer {name!r} has "
                f"{channels} channels"
            )
        return Direction(name, self.vector, self.name)


class Diversity(Objective):
    """Keeps several images of one objective apart: for each image, minus the mean cosine
    similarity of its Gram matrix (style) at ``layer`` to those of the other images in its
    group (Olah et al. 2017). Zero for a group of one image. Add it with a weight:
    ``channel(...) + 0.1 * diversity(layer)`` and ``visualize(..., images_per_objective=4)``."""

    def __init__(self, layer: str):
        self.layer = str(layer)
        self.name = f"diversity({self.layer})"

    def __call__(self, ctx: Context) -> torch.Tensor:
        maps = ctx.layer(self.layer)
        k = maps.shape[0]
        if k < 2:
            return maps.new_zeros(k)
        flat = maps.flatten(2)
        gram = torch.bmm(flat, flat.transpose(1, 2)).flatten(1)
        gram = F.normalize(gram, dim=1)
        sims = gram @ gram.T
        off = sims.sum(dim=1) - sims.diagonal()
        return -off / (k - 1)

    def layers(self) -> set[str]:
        return {self.layer}

    def prepare(self, info: ModelInfo) -> Objective:
        name, _ = info.layer(self.layer)
        bound = Diversity(name)
        bound.name = self.name
        return bound


# --------------------------------------------------------------------------------------
# Small constructors (the public spelling).


def channel(layer: str, index: int) -> Channel:
    """Mean activation of channel ``index`` of ``layer``."""
    return Channel(layer, index)


def neuron(layer: str, index: int, y: int | None = None, x: int | None = None) -> Neuron:
    """Activation of channel ``index`` at one position (the centre by default)."""
    return Neuron(layer, index, y, x)


def class_logit(target: int | str) -> ClassLogit:
    """The logit of a class (index or name)."""
    return ClassLogit(target)


def direction(layer: str, vector: Any, name: str | None = None) -> Direction:
    """Projection of ``layer``'s activations onto ``vector``."""
    return Direction(layer, vector, name)


def diversity(layer: str) -> Diversity:
    """Diversity term over the images of one objective."""
    return Diversity(layer)


# --------------------------------------------------------------------------------------
# String form.

_UNIT = re.compile(r"^(?P<channel>-?\d+)@(?P<y>-?\d+|c)?,(?P<x>-?\d+|c)?$")


@dataclass(frozen=True)
class ParsedSpec:
    """A string objective before the model is known: a layer selector (may be a glob) and
    a channel selection, or a class."""

    text: str
    layer: str | None  # None for a class objective
    channels: str  # "*", "5", "0-63", "1,5,9", "8-" ... or the class for a class objective
    y: int | None = None
    x: int | None = None
    unit: bool = False


def parse_objective(text: str) -> ParsedSpec:
    """Split an objective string into its parts; the model checks the rest later."""
    if not isinstance(text, str):
        raise TypeError(f"an objective string is expected; got {type(text).__name__}")
    raw = text.strip()
    layer, sep, rest = raw.rpartition(":")
    if not sep or not layer or not rest.strip():
        raise ObjectiveError(
            f"cannot read objective {text!r}; write LAYER:CHANNEL, LAYER:CHANNEL@Y,X, "
            "LAYER:0-63, LAYER:*, class:INDEX or class:NAME"
        )
    if raw.lower().startswith("class:"):
        return ParsedSpec(raw, None, raw.split(":", 1)[1].strip())
    rest = rest.strip()
    if "@" in rest:
        match = _UNIT.match(rest.replace(" ", ""))
        if not match:
            raise ObjectiveError(
                f"cannot read unit objective {text!r}; write LAYER:CHANNEL@Y,X (e.g. "
                "'_blocks.5:3@7,7'; 'c' for the centre)"
            )
        y = None if match["y"] in (None, "c") else int(match["y"])
        x = None if match["x"] in (None, "c") else int(match["x"])
        return ParsedSpec(raw, layer.strip(), match["channel"], y, x, unit=True)
    if not re.fullmatch(r"\*|\d+(-\d*)?(,\d+(-\d*)?)*", rest.replace(" ", "")):
        raise ObjectiveError(
            f"cannot read the channels of {text!r}: {rest!r}; write one index (5), a range "
            "(0-63), an open range (8-), a list (1,5,9) or * for every channel"
        )
    return ParsedSpec(raw, layer.strip(), rest.replace(" ", ""))


def expand_channels(spec: str, channels: int, layer: str) -> list[int]:
    """Channel indices of a selection such as ``"*"``, ``"0-63"``, ``"1,5,9"``, ``"8-"``;
    every index is checked against the layer's ``channels``."""
    if spec == "*":
        return list(range(channels))
    picked: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            low, _, high = part.partition("-")
            stop = channels - 1 if high == "" else int(high)
            if stop < int(low):
                raise ObjectiveError(f"empty channel range {part!r} for layer {layer!r}")
            _check_channel(layer, stop, channels)
            picked.extend(range(int(low), stop + 1))
        else:
            picked.append(int(part))
    for index in picked:
        _check_channel(layer, index, channels)
    return list(dict.fromkeys(picked))
