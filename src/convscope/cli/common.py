"""Argument groups and helpers shared by the CLI subcommands."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from convscope.models import LoadedModel

DEFAULT_MODEL = "efficientnet_lite0"


def add_model_args(parser: argparse.ArgumentParser, *, positional: bool = False) -> None:
    """``--model/--weights/--arch/--num-classes/--device`` (or MODEL as a positional)."""
    group = parser.add_argument_group("model")
    if positional:
        group.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                           help=f"model name, checkpoint or package.module:factory (default {DEFAULT_MODEL})")
    else:
        group.add_argument("--model", "-m", default=DEFAULT_MODEL,
                           help="torchvision name (vgg16, resnet50, ...), efficientnet_lite0 "
                                "(bundled, pretrained; default), a checkpoint .pt/.pth with --arch, "
                                "or package.module:factory")
    group.add_argument("--weights", help="DEFAULT, IMAGENET1K_V1 or a checkpoint path "
                                         "(torchvision models; default: random init)")
    group.add_argument("--arch", help="architecture of a checkpoint given as the model")
    group.add_argument("--num-classes", type=int, help="class count of a fine-tuned checkpoint")
    group.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1 ...")


def load_model_from_args(args: argparse.Namespace) -> LoadedModel:
    """The model the arguments describe (see :func:`convscope.models.load_model`)."""
    from convscope.models import load_model

    return load_model(args.model, args.weights, args.device, arch=args.arch,
                      num_classes=args.num_classes)


def parse_channels(text: str | None) -> Any:
    """``"32"`` -> first 32; ``"0-15"`` -> range; ``"1,5,9"`` -> list; ``"5:"`` -> slice."""
    if text is None or text == "all":
        return None
    text = text.strip()
    try:
        if ":" in text:
            start, _, stop = text.partition(":")
            return slice(int(start) if start else None, int(stop) if stop else None)
        if "," in text or "-" in text[1:]:
            picked: list[int] = []
            for part in text.split(","):
                if "-" in part[1:]:
                    low, high = part.split("-", 1)
                    picked.extend(range(int(low), int(high) + 1))
                else:
                    picked.append(int(part))
            return picked
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--channels takes a count (32), a range (0-15), a list (1,5,9) or a slice (8:); "
            f"got {text!r}"
        ) from None


def channels_arg(text: str) -> Any:
    """argparse ``type=`` wrapper for :func:`parse_channels`."""
    return parse_channels(text)


def add_grid_args(parser: argparse.ArgumentParser) -> None:
    """Options of :func:`convscope.render.grid.feature_grid`."""
    group = parser.add_argument_group("grid")
    group.add_argument("--channels", type=channels_arg, default=None,
                       help="count (32), range (0-15), list (1,5,9) or slice (8:); default all")
    group.add_argument("--cols", type=int, help="tiles per row (default: about square)")
    group.add_argument("--normalize", choices=["channel", "layer", "none"], default="channel",
                       help="scale each tile (channel, default), the whole layer, or not")
    group.add_argument("--cmap", default="viridis", help="matplotlib colour map (viridis)")
    group.add_argument("--sort", choices=["mean", "max"], help="order channels by strength")
    group.add_argument("--tile-size", type=int, help="enlarge tiles to about N pixels")
    group.add_argument("--labels", action="store_true", help="write channel indices on tiles")


def grid_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """feature_grid keyword arguments from parsed grid options."""
    return {
        "channels": args.channels, "cols": args.cols, "normalize": args.normalize,
        "cmap": args.cmap, "sort": args.sort, "tile_size": args.tile_size,
        "labels": args.labels,
    }
