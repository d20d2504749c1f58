"""Colour maps as 256-entry lookup tables, so colouring an image is one indexing op."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..errors import UnknownNameError


class UnknownColormapError(UnknownNameError):
    """A colour map name that matplotlib does not know."""

    kind = "colour map"
    hint = "any matplotlib colormap name works, e.g. viridis, magma, gray, jet, RdBu_r"


@lru_cache(maxsize=64)
def _lut(name: str) -> np.ndarray:
    import matplotlib

    try:
        colormap = matplotlib.colormaps[name]
    except KeyError:
        raise UnknownColormapError(name, list(matplotlib.colormaps)) from None
    rgba = colormap(np.linspace(0.0, 1.0, 256))
    lut = (rgba[:, :3] * 255.0 + 0.5).astype(np.uint8)
    lut.setflags(write=False)
    return lut


def colormap_lut(name: str) -> np.ndarray:
    """``(256, 3)`` uint8 RGB table of a matplotlib colour map (read-only, cached)."""
    if name in ("gray", "grey"):
        name = "gray"
    return _lut(name)


def quantize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped; NaN -> 0) to uint8 indices 0..255."""
    scaled = np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=0.0) * 255.0 + 0.5
    return np.clip(scaled, 0, 255).astype(np.uint8)


def apply_colormap(values: np.ndarray, name: str = "viridis") -> np.ndarray:
    """Colour an array of values in [0, 1] (any shape) -> ``shape + (3,)`` uint8 RGB."""
    indices = values if values.dtype == np.uint8 else quantize(np.asarray(values, dtype=np.float32))
    return colormap_lut(name)[indices]
