"""Random views and parameterisations: checked against plain tensor computations."""

from __future__ import annotations

import math

import pytest
import torch

from convscope.featvis import RandomView
from convscope.featvis.param import COLOR_MATRIX, make_param
from convscope.featvis.transforms import make_transform


def _gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_identity_view_returns_the_image_and_keeps_gradients():
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    out = make_transform("none")(images, _gens(2), 16)
    assert torch.equal(out, images)
    out.sum().backward()
    assert torch.equal(images.grad, torch.ones_like(images))


def test_zoom_half_is_the_central_crop_upsampled():
    torch.manual_seed(0)
    images = torch.rand(1, 3, 32, 32)
    view = RandomView(zoom=(0.5, 0.5))(images, _gens(1), 32)
    # Independent: the output's pixel centres map to the central half of the input.
    coords = (torch.arange(32) + 0.5) / 32 * 2 - 1  # output pixel centres in [-1, 1]
    src = coords * 0.5  # zoom 0.5
    pix = (src + 1) / 2 * 32 - 0.5  # input pixel coordinates
    lo = pix.floor().long()
    frac = pix - lo
    rows = images[0][:, lo] * (1 - frac)[None, :, None] + images[0][:, lo + 1] * frac[None, :, None]
    expected = rows[:, :, lo] * (1 - frac) + rows[:, :, lo + 1] * frac
    torch.testing.assert_close(view[0], expected, rtol=1e-5, atol=1e-5)


def test_padding_shows_grey_and_views_differ_per_image():
    images = torch.zeros(2, 3, 16, 16)
    view = RandomView(zoom=(2.0, 2.0))(images, _gens(2), 16)
    assert view[0, :, 0, 0].tolist() == pytest.approx([0.5] * 3)  # outside: grey
    assert view[0, :, 8, 8].tolist() == pytest.approx([0.0] * 3)  # centre: the image
    jitter = RandomView(jitter=0.2, rotate=20)
    ramp = torch.linspace(0, 1, 16).repeat(2, 3, 16, 1)
    out = jitter(ramp, _gens(2), 16)
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(jitter(ramp, _gens(2), 16), out)  # same generators, same view


def test_fourier_pixel_and_maco_images_are_valid_and_seeded():
    for kind in ("fft", "pixel", "maco"):
        param = make_param(kind, 24, _gens(2), torch.device("cpu"))
        image = param()
        assert image.shape == (2, 3, 24, 24)
        assert float(image.detach().min()) > 0 and float(image.detach().max()) < 1
        again = make_param(kind, 24, _gens(2), torch.device("cpu"))()
        assert torch.equal(image, again)
        image.sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in param.params)
    # fft: decorrelated colour of an irfft2 of the scaled spectrum, then a sigmoid.
    param = make_param("fft", 8, _gens(1), torch.device("cpu"))
    spectrum = torch.view_as_complex(param.spectrum.detach())
    fy = torch.fft.fftfreq(8)[:, None]
    fx = torch.fft.rfftfreq(8)[None, :]
    scale = 1 / torch.sqrt(fx**2 + fy**2).clamp_min(1 / 8)
    plain = torch.fft.irfft2(spectrum * scale, s=(8, 8), norm="ortho") / 4
    expected = torch.sigmoid(torch.einsum("nchw,dc->ndhw", plain, COLOR_MATRIX))
    torch.testing.assert_close(param().detach(), expected)
    # maco: the magnitude is fixed; only the phase is a parameter.
    maco = make_param("maco", 8, _gens(1), torch.device("cpu"))
    assert [p.shape for p in maco.params] == [(1, 3, 8, 5)]
    assert math.isclose(float(maco.magnitude[0, 1]), 8.0)


def test_unknown_names_suggest():
    from convscope.featvis import ObjectiveError

    with pytest.raises(ObjectiveError, match="did you mean 'standard'"):
        make_transform("standrd")
    with pytest.raises(ObjectiveError, match="did you mean 'fft'"):
        make_param("fftt", 8, _gens(1), torch.device("cpu"))
