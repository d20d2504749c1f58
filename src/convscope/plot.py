"""Notebook-friendly matplotlib figures built from the same grids as the PNG output.

One ``imshow`` of the whole grid, never one subplot per channel: a 512-channel layer draws
as fast as a 1-channel one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .render.grid import feature_grid, filter_grid


def _figure(image: Any, title: str | None, figsize: tuple[float, float] | None, dpi: int) -> Any:
    from matplotlib.figure import Figure

    array = np.asarray(image)
    if figsize is None:
        height, width = array.shape[:2]
        scale = min(12.0 / max(width / dpi, 1e-6), 1.0) if width / dpi > 12 else 1.0
        figsize = (max(width / dpi * scale, 2.0), max(height / dpi * scale, 2.0) + (0.4 if title else 0))
    figure = Figure(figsize=figsize, dpi=dpi)
    axes = figure.add_axes((0, 0, 1, 0.92 if title else 1))
    axes.imshow(array, interpolation="nearest")
    axes.set_axis_off()
    if title:
        figure.suptitle(title)
    return figure


def feature_maps(act: Any, *, title: str | None = None, figsize: tuple[float, float] | None = None,
                 dpi: int = 100, **grid_options: Any) -> Any:
    """A matplotlib ``Figure`` of :func:`~convscope.render.grid.feature_grid` (same options).

    The figure is not attached to pyplot, so it displays in Jupyter as the cell's value and
    does not leak into a global figure list.
    """
    return _figure(feature_grid(act, **grid_options), title, figsize, dpi)


def filters(weights: Any, *, title: str | None = None, figsize: tuple[float, float] | None = None,
            dpi: int = 100, **grid_options: Any) -> Any:
    """A matplotlib ``Figure`` of :func:`~convscope.render.grid.filter_grid`."""
    return _figure(filter_grid(weights, **grid_options), title, figsize, dpi)
