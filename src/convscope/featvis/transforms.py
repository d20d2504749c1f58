"""Robustness transforms: a random view of each image at every step, differentiable.

A visualisation that only excites the unit from one exact pixel grid is adversarial noise;
asking it to work under small shifts, zooms and rotations makes it show the feature
(Mordvintsev et al. 2015; Olah et al. 2017). Here every image gets its own random view,
drawn from its own generator, and the whole view (padding, zoom or crop, rotation, jitter)
is one affine resampling: one ``grid_sample`` call per step, gradients intact, output at
the model's input size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Grey used outside the image (padding), in display space.
PAD_VALUE = 0.5


@dataclass(frozen=True)
class RandomView:
    """Ranges of the random view: ``zoom`` is the visible fraction of the image's side
    (below 1 a crop, above 1 padding shows around it), ``rotate`` in degrees, ``jitter`` a
    shift as a fraction of the side, ``noise`` the standard deviation of added pixel noise."""

    zoom: tuple[float, float] = (1.0, 1.0)
    rotate: float = 0.0
    jitter: float = 0.0
    noise: float = 0.0

    def __call__(self, images: torch.Tensor, generators: Sequence[torch.Generator],
                 out_size: int) -> torch.Tensor:
        """``(N, 3, out, out)`` views of ``(N, 3, H, W)`` images in [0, 1]."""
        n = images.shape[0]
        draws = torch.stack([torch.rand(5, generator=g) for g in generators])  # (N, 5) CPU
        low, high = self.zoom
        # Zoom uniformly in log scale, so crops and padding are equally likely around 1.
        zoom = torch.exp(math.log(low) + draws[:, 0] * (math.log(high) - math.log(low)))
        angle = (draws[:, 1] * 2 - 1) * math.radians(self.rotate)
        shift = (draws[:, 2:4] * 2 - 1) * self.jitter * 2  # normalised coordinates span 2
        cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
        theta = torch.stack([
            torch.stack([cos, -sin, shift[:, 0]], dim=1),
            torch.stack([sin, cos, shift[:, 1]], dim=1),
        ], dim=1).to(device=images.device, dtype=images.dtype)
        if self.is_identity and images.shape[-1] == out_size:
            views = images
        else:
            grid = F.affine_grid(theta, [n, 3, out_size, out_size], align_corners=False)
            views = F.grid_sample(images - PAD_VALUE, grid, mode="bilinear",
                                  padding_mode="zeros", align_corners=False) + PAD_VALUE
        if self.noise:
            noise = torch.stack([torch.randn(views.shape[1:], generator=g) for g in generators])
            views = views + self.noise * noise.to(device=views.device, dtype=views.dtype)
        return views

    @property
    def is_identity(self) -> bool:
        return self.zoom == (1.0, 1.0) and not self.rotate and not self.jitter


#: Named transform sets. ``standard`` is convscope's: crops down to half the side, padding,
#: rotation and jitter per image. ``lucent`` approximates Lucent's standard transforms (pad
#: 12 px, jitter 8 + 4 px, scale 0.95-1.05, rotate 5 degrees) at 224 px, for comparison.
TRANSFORMS: dict[str, RandomView] = {
    "standard": RandomView(zoom=(0.5, 1.1), rotate=10.0, jitter=0.05, noise=0.02),
    "lucent": RandomView(zoom=(1.05, 1.16), rotate=5.0, jitter=0.054),
    "none": RandomView(),
}


def make_transform(spec: str | RandomView) -> RandomView:
    """A :class:`RandomView` from a preset name or itself."""
    from ..errors import close_matches
    from .objectives import ObjectiveError

    if isinstance(spec, RandomView):
        return spec
    if isinstance(spec, str) and spec in TRANSFORMS:
        return TRANSFORMS[spec]
    near = close_matches(str(spec), TRANSFORMS)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise ObjectiveError(
        f"unknown transforms {spec!r}{hint} (choose from {', '.join(TRANSFORMS)} or pass a "
        "convscope.featvis.RandomView)"
    )
