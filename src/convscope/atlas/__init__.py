"""Dataset atlas: per-channel statistics and top-k examples of layers over a dataset.

>>> from convscope.atlas import build, Atlas
>>> atlas = build("efficientnet_lite0", "photos/", ["_blocks.15", "_conv_head"], out="atlas/")
>>> index, value, location = atlas.topk("_conv_head")
>>> Atlas.load("atlas/").stats("_conv_head")["dead"].sum()

Format and the multi-node recipe: docs/atlas.md.
"""

from __future__ import annotations

from .atlas import Atlas
from .build import build
from .data import list_images
from .errors import AtlasError, AtlasExistsError, EmptyDatasetError, TopKTooLargeError
from .stats import ChannelStats

__all__ = [
    "Atlas", "AtlasError", "AtlasExistsError", "ChannelStats", "EmptyDatasetError",
    "TopKTooLargeError", "build", "list_images",
]
