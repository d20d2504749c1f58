"""An atlas of transformer and channels-last layers reads them through convscope.spatial:
the statistics and top-k equal a brute-force pass over acts.maps()."""

from __future__ import annotations

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")


def test_vit_and_swin_layers_equal_brute_force_over_maps():
    from convscope import atlas as atlas_module
    from convscope import capture, load_model

    torch.manual_seed(0)
    vit = load_model("timm:vit_tiny_patch16_224", model_kwargs={"img_size": 32, "depth": 1})
    swin = load_model("timm:swin_tiny_patch4_window7_224",
                      model_kwargs={"img_size": 32, "window_size": 2, "depths": (1, 1, 1, 1)})
    images = torch.rand(7, 3, 32, 32)
    data = torch.utils.data.TensorDataset(images)
    for loaded, layer, grid in ((vit, "blocks.0", (2, 2)), (swin, "layers.1", (4, 4))):
        built = atlas_module.build(loaded, data, [layer], topk=3, batch_size=3,
                                   fused="eager", crops=False, html=False)
        with torch.no_grad(), capture(loaded.module, layer) as acts:
            loaded.module(images)  # a dataset of tensors is model-ready: used as it is
        maps = acts.maps(layer)
        assert maps.shape[-2:] == grid
        assert built.meta["layers"][layer]["shape"] == [maps.shape[1], *grid]
        flat = maps.flatten(2)
        np.testing.assert_allclose(built.stats(layer)["mean"], flat.mean((0, 2)).numpy(),
                                   rtol=1e-4, atol=1e-5)
        index, value, _ = built.topk(layer)
        best = flat.amax(2)  # (N, C): each image's spatial max per channel
        expected = torch.topk(best.T, 3, dim=1)
        np.testing.assert_allclose(value, expected.values.numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(index, expected.indices.numpy())
