"""Core subcommands: ``activations``, ``filters``, ``layers``, ``models`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from .common import (
    add_grid_args,
    add_layer_args,
    add_model_args,
    add_quiet_arg,
    grid_kwargs,
    load_model_from_args,
    single_layer,
)
from .progress import Steps


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the core subcommands."""
    p = subparsers.add_parser(
        "activations", help="draw the feature maps of one or more layers for an image",
        description="Run IMAGE through the model and write one PNG grid per selected layer.",
    )
    p.add_argument("image", help="image path or sample:NAME (chelsea, coffee, rocket, astronaut)")
    add_model_args(p)
    add_layer_args(p, required=True, help="layer to draw ('all' for every layer)")
    p.add_argument("--call", type=int, default=-1,
                   help="which call of a module run several times per forward (default last)")
    p.add_argument("--out", "-o", required=True,
                   help="output folder (one LAYER.png each), or a .png file for one layer")
    add_grid_args(p)
    add_quiet_arg(p)
    p.set_defaults(func=run_activations)

    p = subparsers.add_parser("filters", help="draw the convolution filters of a layer")
    add_model_args(p)
    add_layer_args(p, required=True, help="the conv layer to draw (one)")
    p.add_argument("--out", "-o", required=True, help="output .png")
    p.add_argument("--mode", choices=["auto", "rgb", "mean", "channels"], default="auto",
                   help="rgb patches (3 input channels), mean over inputs, or one per channel")
    p.add_argument("--max-filters", type=int, help="draw only the first N filters")
    p.add_argument("--max-channels", type=int, default=16,
                   help="input channels per filter in --mode channels (16)")
    p.add_argument("--tile-size", type=int, default=48, help="pixels per filter tile (48)")
    p.set_defaults(func=run_filters)

    p = subparsers.add_parser("layers", help="list a model's layers with shapes and receptive fields")
    add_model_args(p, positional=True)
    p.add_argument("--input-size", type=int, nargs="+", metavar="N",
                   help="input size as C H W or N C H W (default: the model's, usually "
                        "3 224 224)")
    p.add_argument("--filter", help="show only layers matching this glob, e.g. 'features.*'")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.set_defaults(func=run_layers)

    p = subparsers.add_parser(
        "models", help="list the model sources and names convscope can load",
        description="Without PATTERN: the kinds of models load_model accepts, the bundled "
                    "model and torchvision's names. With PATTERN (a glob such as 'convnext*'): "
                    "the torchvision and timm names that match.",
    )
    p.add_argument("pattern", nargs="?", help="glob over model names, e.g. 'convnext*' or 'vit_*'")
    p.add_argument("--pretrained", action="store_true",
                   help="timm: list the NAME.TAG entries that have pretrained weights")
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    p.set_defaults(func=run_models)

    p = subparsers.add_parser(
        "demo", help="the seed tutorial's figures on the bundled pretrained model (offline)",
        description="Top-5 predictions and activation/filter figures with an index.html.",
    )
    add_model_args(p)
    p.add_argument("--image", default="sample:chelsea", help="image (default sample:chelsea)")
    p.add_argument("--out", "-o", default="demo-out", help="output folder (demo-out)")
    add_quiet_arg(p)
    p.set_defaults(func=run_demo)


def _safe_name(layer: str, call: int | None = None) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", layer)
    return f"{stem}.call{call}" if call is not None else stem


def run_activations(args: argparse.Namespace) -> int:
    """``convscope activations``."""
    import torch

    from convscope.errors import ConvscopeError
    from convscope.hooks import capture
    from convscope.images import load_image
    from convscope.layers import resolve_layers
    from convscope.render.grid import feature_grid
    from convscope.spatial import NoSpatialMapError

    steps = Steps(4, quiet=args.quiet, title="activations")
    with steps.step("loading image"):
        image = load_image(args.image)
    with steps.step(f"loading model {args.model}"):
        model = load_model_from_args(args)
        modules = resolve_layers(model.module, args.layers)
    out = Path(args.out)
    single_file = out.suffix.lower() == ".png"
    if single_file and len(modules) != 1:
        raise ConvscopeError(
            f"--out {out} is one file but {len(modules)} layers were selected; give a folder"
        )
    with steps.step(f"forward pass, capturing {len(modules)} layer(s)"), torch.no_grad():
        with capture(model.module, list(modules)) as acts:
            model.module(model.preprocess(image))
    written, skipped = [], []
    with steps.step("rendering grids"):
        if not single_file:
            out.mkdir(parents=True, exist_ok=True)
        for name in modules:
            calls = acts.calls(name)
            if not calls:
                skipped.append(f"{name} (not called)")
                continue
            if not -len(calls) <= args.call < len(calls):
                raise ConvscopeError(
                    f"--call {args.call}: {name} ran {len(calls)} time(s) in the forward pass"
                )
            try:  # conv maps as they are; channels-last and transformer tokens as maps
                value = acts.maps(name, call=args.call)
            except NoSpatialMapError as error:
                skipped.append(f"{name} ({error})")
                continue
            image_out = feature_grid(value[0], **grid_kwargs(args))
            path = out if single_file else out / f"{_safe_name(name)}.png"
            image_out.save(path)
            written.append(path)
    for path in written:
        print(path)
    for reason in skipped:
        print(f"skipped {reason}", file=sys.stderr)
    if not written:
        raise ConvscopeError("no selected layer has a spatial (N, C, H, W) output to draw")
    return 0


