"""Read convolution filters from a model (the weight its forward uses) or a ``state_dict``
(the seed tutorial's way)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils.parametrize import ParametrizationList

from .errors import NotAConvLayerError, UnknownLayerError


def conv_layer_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the layers whose weight is a 4D conv kernel, in state_dict order."""
    return [key[: -len(".weight")] for key, value in state.items()
            if key.endswith(".weight") and value.dim() == 4]


def _module_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight ``module``'s forward uses: for a parametrized conv (weight norm,
    spectral norm, ``torch.nn.utils.parametrize``) the computed one, which its state_dict
    does not hold under ``weight``."""
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def _module_conv_names(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` whose effective weight is a 4D conv kernel."""
    names = []
    with torch.no_grad():  # parametrized weights are computed here
        for name, module in model.named_modules():
            if isinstance(module, ParametrizationList):
                continue
            weight = _module_weight(module)
            if weight is not None and weight.dim() == 4:
                names.append(name)
    return names


def conv_filters(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], layer: str
                 ) -> torch.Tensor:
    """The ``(out, in, kh, kw)`` kernel of conv layer ``layer`` as a float CPU copy.

    ``layer`` is the dotted name with or without ``.weight`` (``"features.0"`` or
    ``"features.0.weight"``), as in ``vgg.state_dict()['features.0.weight']``. Given a
    model, the kernel is the one its forward uses (equal to the state_dict entry for a
    plain conv; the computed weight of a parametrized one, e.g. weight norm, whose
    state_dict holds only the parts).
    """
    if isinstance(model_or_state_dict, nn.Module):
        return _filters_of_module(model_or_state_dict, layer)
    if not isinstance(model_or_state_dict, Mapping):
        raise TypeError(
            "conv_filters takes a model or a state_dict; "
            f"got {type(model_or_state_dict).__name__}"
        )
    state = model_or_state_dict
    name = layer[: -len(".weight")] if layer.endswith(".weight") else layer
    key = f"{name}.weight"
    convs = conv_layer_names(state)
    if key not in state:
        if any(k.startswith(f"{name}.") for k in state):
            raise NotAConvLayerError(
                f"layer {name!r} (module) has no weight of its own; conv layers: "
                + _listing(convs)
            )
        raise UnknownLayerError(name, convs)
    weight = state[key]
    if weight.dim() != 4:
        raise NotAConvLayerError(
            f"layer {name!r} is a layer with a {weight.dim()}D weight {tuple(weight.shape)}, "
            "not a 2D convolution; conv layers: " + _listing(convs)
        )
    return weight.detach().to(device="cpu", dtype=torch.float32).clone()


def _filters_of_module(model: nn.Module, layer: str) -> torch.Tensor:
    """:func:`conv_filters` of a model: the effective weight of module ``layer``."""
    name = layer[: -len(".weight")] if layer.endswith(".weight") else layer
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise UnknownLayerError(name, _module_conv_names(model)) from None
    with torch.no_grad():  # a parametrized weight is computed here: no graph for it
        weight = _module_weight(module)
    if weight is None:
        raise NotAConvLayerError(
            f"layer {name!r} ({type(module).__name__}) has no weight of its own; conv "
            "layers: " + _listing(_module_conv_names(model))
        )
    if weight.dim() != 4:
        raise NotAConvLayerError(
            f"layer {name!r} is a {type(module).__name__} with a {weight.dim()}D weight "
            f"{tuple(weight.shape)}, not a 2D convolution; conv layers: "
            + _listing(_module_conv_names(model))
        )
    return weight.detach().to(device="cpu", dtype=torch.float32).clone()


def _listing(names: list[str]) -> str:
    return ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
