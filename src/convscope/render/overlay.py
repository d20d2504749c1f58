"""Heatmap over image: the standard way to show a class activation or saliency map."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .colormap import apply_colormap


def _image_array(image: Any) -> np.ndarray:
    """HxWx3 float32 in [0, 1] from a PIL image, an HxW(x3) array or a (3|1, H, W) tensor."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu().float()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 3 and t.shape[0] in (1, 3):
            if t.shape[2] in (1, 3, 4):  # (3, H, 3) is also an H x W x C picture 3 rows tall
                raise ValueError(
                    f"image tensor of shape {tuple(t.shape)} reads both as (C, H, W) and as "
                    "(H, W, C); pass a PIL image or an H x W x 3 numpy array"
                )
            t = t.permute(1, 2, 0)
        array = t.numpy()
    elif isinstance(image, np.ndarray):
        array = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(
            np.float32)
    else:
        raise TypeError(
            "image must be a PIL image, a numpy array or a torch tensor, got "
            f"{type(image).__name__}"
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise TypeError(f"image must be HxW, HxWx3 or (3, H, W), got shape {image.shape}")
    array = array[:, :, :3]
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.clip(array, 0.0, 1.0)


def _heatmap_array(heatmap: Any, size: tuple[int, int]) -> np.ndarray:
    """HxW float32 in [0, 1], bilinearly resized to ``size`` (H, W) when needed."""
    import torch.nn.functional as F

    t = heatmap.detach().cpu().float() if isinstance(heatmap, torch.Tensor) else torch.as_tensor(
        np.asarray(heatmap, dtype=np.float32))
    while t.ndim > 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 2:
        raise TypeError(f"heatmap must be 2D (H, W), got shape {tuple(t.shape)}")
    if tuple(t.shape) != tuple(size):
        t = F.interpolate(t[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return np.clip(np.nan_to_num(t.numpy(), nan=0.0), 0.0, 1.0)


@torch.no_grad()
def overlay(image: Any, heatmap: Any, alpha: float = 0.5, cmap: str = "jet") -> Any:
    """Blend a coloured ``heatmap`` (values in [0, 1]) over ``image``; returns a PIL image.

    ``image`` is a PIL image, an HxW(x3) array (uint8 or [0, 1] floats) or a (3, H, W)
    tensor in [0, 1] (one that also reads as H x W x C, such as (3, 6, 3), is refused);
    ``heatmap`` is (H', W') and is resized (bilinear) to the image. Each pixel is
    ``(1 - alpha) * image + alpha * cmap(heatmap)``. Inputs are not modified.
    """
    from PIL import Image

    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = _image_array(image)
    heat = _heatmap_array(heatmap, base.shape[:2])
    colour = apply_colormap(heat, cmap).astype(np.float32) / 255.0
    blended = (1.0 - alpha) * base + alpha * colour
    return Image.fromarray((blended * 255.0 + 0.5).clip(0, 255).astype(np.uint8), mode="RGB")
