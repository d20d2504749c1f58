"""cam() on transformer and channels-last layers: maps read through convscope.spatial.

Grad-CAM on a ViT block must equal pytorch-grad-cam given the matching reshape_transform;
the default layer of a ViT is its last ``norm1`` (never the patch-embedding conv); layers
with no spatial reading are refused with a clear error.
"""

from __future__ import annotations

import pytest
import torch

from convscope import cam
from convscope.methods.cam import default_layer
from convscope.methods.targets import LayerOutputError

timm = pytest.importorskip("timm")


def _vit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2,
                             **kwargs).eval()


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).double())[0, 1])


@pytest.mark.parametrize(("kwargs", "prefix"), [({}, 1), ({"reg_tokens": 4}, 5)])
def test_gradcam_on_a_vit_block_agrees_with_pytorch_grad_cam(kwargs, prefix):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = _vit(**kwargs)
    x = torch.randn(2, 3, 64, 64)
    ours = cam(model, x, layer="blocks.1.norm1", target=3)

    def reshape(t: torch.Tensor) -> torch.Tensor:
        return t[:, prefix:, :].reshape(t.size(0), 4, 4, t.size(2)).permute(0, 3, 1, 2)

    with GradCAM(model=model, target_layers=[model.blocks[1].norm1],
                 reshape_transform=reshape) as reference:
        theirs = torch.from_numpy(reference(x, targets=[ClassifierOutputTarget(3)] * 2))
    for i in range(2):
        assert ours[i].std() > 0
        assert _pearson(ours[i], theirs[i]) >= 0.999


def test_default_layer_of_a_vit_is_the_last_norm1_not_the_patch_embedding():
    model = _vit()
    x = torch.randn(1, 3, 64, 64)
    assert default_layer(model, x) == "blocks.1.norm1"
    avg = _vit(global_pool="avg", class_token=False)  # every patch token reaches the head
    assert default_layer(avg, x) == "norm"


@pytest.mark.parametrize("method", ["gradcam", "scorecam", "ablationcam", "eigencam"])
def test_every_method_runs_on_tokens_and_channels_last(method):
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64,
                             window_size=2, depths=(1, 1, 1, 1)).eval()
    vit = _vit()
    x = torch.randn(1, 3, 64, 64)
    for model, layer, grid in ((vit, "blocks.1.norm1", 4), (swin, "layers.2", 4)):
        maps, raw = cam(model, x, layer=layer, method=method, target=1, return_raw=True,
                        batch_size=64)
        assert maps.shape == (1, 64, 64) and raw.shape == (1, grid, grid)
        assert torch.isfinite(maps).all()


def test_ablation_on_tokens_zeroes_exactly_one_patch_channel():
    """Ablation-CAM weights by hand: zero one channel of the patch tokens only."""
    model = _vit()
    x = torch.randn(1, 3, 64, 64)
    layer = model.blocks[1].norm1
    _, raw = cam(model, x, layer="blocks.1.norm1", method="ablationcam", target=2,
                 return_raw=True, batch_size=256)
    kept = {}

    def keep(_m, _i, out):
        kept["out"] = out.detach().clone()

    def ablate(channel):
        def hook(_m, _i, out):
            out = out.clone()
            out[:, 1:, channel] = 0
            return out
        return hook

    with torch.no_grad():
        handle = layer.register_forward_hook(keep)
        base = model(x)[0, 2]
        handle.remove()
        maps = kept["out"][:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        scores = []
        for channel in range(maps.shape[1]):
            handle = layer.register_forward_hook(ablate(channel))
            scores.append(model(x)[0, 2])
            handle.remove()
    weights = (base - torch.stack(scores)) / base
    expected = torch.relu((weights[:, None, None] * maps[0]).sum(0))
    torch.testing.assert_close(raw[0], expected, rtol=1e-4, atol=1e-5)


def test_layers_without_a_spatial_reading_are_refused():
    model = _vit()
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(LayerOutputError, match="head"):
        cam(model, x, layer="head")
    with pytest.raises(LayerOutputError, match=r"blocks\.1\.attn\.qkv|no spatial|not an"):
        cam(model, x, layer="blocks.1.attn.q_norm")
