"""convscope: see what a convolutional neural network has learned.

The public API is re-exported here lazily, so ``import convscope`` stays quick and the
CLI's ``--help`` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("convscope")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # capture and layers
    "capture": "convscope.hooks",
    "Activations": "convscope.hooks",
    "LayerActivations": "convscope.hooks",
    "list_layers": "convscope.layers",
    "resolve_layers": "convscope.layers",
    "LayerInfo": "convscope.layers",
    "ReceptiveField": "convscope.layers",
    # filters and rendering
    "conv_filters": "convscope.filters",
    "feature_grid": "convscope.render.grid",
    "filter_grid": "convscope.render.grid",
    "overlay": "convscope.render.overlay",
    # models and images
    "load_model": "convscope.models",
    "LoadedModel": "convscope.models",
    "load_image": "convscope.images",
    # attribution
    "cam": "convscope.methods.cam",
    "guided_gradcam": "convscope.methods.cam",
    "saliency": "convscope.methods.gradients",
    "sanity_check": "convscope.methods.sanity",
    "ClassTarget": "convscope.methods.targets",
    "explain": "convscope.methods.explain",
    "Explanation": "convscope.methods.explain",
    # front ends
    "build_report": "convscope.report",
    "write_report": "convscope.report",
    "create_app": "convscope.server",
    # dataset atlas
    "Atlas": "convscope.atlas",
    # feature visualisation
    "visualize": "convscope.featvis",
    "Visualization": "convscope.featvis",
    "channel_summary": "convscope.featvis",
    # notebooks
    "show": "convscope.notebook",
    # errors
    "ConvscopeError": "convscope.errors",
    "UnknownLayerError": "convscope.errors",
    "InputSizeError": "convscope.layers",
    "NoSpatialMapError": "convscope.spatial",
    "GuidedBackpropError": "convscope.methods.guided",
    "CaptureIntegrityError": "convscope.hooks",
    # spatial maps of any layer (conv, channels-last, transformer tokens)
    "spatial_maps": "convscope.spatial",
    "spatial_layout": "convscope.spatial",
}
_SUBMODULES = {"plot", "atlas", "errors", "layers", "render", "methods", "models", "images", "spatial", "notebook",
               "report", "server", "stats", "featvis"}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"convscope.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'convscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES)
