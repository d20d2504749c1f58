"""to_pil rounds a [0, 1] CHW tensor to 8-bit RGB."""

from __future__ import annotations

import numpy as np
import torch

from convscope.render.convert import to_pil


def test_to_pil_rounds_and_clips():
    chw = torch.tensor([[[0.0, 1.0]], [[0.5, 1.5]], [[-0.2, 0.2]]])
    image = to_pil(chw)
    assert image.mode == "RGB" and image.size == (2, 1)
    np.testing.assert_array_equal(np.asarray(image), [[[0, 128, 0], [255, 255, 51]]])
