"""``convscope visualize``: feature visualisations of channels and classes, written as a
grid, one PNG per objective and an index.html."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import (
    add_layer_args,
    add_model_args,
    add_quiet_arg,
    channels_arg,
    load_model_from_args,
)
from .progress import bar


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``visualize`` subcommand."""
    p = subparsers.add_parser(
        "visualize", help="synthesise the images that excite channels or classes most",
        description="Feature visualisation by optimisation: one image per objective "
                    "(-l LAYER --channels ..., or -O OBJECTIVE), written to --out as "
                    "grid.png, NNN_<objective>.png, values.json and index.html.",
    )
    add_model_args(p)
    add_layer_args(p, help="layer whose channels to visualise, one image per selected channel")
    p.add_argument("--channels", type=channels_arg, default=None,
                   help="channels of each --layer: count (16 = the first 16), range (0-63), "
                        "list (1,5,9) or slice (8:); default all")
    p.add_argument("--objective", "-O", action="append", default=[],
                   help="objective string: LAYER:CH, LAYER:CH@Y,X, LAYER:0-63, LAYER:*, "
                        "class:285, 'class:Egyptian cat' (repeatable)")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=512, help="optimisation steps (512)")
    p.add_argument("--size", type=int, default=None,
                   help="image side in pixels (default: the model's input size)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--batch-size", type=int, help="images optimised together (default: "
                                                  "as many as fit in about 2 GiB)")
    p.add_argument("--param", choices=["fft", "maco", "pixel"], default="fft",
                   help="parameterisation: fft (default), maco (phase only), pixel")
    p.add_argument("--transforms", choices=["standard", "lucent", "none"], default="standard",
                   help="random views per step (standard)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default per --param)")
    p.add_argument("--cols", type=int, help="tiles per row of grid.png")
    add_quiet_arg(p)
    p.set_defaults(func=run_visualize)


def channel_objectives(layers: list[str], channels: Any) -> list[str]:
    """Objective strings for ``--layer`` and ``--channels`` (parsed by ``parse_channels``)."""
    if channels is None:
        selection = "*"
    elif isinstance(channels, int):
        if channels < 1:
            raise argparse.ArgumentTypeError("--channels COUNT must be at least 1")
        selection = f"0-{channels - 1}"
    elif isinstance(channels, slice):
        if channels.step not in (None, 1):
            raise argparse.ArgumentTypeError("--channels slices take no step")
        start = channels.start or 0
        selection = f"{start}-" if channels.stop is None else f"{start}-{channels.stop - 1}"
    else:
        selection = ",".join(str(c) for c in channels)
    return [f"{layer}:{selection}" for layer in layers]


def run_visualize(args: argparse.Namespace) -> int:
    """``convscope visualize``."""
    from convscope.featvis import visualize

    try:
        objectives = channel_objectives(args.layers or [], args.channels) + list(args.objective)
    except argparse.ArgumentTypeError as error:
        print(f"convscope visualize: error: {error}", file=sys.stderr)
        return 2
    if not objectives:
        print("convscope visualize: error: give --layer (with --channels) or --objective",
              file=sys.stderr)
        return 2
    model = load_model_from_args(args)
    size = args.size or model.input_size[-1]
    with bar(args, unit="steps") as progress:
        vis = visualize(model, objectives, steps=args.steps, size=size, seed=args.seed,
                        batch_size=args.batch_size, param=args.param,
                        transforms=args.transforms, lr=args.lr, progress=progress)
    folder = vis.save(args.out, title=f"Feature visualisations of {model.name}")
    if args.cols:
        vis.grid(args.cols).save(folder / "grid.png")
    for name, value in zip(vis.names, vis.values.tolist(), strict=True):
        print(f"{name}\t{value:.4g}")
    print(folder / "index.html")
    return 0
