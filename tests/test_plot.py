"""Notebook figures wrap the same grid image."""

from __future__ import annotations

import numpy as np
import torch

from convscope import plot
from convscope.render.grid import feature_grid


def test_feature_maps_figure_shows_the_grid_in_one_image():
    act = torch.randn(64, 14, 14)
    figure = plot.feature_maps(act, cmap="magma", title="features.28")
    axes = figure.axes
    assert len(axes) == 1
    shown = axes[0].images[0].get_array()
    np.testing.assert_array_equal(np.asarray(shown), np.asarray(feature_grid(act, cmap="magma")))
    assert figure._suptitle.get_text() == "features.28"
    filters = plot.filters(torch.randn(8, 3, 3, 3))
    assert len(filters.axes[0].images) == 1
