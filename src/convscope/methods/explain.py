"""Class activation maps as a result object that knows what it explains.

:func:`~convscope.cam` returns bare ``(N, H, W)`` maps, which is what code wants. People in
a notebook want to see the maps over the image, with the class, its probability, the layer
and the method that made them: :func:`explain` computes the same maps (it calls
:func:`~convscope.cam`) and returns an :class:`Explanation` that displays itself
(``_repr_html_``, ``_repr_png_``), draws overlays and saves them.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConvscopeError
from .common import check_input, normalize
from .targets import unwrap_model


@dataclass(frozen=True)
class Explanation:
    """Class activation maps with what they explain.

    ``maps[i]`` (``(H, W)`` in [0, 1], at the input's size) shows where ``images[i]``
    (display space, ``(3, H, W)`` in [0, 1]) drove class ``targets[i]`` (``labels[i]``,
    softmax probability ``probabilities[i]``), read at ``layer`` with ``method``.
    """

    maps: torch.Tensor
    images: torch.Tensor
    targets: list[int]
    labels: list[str]
    probabilities: list[float]
    layer: str
    method: str

    def __len__(self) -> int:
        return int(self.maps.shape[0])

    def overlay(self, index: int = 0, alpha: float = 0.5, cmap: str = "jet") -> Any:
        """Map ``index`` over its image, as a PIL image."""
        from ..render.overlay import overlay

        return overlay(self.images[index], self.maps[index], alpha=alpha, cmap=cmap)

    def caption(self, index: int) -> str:
        """``"Egyptian cat (71.3%)"``: the class a map explains and its probability."""
        return f"{self.labels[index]} ({100 * self.probabilities[index]:.1f}%)"

    def save(self, folder: str | Path, alpha: float = 0.5) -> list[Path]:
        """Write one overlay PNG per map into ``folder``; returns the paths."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for i in range(len(self)):
            path = out / f"{i:02d}_{self.method}_{self.targets[i]}.png"
            self.overlay(i, alpha).save(path)
            paths.append(path)
        return paths

    def _repr_png_(self) -> bytes:
        """All overlays side by side (what a notebook shows when HTML is off)."""
        from PIL import Image

        tiles = [self.overlay(i) for i in range(len(self))]
        strip = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)))
        x = 0
        for tile in tiles:
            strip.paste(tile, (x, 0))
            x += tile.width
        buffer = io.BytesIO()
        strip.save(buffer, format="PNG")
        return buffer.getvalue()

    def _repr_html_(self) -> str:
        figures = []
        for i in range(len(self)):
            buffer = io.BytesIO()
            self.overlay(i).save(buffer, format="PNG")
            data = base64.b64encode(buffer.getvalue()).decode("ascii")
            alt = html.escape(f"{self.method} map for {self.labels[i]}")
            figures.append(
                '<figure style="margin:0 8px 8px 0;display:inline-block;text-align:center">'
                f'<img src="data:image/png;base64,{data}" alt="{alt}" '
                'style="width:224px;image-rendering:auto"/>'
                f"<figcaption>{html.escape(self.caption(i))}</figcaption></figure>"
            )
        title = html.escape(f"{self.method} at {self.layer}")
        return (f'<div class="convscope-explanation"><div><b>{title}</b></div>'
                + "".join(figures) + "</div>")

    def __repr__(self) -> str:
        parts = ", ".join(self.caption(i) for i in range(len(self)))
        return f"Explanation({self.method} at {self.layer!r}: {parts})"


def explain(
    model: Any,
    image: Any,
    *,
    target: int | str | Sequence[int | str] | None = None,
    topk: int = 1,
    method: str = "gradcam",
    layer: Any = None,
    **cam_options: Any,
) -> Explanation:
    """Class activation maps of ``image`` as an :class:`Explanation`.

    >>> convscope.explain(loaded, "sample:chelsea", topk=3)       # the top-3 classes
    >>> convscope.explain(loaded, "photo.jpg", target="tiger cat", method="scorecam")

    ``model`` is a :class:`~convscope.models.LoadedModel` (``image``: anything
    :func:`~convscope.load_image` takes, or a list of them) or an ``nn.Module`` (``image``:
    a preprocessed ``(N, C, H, W)`` tensor, shown min-max scaled per image since the
    normalisation is unknown). ``target``: None explains each image's top-``topk`` classes
    (``topk > 1`` needs one image); an int or name explains that class; a list gives one
    per image. ``method``, ``layer`` and ``cam_options`` go to :func:`~convscope.cam`
    unchanged, so the maps are exactly ``cam``'s.
    """
    from .cam import _one_layer, cam, method_name

    kind = method_name(method)
    if kind == "guided_gradcam":
        raise ConvscopeError(
            "explain() draws class activation maps over the image; guided_gradcam is a "
            "pixel attribution: use convscope.cam(..., method='guided_gradcam')"
        )
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    module, _names = unwrap_model(model)
    loaded = model if not isinstance(model, nn.Module) else None
    if loaded is not None and not isinstance(image, torch.Tensor):
        x = loaded.preprocess(image)
    else:
        x = check_input(image, module)
    if loaded is not None:
        display = loaded.transform.to_display(x.detach().cpu().float())
    else:
        display = _min_max(x.detach().cpu().float())

    from ..hooks import preserve_training
    from ..models import logits_of

    with torch.no_grad(), preserve_training(module):  # every module's own flag comes back
        module.eval()
        probabilities = torch.softmax(logits_of(module(x)).float(), dim=1).cpu()

    n = x.shape[0]
    if target is None:
        if topk > 1 and n > 1:
            raise ValueError("topk > 1 explains several classes of one image; pass one image")
        if topk > 1:
            classes = probabilities[0].topk(min(topk, probabilities.shape[1])).indices.tolist()
            rows = [0] * len(classes)
        else:
            classes = probabilities.argmax(dim=1).tolist()
            rows = list(range(n))
    else:
        wanted = list(target) if isinstance(target, (list, tuple)) else [target] * n
        if len(wanted) != n:
            raise ValueError(f"{len(wanted)} targets for {n} images; give one per image")
        classes = [_class_index(model, t) for t in wanted]
        rows = list(range(n))

    batch = x[rows]
    name, _ = _one_layer(module, layer, batch)
    maps = cam(model, batch, layer=name, target=classes, method=kind, **cam_options)
    labels = [_label(model, c) for c in classes]
    return Explanation(
        maps=maps.detach().cpu(),
        images=display[rows],
        targets=[int(c) for c in classes],
        labels=labels,
        probabilities=[float(probabilities[r, c]) for r, c in zip(rows, classes, strict=True)],
        layer=name,
        method=kind,
    )


def _min_max(x: torch.Tensor) -> torch.Tensor:
    """Each image scaled to [0, 1] by :func:`~convscope.methods.common.normalize` (a constant
    image is black); 1-channel images as RGB, other channel counts by their first channel."""
    scaled = normalize(x)
    if scaled.shape[1] != 3:
        scaled = scaled[:, :1].expand(-1, 3, -1, -1)
    return scaled


def _class_index(model: Any, target: int | str) -> int:
    if isinstance(model, nn.Module):
        if isinstance(target, str) and not target.isdigit():
            raise ConvscopeError(
                f"class {target!r} given by name, but a bare nn.Module has no class names; "
                "pass an index or a LoadedModel"
            )
        return int(target)
    return model.class_index(target)


def _label(model: Any, index: int) -> str:
    return model.label(index) if not isinstance(model, nn.Module) else f"class {index}"
