"""Spatial maps of a vision transformer: capture + spatial_maps against timm's own
``forward_intermediates`` and a plain forward, in the same run (timm ViT-S/16, batch 1)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from timing import interleaved_medians

TITLE = "Spatial maps of a ViT (timm ViT-S/16, batch 1, 224x224, all 12 blocks)"


def _methods(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    from convscope import capture
    from convscope.spatial import model_hints, spatial_layout

    names = [f"blocks.{i}" for i in range(len(model.blocks))]
    hints = model_hints(model)
    hw = tuple(x.shape[-2:])

    def plain() -> None:
        with torch.no_grad():
            model(x)

    def timm_intermediates() -> list[torch.Tensor]:
        with torch.no_grad():
            return model.forward_intermediates(x, indices=len(names), output_fmt="NCHW",
                                               intermediates_only=True, norm=False)

    def convscope_maps() -> list[torch.Tensor]:
        with torch.no_grad(), capture(model, names) as acts:
            model(x)
        return [spatial_layout(acts[n], model=hints, input_hw=hw).apply(acts[n]) for n in names]

    return {"plain forward": plain, "timm forward_intermediates (NCHW)": timm_intermediates,
            "convscope capture + spatial maps": convscope_maps}


def _conv_maps_share_storage() -> bool:
    """spatial maps of conv outputs are the captured tensors themselves (no copy)."""
    import torchvision

    from convscope import capture
    from convscope.spatial import spatial_maps

    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), capture(model, torch.nn.Conv2d) as acts:
        model(x)
    return all(spatial_maps(acts[n], model=model, input_hw=(64, 64)) is acts[n] for n in acts)


def run(quick: bool = False) -> str:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    methods = _methods(model, x)
    reference = methods["timm forward_intermediates (NCHW)"]()
    ours = methods["convscope capture + spatial maps"]()
    equal = all(torch.equal(a, b) for a, b in zip(ours, reference))
    medians = interleaved_medians(methods, rounds=3 if quick else 20)
    base = medians["plain forward"]
    rows = ["| method | median ms | vs plain forward |", "|---|---:|---:|"]
    for name, seconds in medians.items():
        rows.append(f"| {name} | {seconds * 1e3:.1f} | {seconds / base:.2f}x |")
    notes = [
        "",
        f"convscope's maps equal timm's `forward_intermediates` maps exactly: {equal}.",
        "Spatial maps of conv outputs are the captured tensors themselves (no copy): "
        f"{_conv_maps_share_storage()} (ResNet18, every Conv2d). Token maps are views "
        "(slice, view, permute) of the captured block outputs.",
        f"Rounds: {3 if quick else 20}, interleaved; CPU threads: {torch.get_num_threads()}.",
    ]
    return "\n".join(rows + notes)


if __name__ == "__main__":
    import sys

    print(run(quick="--quick" in sys.argv))
