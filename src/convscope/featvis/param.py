"""Image parameterisations: what the optimiser changes, and how it becomes an RGB image.

Every parameterisation returns ``(N, 3, H, W)`` in [0, 1] (display space) and starts each
image from its own random generator, so an image does not depend on which other images
share its batch.

- ``fourier``: the image's spectrum, scaled by ``1/f`` so that every frequency learns at
  the speed natural images need, with decorrelated colour (Olah et al. 2017, Lucid).
- ``maco``: only the Fourier *phase* is optimised; the magnitude is a fixed natural-image
  ``1/f`` spectrum, so the result keeps natural image statistics (Fel et al. 2023, MACO).
- ``pixel``: plain pixels with decorrelated colour, the baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: Square root of the colour covariance of natural images (ImageNet), as in Lucid: maps
#: decorrelated channels to RGB, normalised so the largest column has norm 1.
_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02],
                            [0.27, 0.00, -0.05],
                            [0.27, -0.09, 0.03]])
COLOR_MATRIX = _COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()

PARAMS = ("fft", "maco", "pixel")


def _decorrelate(image: torch.Tensor) -> torch.Tensor:
    """Mix decorrelated channels into RGB with the natural colour correlations."""
    matrix = COLOR_MATRIX.to(device=image.device, dtype=image.dtype)
    return torch.einsum("nchw,dc->ndhw", image, matrix)


def _frequencies(height: int, width: int) -> torch.Tensor:
    """``(H, W//2+1)`` radial frequencies of a real 2-D FFT."""
    fy = torch.fft.fftfreq(height)[:, None]
    fx = torch.fft.rfftfreq(width)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


def _randn(shape: Sequence[int], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One normal draw per image, each from that image's own generator (on the CPU, so a
    seed gives the same start on every device)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])


class ImageParam:
    """Base: ``params`` to optimise and ``__call__() -> (N, 3, H, W)`` in [0, 1]."""

    #: Adam learning rate that works for this parameterisation at the default steps.
    default_lr = 0.05
    params: list[torch.Tensor]

    def __call__(self) -> torch.Tensor:
        raise NotImplementedError


class FourierParam(ImageParam):
    """Spectrum-scaled Fourier coefficients with decorrelated colour (Lucid's ``fft``)."""

    default_lr = 0.05

    def __init__(self, size: int, generators: Sequence[torch.Generator], device: torch.device,
                 decay_power: float = 1.0, sd: float = 0.01):
        self.size = size
        freqs = _frequencies(size, size)
        self.scale = (1.0 / freqs.clamp_min(1.0 / size) ** decay_power).to(device)
        spectrum = _randn((3, size, size // 2 + 1, 2), generators) * sd
        self.spectrum = spectrum.to(device).requires_grad_(True)
        self.params = [self.spectrum]

    def __call__(self) -> torch.Tensor:
        coefficients = torch.view_as_complex(self.spectrum) * self.scale
        image = torch.fft.irfft2(coefficients, s=(self.size, self.size), norm="ortho")
        # Lucid's constant: keeps the initial image away from saturation.
        return torch.sigmoid(_decorrelate(image / 4.0))


class MacoParam(ImageParam):
    """Phase-only Fourier image with a fixed ``1/f`` magnitude (MACO, Fel et al. 2023).

    The magnitude stays that of natural images, so optimisation can only move structure
    around, not add the high-frequency noise that fools one network but no other. The
    image is standardised before the sigmoid, which fixes its contrast.
    """

    default_lr = 0.2

    def __init__(self, size: int, generators: Sequence[torch.Generator], device: torch.device,
                 decay_power: float = 1.0, contrast: float = 1.5):
        self.size = size
        self.contrast = contrast
        freqs = _frequencies(size, size)
        magnitude = 1.0 / freqs.clamp_min(1.0 / size) ** decay_power
        magnitude[0, 0] = 0.0  # the mean is set by the standardisation
        self.magnitude = magnitude.to(device)
        phase = _randn((3, size, size // 2 + 1), generators) * math.pi
        self.phase = phase.to(device).requires_grad_(True)
        self.params = [self.phase]

    def __call__(self) -> torch.Tensor:
        coefficients = torch.polar(self.magnitude.expand_as(self.phase), self.phase)
        image = torch.fft.irfft2(coefficients, s=(self.size, self.size), norm="ortho")
        flat = image.flatten(1)
        image = ((flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-6)
                 ).view_as(image)
        return torch.sigmoid(self.contrast * _decorrelate(image))


class PixelParam(ImageParam):
    """Plain pixels (decorrelated colour, sigmoid): the baseline parameterisation."""

    default_lr = 0.05

    def __init__(self, size: int, generators: Sequence[torch.Generator], device: torch.device,
                 sd: float = 0.01):
        self.pixels = (_randn((3, size, size), generators) * sd).to(device).requires_grad_(True)
        self.params = [self.pixels]

    def __call__(self) -> torch.Tensor:
        return torch.sigmoid(_decorrelate(self.pixels))


def make_param(kind: str, size: int, generators: Sequence[torch.Generator],
               device: torch.device) -> ImageParam:
    """The parameterisation called ``kind`` for ``len(generators)`` images."""
    from .objectives import ObjectiveError

    if kind == "fft":
        return FourierParam(size, generators, device)
    if kind == "maco":
        return MacoParam(size, generators, device)
    if kind == "pixel":
        return PixelParam(size, generators, device)
    from ..errors import close_matches

    near = close_matches(kind, PARAMS)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise ObjectiveError(f"unknown parameterisation {kind!r}{hint} (choose from {', '.join(PARAMS)})")
