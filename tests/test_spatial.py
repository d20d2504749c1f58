"""spatial: every layer output read as (N, C, H, W), checked against the libraries' own maps.

timm's ``forward_intermediates(..., output_fmt="NCHW")`` and Hugging Face's
``hidden_states`` are the independent references; all models are tiny and random.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from convscope.spatial import (
    NoSpatialMapError,
    model_hints,
    spatial_layout,
    spatial_maps,
)


def _outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Layer outputs through plain forward hooks (independent of convscope.capture)."""
    found: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda _m, _i, out, name=name: found.__setitem__(name, out)) for name in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return found


def _timm(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()


VITS = [
    # (model, kwargs, input H, W, prefix tokens)
    ("vit_tiny_patch16_224", {"img_size": 64, "depth": 2}, (64, 64), 1),
    ("deit_tiny_distilled_patch16_224", {"img_size": 64, "depth": 2}, (64, 64), 2),
    ("vit_tiny_patch16_224", {"img_size": 64, "depth": 2, "reg_tokens": 4}, (64, 64), 5),
    ("vit_tiny_patch16_224", {"img_size": 64, "depth": 2, "dynamic_img_size": True},
     (64, 96), 1),
]


@pytest.mark.parametrize(("name", "kwargs", "hw", "prefix"), VITS,
                         ids=["vit", "deit-distilled", "vit-reg4", "vit-nonsquare"])
def test_vit_tokens_equal_timm_forward_intermediates(name, kwargs, hw, prefix):
    model = _timm(name, **kwargs)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        reference = model.forward_intermediates(x, indices=[0, 1], output_fmt="NCHW",
                                                intermediates_only=True, norm=False)
    outputs = _outputs(model, ["blocks.0", "blocks.1", "patch_embed"], x)
    assert model_hints(model).prefix_tokens == prefix
    for index, layer in enumerate(["blocks.0", "blocks.1"]):
        out = outputs[layer]
        layout = spatial_layout(out, model=model, input_hw=hw, batch_size=2, name=layer)
        assert (layout.kind, layout.prefix) == ("tokens", prefix)
        assert layout.grid == (hw[0] // 16, hw[1] // 16)
        maps = layout.apply(out)
        assert torch.equal(maps, reference[index])
        # Independent: the tokens after exactly `prefix`, reshaped row-major.
        by_hand = out[:, prefix:].reshape(2, *layout.grid, -1).permute(0, 3, 1, 2)
        assert torch.equal(maps, by_hand)
        assert maps.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()  # a view
    # patch_embed has no prefix tokens (flat tokens, or NHWC when the size is dynamic)
    embed = spatial_maps(outputs["patch_embed"], model=model, input_hw=hw, batch_size=2)
    proj = model.patch_embed.proj(x)
    torch.testing.assert_close(embed, proj)


def test_swin_channels_last_stages_equal_timm():
    model = _timm("swin_tiny_patch4_window7_224", img_size=64, depths=(1, 1, 1, 1),
                  num_heads=(1, 1, 1, 1), embed_dim=16, window_size=2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model.forward_intermediates(x, indices=4, output_fmt="NCHW",
                                                intermediates_only=True, norm=False)
    names = [f"layers.{i}" for i in range(4)]
    outputs = _outputs(model, [*names, "layers.0.blocks.0.attn", "layers.1.blocks.0.mlp.fc1"], x)
    for index, name in enumerate(names):
        out = outputs[name]
        assert out.shape[1] == out.shape[2]  # channels last: (N, H, W, C)
        layout = spatial_layout(out, model=model, module=model.get_submodule(name),
                                input_hw=(64, 64), batch_size=2)
        assert layout.kind == "nhwc"
        assert torch.equal(layout.apply(out), reference[index])
    # the MLP of stage 1 runs on flat tokens of the 8x8 stage grid, no prefix
    fc1 = outputs["layers.1.blocks.0.mlp.fc1"]
    maps = spatial_maps(fc1, model=model, input_hw=(64, 64), batch_size=2)
    assert torch.equal(maps, fc1.reshape(2, 8, 8, -1).permute(0, 3, 1, 2))
    # windowed attention: the first dimension is windows x batch, not a picture
    with pytest.raises(NoSpatialMapError, match="not the batch"):
        spatial_layout(outputs["layers.0.blocks.0.attn"], model=model, input_hw=(64, 64),
                       batch_size=2)


def test_convnext_blocks_inside_are_channels_last_and_stages_are_not():
    model = _timm("convnext_atto", conv_mlp=False)
    x = torch.randn(2, 3, 64, 96)  # non-square: (2, 16, 24, 40) inside a block fits both ways
    with torch.no_grad():
        reference = model.forward_intermediates(x, indices=4, output_fmt="NCHW",
                                                intermediates_only=True)
    block = "stages.0.blocks.0"
    inside = [f"{block}.norm", f"{block}.mlp.act", f"{block}.mlp", f"{block}.mlp.drop2"]
    outputs = _outputs(model, [f"stages.{i}" for i in range(4)] + inside, x)
    for index in range(4):
        out = outputs[f"stages.{index}"]
        maps = spatial_maps(out, model=model, input_hw=(64, 96), batch_size=2)
        assert maps is out  # conv outputs: the same tensor, no copy
        assert torch.equal(maps, reference[index])
    for name in inside:
        out = outputs[name]  # (2, 16, 24, C) between the permutes of the block
        layout = spatial_layout(out, model=model, module=model.get_submodule(name),
                                input_hw=(64, 96), batch_size=2)
        assert layout.kind == "nhwc" and layout.grid == (16, 24), name
        assert torch.equal(layout.apply(out), out.permute(0, 3, 1, 2))


def test_hugging_face_vit_and_convnext_hidden_states():
    from transformers import (
        ConvNextConfig,
        ConvNextForImageClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(
        image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=3)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        hidden = vit(x, output_hidden_states=True).hidden_states
    layers = [name for name, _ in vit.named_modules() if name.endswith(("layer.0", "layers.0"))]
    out = _outputs(vit, layers, x)[layers[0]]
    out = out[0] if isinstance(out, tuple) else out
    assert torch.equal(out, hidden[1])
    layout = spatial_layout(out, model=vit, input_hw=(64, 64), batch_size=2)
    assert (layout.prefix, layout.grid) == (1, (4, 4))  # HF ViT: the cls_token parameter
    assert torch.equal(layout.apply(out), hidden[1][:, 1:].reshape(2, 4, 4, 32).permute(0, 3, 1, 2))

    convnext = ConvNextForImageClassification(ConvNextConfig(
        hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_labels=3)).eval()
    with torch.no_grad():
        hidden = convnext(x, output_hidden_states=True).hidden_states
    names = ["convnext.encoder.stages.0", "convnext.encoder.stages.0.layers.0.layernorm",
             "convnext.encoder.stages.0.layers.0.act"]
    outputs = _outputs(convnext, names, x)
    assert spatial_maps(outputs[names[0]], model=convnext, input_hw=(64, 64)) is outputs[names[0]]
    assert torch.equal(outputs[names[0]], hidden[1])
    for name in names[1:]:  # ConvNextLayerNorm(data_format="channels_last"), then GELU
        layout = spatial_layout(outputs[name], model=convnext,
                                module=convnext.get_submodule(name), input_hw=(64, 64))
        assert layout.kind == "nhwc" and layout.grid == (16, 16)


def test_layout_applied_to_a_gradient_matches_pytorch_grad_cam_reshape():
    """cam() needs the gradient of the map: the layout is pure indexing, so applying it to
    the gradient of the token output equals pytorch-grad-cam's ViT reshape_transform."""
    model = _timm("vit_tiny_patch16_224", img_size=64, depth=2)
    x = torch.randn(1, 3, 64, 64)
    tokens = torch.randn(1, 17, 192, requires_grad=True)
    layout = spatial_layout(tokens, model=model, input_hw=(64, 64))
    maps = layout.apply(tokens)
    weights = torch.randn_like(maps)
    (grad,) = torch.autograd.grad((maps * weights).sum(), tokens)
    assert torch.equal(layout.apply(grad), weights)
    assert torch.equal(grad[:, :1], torch.zeros(1, 1, 192))  # the class token gets nothing

    def grad_cam_reshape(t: torch.Tensor) -> torch.Tensor:  # from pytorch-grad-cam's docs
        result = t[:, 1:, :].reshape(t.size(0), 4, 4, t.size(2))
        return result.transpose(2, 3).transpose(1, 2)

    assert torch.equal(layout.reshape_transform(tokens), grad_cam_reshape(tokens))
    del x


def test_outputs_without_a_spatial_reading_raise():
    x = torch.zeros(2, 64)
    with pytest.raises(NoSpatialMapError, match="no spatial map"):
        spatial_layout(x)
    with pytest.raises(NoSpatialMapError, match="ambiguous"):
        spatial_layout((1, 7, 7, 7), input_hw=(224, 224))
    # ...unless the producing module (or the caller) says which layout it is
    assert spatial_layout((1, 7, 7, 7), module=nn.Conv2d(3, 7, 3)).kind == "nchw"
    assert spatial_layout((1, 7, 7, 7), module=nn.Linear(3, 7)).kind == "nhwc"
    assert spatial_layout((1, 7, 7, 7), layout="nhwc").kind == "nhwc"
    # a plain CNN has no channels-last modules: a shape that fits both reads as NCHW
    cnn = nn.Sequential(nn.Conv2d(3, 7, 3), nn.ReLU())
    assert spatial_layout((1, 7, 7, 7), model=cnn, input_hw=(9, 9)).kind == "nchw"
    with pytest.raises(NoSpatialMapError, match="Conv1d"):
        spatial_layout((2, 8, 16), module=nn.Conv1d(3, 8, 3))
    with pytest.raises(NoSpatialMapError, match="no patch grid"):
        spatial_layout((2, 50, 8), input_hw=(64, 64), prefix_tokens=0)  # 50 is no s x s
    # 17 tokens on a 64x64 input: 1 + 4x4 or 8 + 3x3 or ...: the model must say
    with pytest.raises(NoSpatialMapError, match="prefix_tokens="):
        spatial_layout((2, 17, 8), input_hw=(64, 64))
    assert spatial_layout((2, 17, 8), input_hw=(64, 64), prefix_tokens=1).grid == (4, 4)
    with pytest.raises(NoSpatialMapError, match="64x64"):
        spatial_layout((2, 5, 40, 3), input_hw=(64, 64))  # neither reading fits


def test_a_vit_output_that_is_not_tokens_of_the_grid_is_refused():
    model = _timm("vit_tiny_patch16_224", img_size=64, depth=1)
    x = torch.randn(2, 3, 64, 64)
    pooled = _outputs(model, ["fc_norm", "head"], x)
    for name, out in pooled.items():
        with pytest.raises(NoSpatialMapError):
            spatial_layout(out, model=model, input_hw=(64, 64), batch_size=2, name=name)


@pytest.mark.slow
def test_grad_cam_through_the_layout_agrees_with_pytorch_grad_cam_on_a_vit_block():
    """The reshape information cam() needs: Grad-CAM computed on layout.apply(tokens) and
    layout.apply(grad) equals pytorch-grad-cam given the matching reshape_transform."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = _timm("vit_tiny_patch16_224", img_size=64, depth=2, reg_tokens=4)
    x = torch.randn(2, 3, 64, 64)
    layer = model.blocks[-1].norm1
    layout = spatial_layout((2, 21, 192), model=model, input_hw=(64, 64), batch_size=2)
    assert layout.prefix == 5

    saved: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: saved.append(out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits[:, 3].sum(), saved[0])
    maps, grads = layout.apply(saved[0].detach()), layout.apply(grad)
    ours = torch.relu((grads.mean((2, 3), keepdim=True) * maps).sum(1, keepdim=True))
    ours = torch.nn.functional.interpolate(ours, size=(64, 64), mode="bilinear",
                                           align_corners=False)[:, 0]

    def reshape(t: torch.Tensor) -> torch.Tensor:
        return t[:, 5:, :].reshape(t.size(0), 4, 4, t.size(2)).permute(0, 3, 1, 2)

    with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        theirs = torch.from_numpy(cam(x, targets=[ClassifierOutputTarget(3)] * 2))
    for i in range(2):
        pair = torch.stack([ours[i].flatten(), theirs[i].flatten()]).double()
        assert float(torch.corrcoef(pair)[0, 1]) >= 0.999


# Cases a mutation run (stop 20) found unpinned.


def _tokens_by_hand(tokens: torch.Tensor, prefix: int, rows: int, cols: int) -> torch.Tensor:
    """Drop ``prefix`` tokens and read the rest row-major as ``rows x cols``: (N, D, H, W)."""
    n, _, d = tokens.shape
    out = torch.empty(n, d, rows, cols)
    for index in range(rows * cols):
        out[:, :, index // cols, index % cols] = tokens[:, prefix + index]
    return out


class _TorchvisionStyleViT(nn.Module):
    """What torchvision's ViT tells: a class token, ``patch_size`` and ``image_size``."""

    def __init__(self) -> None:
        super().__init__()
        self.class_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.patch_size = 16
        self.image_size = 64


def test_patch_grid_of_a_non_square_input_is_rows_by_columns() -> None:
    """A model that gives only its patch size: a 64x96 input is a 4x6 grid, not 6x4 (both
    hold 24 tokens, so a swapped grid would draw a scrambled map without any error)."""
    tokens = torch.randn(2, 1 + 4 * 6, 8)
    layout = spatial_layout(tokens, model=_TorchvisionStyleViT(), input_hw=(64, 96),
                            batch_size=2)
    assert (layout.prefix, layout.grid) == (1, (4, 6))
    assert torch.equal(layout.apply(tokens), _tokens_by_hand(tokens, 1, 4, 6))


def test_inferred_token_grid_of_a_non_square_input_is_rows_by_columns() -> None:
    """No model hints: 24 patch tokens of a 64x96 input are the 4x6 grid at stride 16."""
    tokens = torch.randn(3, 24, 5)
    layout = spatial_layout(tokens, input_hw=(64, 96), prefix_tokens=0)
    assert layout.grid == (4, 6)
    assert torch.equal(layout.apply(tokens), _tokens_by_hand(tokens, 0, 4, 6))


def test_sixteen_prefix_tokens_are_still_inferred() -> None:
    """MAX_INFERRED_PREFIX (16) is the largest count tried, inclusive: 86 tokens of a 64x96
    input are only explained by 16 prefix tokens and a 7x10 grid (stride 9)."""
    tokens = torch.randn(2, 86, 4)
    layout = spatial_layout(tokens, input_hw=(64, 96))
    assert (layout.prefix, layout.grid) == (16, (7, 10))
    assert torch.equal(layout.apply(tokens), _tokens_by_hand(tokens, 16, 7, 10))


def test_prefix_tokens_returns_exactly_the_prefix() -> None:
    """SpatialLayout.prefix_tokens: the first ``prefix`` tokens, all of them, no patch token;
    a map layout has none."""
    tokens = torch.randn(2, 5 + 2 * 3, 4)
    layout = spatial_layout(tokens, input_hw=(32, 48), prefix_tokens=5)
    assert layout.grid == (2, 3)
    assert torch.equal(layout.prefix_tokens(tokens), tokens[:, :5])
    maps = torch.randn(2, 4, 3, 5)
    assert spatial_layout(maps, layout="nchw").prefix_tokens(maps).shape == (2, 0, 4)


def test_without_an_input_size_only_a_square_grid_reads_as_spatial() -> None:
    """No input size: the (H, W) of a reading must be square to be plausible, so a
    (2, 8, 6, 10) conv output falls back to PyTorch's (N, C, H, W) and (2, 6, 6, 10) reads
    channels-last, rather than being called ambiguous."""
    conv = spatial_layout((2, 8, 6, 10))
    assert (conv.kind, conv.grid, conv.channels) == ("nchw", (6, 10), 8)
    last = spatial_layout((2, 6, 6, 10))
    assert (last.kind, last.grid, last.channels) == ("nhwc", (6, 6), 10)
