"""Load images from paths, bytes, arrays or bundled samples, safely and as RGB.

Untrusted images are bounded: the pixel count is checked from the header, before the
pixels are decoded, so a decompression bomb never reaches memory.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError, ImageTooLargeError, UnknownSampleError

#: Default limit on width x height (about 8000 x 8000, above any camera photo we expect).
DEFAULT_MAX_PIXELS = 64_000_000

#: Bundled photos from scikit-image, usable as ``"sample:NAME"``.
SAMPLES = ("chelsea", "coffee", "rocket", "astronaut")

ImageSource = str | os.PathLike | bytes | Image.Image | np.ndarray | Any


def sample_names() -> list[str]:
    """Names accepted after ``sample:``."""
    return list(SAMPLES)


def _sample_array(name: str) -> np.ndarray:
    if name not in SAMPLES:
        raise UnknownSampleError(name, SAMPLES)
    from skimage import data

    return getattr(data, name)()


def load_image(source: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Return ``source`` as an RGB ``PIL.Image``.

    ``source`` may be a file path, ``"sample:chelsea"`` (also ``coffee``, ``rocket``,
    ``astronaut``), raw encoded bytes, a PIL image, a numpy array (``HxW``, ``HxWx3``,
    ``HxWx4``; uint8, uint16 or float in [0, 1]) or a ``(C,H,W)`` tensor in [0, 1].
    EXIF orientation is applied; grayscale, palette, CMYK, RGBA (composited on white) and
    16-bit images become 8-bit RGB. Images over ``max_pixels`` raise
    :class:`~convscope.errors.ImageTooLargeError` before decoding.
    """
    if isinstance(source, Image.Image):
        _check_size(source.size, max_pixels, "image")
        return _to_rgb(source)
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    if _is_tensor(source):
        array = source.detach().cpu().numpy()
        if array.ndim == 3 and array.shape[0] in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)
        return _from_array(array, max_pixels)
    if isinstance(source, (bytes, bytearray)):
        return _decode(io.BytesIO(bytes(source)), "uploaded bytes", max_pixels)
    if isinstance(source, str) and source.startswith("sample:"):
        return _from_array(_sample_array(source.split(":", 1)[1]), max_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"no such image file: {path}")
        if path.is_dir():
            raise ImageError(f"{path} is a folder, not an image file")
        with path.open("rb") as handle:
            return _decode(handle, str(path), max_pixels)
    raise TypeError(
        "load_image takes a path, 'sample:NAME', bytes, a PIL image, a numpy array or a "
        f"tensor; got {type(source).__name__}"
    )


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _check_size(size: tuple[int, int], max_pixels: int | None, what: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"{what} has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"{what} is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,}; downscale it or raise max_pixels"
        )


def _decode(handle: Any, what: str, max_pixels: int | None) -> Image.Image:
    try:
        with Image.open(handle) as image:
            _check_size(image.size, max_pixels, what)
            image.load()  # decode now, inside the try, so truncated files fail here
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except UnidentifiedImageError as error:
        raise ImageError(f"{what} is not a readable image (unknown or unsupported format)"
                         ) from error
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(f"{what} is not a safe image to decode ({error})") from error
    except (OSError, SyntaxError, ValueError) as error:
        if isinstance(error, ImageError):
            raise
        raise ImageError(f"{what} could not be decoded: {error}") from error


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image.copy()
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        return _from_array(_rescale(array), None)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _rescale(array: np.ndarray) -> np.ndarray:
    """Map a high-bit-depth array to uint8 by its value range (16-bit scans, float maps)."""
    if array.dtype == np.uint16 or array.max(initial=0) > 255:
        return (array / 65535.0 * 255.0).clip(0, 255).astype(np.uint8)
    return array.clip(0, 255).astype(np.uint8)


def _from_array(array: np.ndarray, max_pixels: int | None) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageError(f"an image array must be HxW, HxWx3 or HxWx4; got shape {array.shape}")
    _check_size((array.shape[1], array.shape[0]), max_pixels, "image array")
    if array.dtype == np.uint8:
        data = array
    elif array.dtype == np.uint16:
        data = (array.astype(np.float64) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError("image array contains NaN or infinite values")
        data = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif array.dtype == bool:
        data = array.astype(np.uint8) * 255
    else:
        data = np.clip(array, 0, 255).astype(np.uint8)
    return _to_rgb(Image.fromarray(np.ascontiguousarray(data)))
