"""Small per-channel statistics of one layer's activation, computed with tensor ops.

The explorer's channel panel, its layer summary and the HTML report all read their
numbers from here, so a "dead channel" means the same thing everywhere: a channel with no
positive activation for the image(s) at hand.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

STAT_NAMES = ("mean", "std", "min", "max", "frac_positive", "frac_zero")


def _as_maps(act: Any) -> torch.Tensor:
    """``(N, C, L)`` float view of a ``(C, H, W)``, ``(N, C, H, W)`` or ``(N, C)`` activation."""
    if not isinstance(act, torch.Tensor):
        raise TypeError(f"act must be a torch.Tensor; got {type(act).__name__}")
    x = act.detach().float()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() == 2:  # (N, C): one value per channel
        return x.unsqueeze(-1)
    if x.dim() != 4:
        raise ValueError(f"act must be (C, H, W), (N, C, H, W) or (N, C); got {tuple(x.shape)}")
    return x.flatten(2)


@torch.no_grad()
def channel_stats(act: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel ``[C]`` tensors: mean, std (population), min, max, fraction of positive
    and of exactly-zero values, taken over the batch and all spatial positions."""
    maps = _as_maps(act).transpose(0, 1).flatten(1)  # (C, N*L)
    return {
        "mean": maps.mean(1),
        "std": maps.std(1, correction=0),
        "min": maps.amin(1),
        "max": maps.amax(1),
        "frac_positive": (maps > 0).float().mean(1),
        "frac_zero": (maps == 0).float().mean(1),
    }


@torch.no_grad()
def layer_summary(act: torch.Tensor) -> dict[str, Any]:
    """One layer's health in plain Python values: channel count, fraction of zero
    activations, dead channels (never positive) and the overall mean/max."""
    maps = _as_maps(act)
    stats = channel_stats(act)
    dead = torch.nonzero(stats["max"] <= 0).flatten().tolist()
    return {
        "channels": int(maps.shape[1]),
        "frac_zero": float((maps == 0).float().mean()),
        "frac_positive": float((maps > 0).float().mean()),
        "mean": float(maps.mean()),
        "max": float(maps.amax()),
        "dead_channels": dead,
        "dead_count": len(dead),
    }


@torch.no_grad()
def channel_order(act: torch.Tensor, by: Literal["mean", "max"] | None = None) -> list[int]:
    """Channel indices, strongest first by spatial ``mean`` or ``max`` (averaged over the
    batch; ties keep index order), or plain index order for ``None``."""
    maps = _as_maps(act)
    if by is None:
        return list(range(maps.shape[1]))
    if by not in ("mean", "max"):
        raise ValueError(f"by must be None, 'mean' or 'max'; got {by!r}")
    per_sample = maps.mean(-1) if by == "mean" else maps.amax(-1)
    return torch.argsort(per_sample.mean(0), descending=True, stable=True).tolist()


def as_floats(stats: dict[str, torch.Tensor], index: int) -> dict[str, float]:
    """The statistics of one channel as plain floats (JSON-ready)."""
    return {name: float(value[index]) for name, value in stats.items()}
