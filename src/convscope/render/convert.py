"""Tensor <-> image conversion shared by the demo, the report and the server."""

from __future__ import annotations

from typing import Any

from PIL import Image


def to_pil(chw: Any) -> Image.Image:
    """A ``(3, H, W)`` tensor in [0, 1] (e.g. ``Preprocess.to_display``'s output) as an
    8-bit RGB image (rounded to nearest)."""
    array = (chw.detach().cpu().float().permute(1, 2, 0).numpy() * 255.0 + 0.5)
    return Image.fromarray(array.clip(0, 255).astype("uint8"))
