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
    import sys

    from convscope.models import load_model

    loaded = load_model(args.model, args.weights, args.device, arch=args.arch,
                        num_classes=args.num_classes)
    if not loaded.pretrained:  # random weights are never silent
        print(f"warning: random weights ({loaded.name}); pass --weights (DEFAULT, a tag or a "
              "file) for trained ones", file=sys.stderr)
    return loaded


def add_layer_args(parser: argparse.ArgumentParser, *, required: bool = False,
                   help: str = "layer to use") -> None:
    """``-l/--layer LAYER``, the same in every command: repeatable, one value per flag (so a
    following positional is never taken as a layer), dotted names or globs. Parsed into
    ``args.layers`` (a list, or None when not given); ``--layers`` is an alias."""
    parser.add_argument(
        "-l", "--layer", "--layers", dest="layers", action="append", metavar="LAYER",
        required=required,
        help=f"{help}; a dotted name (features.28) or a quoted glob ('features.*'); "
             "repeat -l for more",
    )


def add_quiet_arg(parser: argparse.ArgumentParser) -> None:
    """``-q/--quiet``: no progress on stderr (results still go to stdout)."""
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")


def add_json_arg(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    """``--json``: print ``what`` as JSON on stdout instead of text."""
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON on stdout")


def single_layer(layers: list[str] | None, command: str) -> str | None:
    """The one ``-l`` value of a command that explains a single layer (None: not given)."""
    from convscope.errors import ConvscopeError

    if not layers:
        return None
    if len(layers) > 1:
        error = ConvscopeError(f"{command} takes one -l/--layer, got {len(layers)}: "
                               + ", ".join(layers))
        error.exit_code = 2
        raise error
    return layers[0]


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