def run_filters(args: argparse.Namespace) -> int:
    """``convscope filters``."""
    from convscope.errors import ConvscopeError
    from convscope.filters import conv_filters
    from convscope.layers import resolve_layers
    from convscope.render.grid import filter_grid

    model = load_model_from_args(args)
    layer = single_layer(args.layers, "filters")
    matched = list(resolve_layers(model.module, layer))
    if len(matched) != 1:
        error = ConvscopeError(f"-l {layer} matched {len(matched)} layers "
                               f"({', '.join(matched[:5])}{', ...' if len(matched) > 5 else ''}"
                               "); filters draws one")
        error.exit_code = 2  # a bad argument
        raise error
    weights = conv_filters(model.module, matched[0])
    image = filter_grid(weights, mode=args.mode, max_filters=args.max_filters,
                        max_channels=args.max_channels, tile_size=args.tile_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(out)
    return 0


def _format_rf(rf: Any) -> tuple[str, str]:
    if rf is None:
        return "", ""
    size = str(rf.size[0]) if rf.size[0] == rf.size[1] else f"{rf.size[0]}x{rf.size[1]}"
    stride = str(rf.stride[0]) if rf.stride[0] == rf.stride[1] else f"{rf.stride[0]}x{rf.stride[1]}"
    return size, stride


def run_layers(args: argparse.Namespace) -> int:
    """``convscope layers``."""
    import fnmatch

    from convscope.layers import list_layers

    model = load_model_from_args(args)
    size = tuple(args.input_size) if args.input_size else model.input_size
    rows = list_layers(model.module, size)
    if args.filter:
        rows = [row for row in rows if fnmatch.fnmatch(row.name, args.filter)]
    if args.json:
        json.dump([row.as_dict() for row in rows], sys.stdout, indent=1)
        print()
        return 0
    table = [("name", "type", "output", "params", "rf", "stride")]
    for row in rows:
        shape = "x".join(map(str, row.output_shape)) if row.output_shape else "-"
        rf_size, rf_stride = _format_rf(row.receptive_field)
        table.append((row.name, row.type, shape, f"{row.params:,}", rf_size, rf_stride))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    print(f"# {model.name}, input {'x'.join(map(str, size))}")
    for line in table:
        print("  ".join(cell.ljust(width) if i < 2 else cell.rjust(width)
                        for i, (cell, width) in enumerate(zip(line, widths))).rstrip())
    return 0


def run_models(args: argparse.Namespace) -> int:
    """``convscope models [PATTERN] [--pretrained] [--json]``."""
    import fnmatch

    from convscope.models import BUNDLED, MODEL_SOURCES, timm_names, torchvision_names

    pattern = getattr(args, "pattern", None)
    pretrained = getattr(args, "pretrained", False)
    if pattern is None and not pretrained:
        listing: dict[str, Any] = {
            "sources": [{"source": source, "example": example, "description": text}
                        for source, example, text in MODEL_SOURCES],
            "bundled": [BUNDLED],
            "torchvision": torchvision_names(),
        }
    else:
        glob = pattern or "*"
        try:
            timm_list = timm_names(glob, pretrained=pretrained)
        except ImportError:
            timm_list = []
        listing = {
            "pattern": glob,
            "bundled": [BUNDLED] if fnmatch.fnmatch(BUNDLED, glob) else [],
            "torchvision": [] if pretrained else fnmatch.filter(torchvision_names(), glob),
            "timm": [f"timm:{name}" for name in timm_list],
        }
    if getattr(args, "json", False):
        print(json.dumps(listing, indent=2))
        return 0
    if "sources" in listing:
        print("# sources (convscope models 'PATTERN*' searches torchvision and timm names)")
        width = max(len(row["example"]) for row in listing["sources"])
        for row in listing["sources"]:
            print(f"  {row['example'].ljust(width)}  {row['source']}: {row['description']}")
        print(f"{BUNDLED}  (bundled, ImageNet-pretrained, offline)")
        for name in listing["torchvision"]:
            print(name)
        return 0
    names = [*listing["bundled"], *listing["torchvision"], *listing["timm"]]
    for name in names:
        print(name)
    if not names:
        print(f"no model name matches {listing['pattern']!r}", file=sys.stderr)
        return 1
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """``convscope demo``: top-5 and the seed tutorial's figures with an index.html."""
    from convscope.demo import write_demo

    steps = Steps(6, quiet=args.quiet, title="demo")
    with steps.step(f"loading model {args.model}"):
        model = load_model_from_args(args)
    result = write_demo(model, args.image, Path(args.out), steps=steps)
    print(f"model: {result.model_name}")
    print(f"image: {args.image}")
    print("top-5:")
    for prediction in result.predictions:
        print(f"  {prediction.probability:6.1%}  {prediction.label} ({prediction.index})")
    print(f"figures: {result.index_html}")
    return 0
