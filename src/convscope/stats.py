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


def _per_channel(act: Any) -> torch.Tensor:
    """``(C, M)``: every value of each channel (batch and positions pooled), a view when
    the batch has one sample."""
    maps = _as_maps(act)
    if maps.shape[0] == 1:
        return maps[0]
    return maps.transpose(0, 1).reshape(maps.shape[1], -1)


@torch.no_grad()
def channel_stats(act: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel ``[C]`` tensors: mean, std (population), min, max, fraction of positive
    and of exactly-zero values, taken over the batch and all spatial positions."""
    maps = _per_channel(act)
    count = maps.shape[1]
    std, mean = torch.std_mean(maps, dim=1, correction=0)
    low, high = torch.aminmax(maps, dim=1)
    return {
        "mean": mean,
        "std": std,
        "min": low,
        "max": high,
        "frac_positive": torch.count_nonzero(maps > 0, dim=1) / count,
        "frac_zero": (count - torch.count_nonzero(maps, dim=1)) / count,
    }


@torch.no_grad()
def layer_summary(act: torch.Tensor) -> dict[str, Any]:
    """One layer's health in plain Python values: channel count, fraction of zero
    activations, dead channels (never positive) and the overall mean/max."""
    maps = _per_channel(act)
    total = maps.numel()
    high = maps.amax(1)
    dead = torch.nonzero(high <= 0).flatten().tolist()
    return {
        "channels": int(maps.shape[0]),
        "frac_zero": float(total - int(torch.count_nonzero(maps))) / total,
        "frac_positive": int(torch.count_nonzero(maps > 0)) / total,
        "mean": float(maps.mean()),
        "max": float(high.max()),
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
