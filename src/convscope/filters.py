"""Read convolution filters from a model's ``state_dict`` (the seed tutorial's way)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .errors import NotAConvLayerError, UnknownLayerError


def conv_layer_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the layers whose weight is a 4D conv kernel, in state_dict order."""
    return [key[: -len(".weight")] for key, value in state.items()
            if key.endswith(".weight") and value.dim() == 4]


def conv_filters(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], layer: str
                 ) -> torch.Tensor:
    """The ``(out, in, kh, kw)`` kernel of conv layer ``layer`` as a float CPU copy.

    ``layer`` is the dotted name with or without ``.weight`` (``"features.0"`` or
    ``"features.0.weight"``), as in ``vgg.state_dict()['features.0.weight']``.
    """
    if isinstance(model_or_state_dict, nn.Module):
        state = model_or_state_dict.state_dict()
        modules = dict(model_or_state_dict.named_modules())
    elif isinstance(model_or_state_dict, Mapping):
        state, modules = model_or_state_dict, {}
    else:
        raise TypeError(
            "conv_filters takes a model or a state_dict; "
            f"got {type(model_or_state_dict).__name__}"
        )
    name = layer[: -len(".weight")] if layer.endswith(".weight") else layer
    key = f"{name}.weight"
    convs = conv_layer_names(state)
    if key not in state:
        if name in modules or any(k.startswith(f"{name}.") for k in state):
            kind = type(modules[name]).__name__ if name in modules else "module"
            raise NotAConvLayerError(
                f"layer {name!r} ({kind}) has no weight of its own; conv layers: "
                + ", ".join(convs[:8]) + (" ..." if len(convs) > 8 else "")
            )
        raise UnknownLayerError(name, convs)
    weight = state[key]
    if weight.dim() != 4:
        kind = type(modules[name]).__name__ if name in modules else "layer"
        raise NotAConvLayerError(
            f"layer {name!r} is a {kind} with a {weight.dim()}D weight {tuple(weight.shape)}, "
            "not a 2D convolution; conv layers: " + ", ".join(convs[:8])
            + (" ..." if len(convs) > 8 else "")
        )
    return weight.detach().to(device="cpu", dtype=torch.float32).clone()
