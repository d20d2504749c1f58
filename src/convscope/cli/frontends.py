"""Front-end subcommands: ``serve`` (browser explorer) and ``report`` (one HTML file)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from convscope.methods import CAM_METHODS

from .common import (
    DEFAULT_MODEL,
    add_layer_args,
    add_model_args,
    add_quiet_arg,
    load_model_from_args,
)
from .progress import Steps


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` and ``report``."""
    p = subparsers.add_parser(
        "serve", help="browse activations, filters and CAMs in a web browser",
        description="Start the convscope explorer (FastAPI + a static page) on 127.0.0.1. "
                    "The JSON + PNG API is documented at /docs.",
    )
    p.add_argument("--model", "-m", action="append", dest="models", metavar="MODEL",
                   help=f"model to serve (repeatable; default {DEFAULT_MODEL}): a torchvision "
                        "name, efficientnet_lite0, a checkpoint (with --arch) or "
                        "package.module:factory")
    p.add_argument("--weights", help="weights of the (single) --model: DEFAULT, "
                                      "IMAGENET1K_V1 or a checkpoint path")
    p.add_argument("--arch", help="architecture of a checkpoint given as the --model")
    p.add_argument("--num-classes", type=int, help="class count of a fine-tuned checkpoint")
    p.add_argument("--image", "-i", action="append", default=[], metavar="PATH",
                   help="image file or folder to offer besides the samples (repeatable)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda ...")
    p.add_argument("--max-upload-mb", type=float, default=20.0,
                   help="largest upload in MiB (default 20)")
    p.add_argument("--max-pixels", type=int, default=40_000_000,
                   help="largest upload in pixels (default 40,000,000)")
    p.add_argument("--cache", type=int, default=6,
                   help="forward passes (image x model) kept in memory (default 6)")
    p.add_argument("--cache-mb", type=int, default=512,
                   help="MiB the kept forward passes may hold together (default 512)")
    p.add_argument("--upload-cache-mb", type=int, default=256,
                   help="MiB of decoded uploads kept (default 256)")
    p.add_argument("--max-jobs", type=int, default=4,
                   help="expensive jobs (Score-CAM, sanity checks) waiting or running at "
                        "once; more get 429 (default 4)")
    p.add_argument("--token", default=None,
                   help="shared secret every API call must carry (default: $CONVSCOPE_TOKEN; "
                        "made up and printed when binding to a non-loopback address)")
    p.add_argument("--allow-host", action="append", default=None, metavar="NAME",
                   help="Host header value to answer (repeatable; default: the loopback "
                        "names on a loopback bind, any host otherwise; '*' for any)")
    p.add_argument("--threads", type=int,
                   help="requests served at once (default: 2 per CPU core, 4 to 32)")
    p.add_argument("--atlas", metavar="DIR", help="atlas folder (convscope atlas) for "
                                                  "top dataset examples per channel")
    p.set_defaults(func=run_serve)

    p = subparsers.add_parser(
        "report", help="write one self-contained HTML report for an image",
        description="Input, top-5, layer table, activation grids with statistics, first-layer "
                    "filters and CAM overlays in one HTML file with embedded images.",
    )
    p.add_argument("image", help="image path or sample:NAME (chelsea, coffee, rocket, astronaut)")
    add_model_args(p)
    add_layer_args(p, help="layer to draw (default: every conv block)")
    p.add_argument("--out", "-o", default="report.html", help="output file (report.html)")
    p.add_argument("--channels", type=int, default=64, help="channels per layer grid (64)")
    p.add_argument("--format", choices=["jpeg", "png", "webp"], default="jpeg",
                   help="embedded grid format: jpeg (small, default), png (lossless), webp")
    p.add_argument("--cam-method", default="gradcam", choices=CAM_METHODS, metavar="METHOD",
                   help="CAM method: " + ", ".join(CAM_METHODS) + " (default gradcam)")
    p.add_argument("--cam-topk", type=int, default=3, help="CAM for the top-k classes (3)")
    p.add_argument("--title", help="report title")
    p.add_argument("--visualize", action="store_true",
                   help="add a grid of feature visualisations (images that maximise each "
                        "channel) of the first --vis-channels channels of every drawn layer; "
                        "off by default: it costs layers x channels x steps forward and "
                        "backward passes (several minutes for 4 layers at the defaults on a "
                        "CPU)")
    p.add_argument("--vis-channels", type=int, default=8,
                   help="channels visualised per layer, the first ones (8)")
    p.add_argument("--vis-steps", type=int, default=128,
                   help="optimisation steps per visualisation (128)")
    p.add_argument("--vis-size", type=int, default=128, help="visualisation size in px (128)")
    add_quiet_arg(p)
    p.set_defaults(func=run_report)


def run_serve(args: argparse.Namespace) -> int:
    """``convscope serve``."""
    from convscope._extras import require

    require("fastapi", "convscope serve")
    uvicorn = require("uvicorn", "convscope serve")
    from convscope.errors import ConvscopeError
    from convscope.server import Settings, create_app

    class UsageError(ConvscopeError):
        exit_code = 2

    models: list | dict = args.models or [DEFAULT_MODEL]
    if args.weights or args.arch or args.num_classes:
        if len(models) != 1:
            raise UsageError("--weights/--arch/--num-classes need exactly one --model")
        from convscope.models import load_model

        with Steps(1).step(f"loading {models[0]}"):
            loaded = load_model(models[0], args.weights, args.device, arch=args.arch,
                                num_classes=args.num_classes)
        models = {Path(models[0]).stem if models[0].endswith((".pt", ".pth")) else models[0]:
                  loaded}
    import os
    import secrets

    from convscope.server.settings import is_loopback

    token = args.token or os.environ.get("CONVSCOPE_TOKEN") or None
    exposed = not is_loopback(args.host)
    if exposed and token is None:
        token = secrets.token_urlsafe(18)
    settings = Settings(
        models=models, images=list(args.image), device=args.device,
        host=args.host, port=args.port, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels, cache_entries=args.cache, atlas=args.atlas,
        cache_bytes=args.cache_mb * 1024 * 1024,
        upload_bytes=args.upload_cache_mb * 1024 * 1024, max_jobs=args.max_jobs,
        token=token, allowed_hosts=args.allow_host,
    )
    if args.threads:
        settings.worker_threads = args.threads
    app = create_app(settings)
    state = app.state.convscope
    with Steps(1).step(f"loading {state.models.default}"):
        state.models[state.models.default].get()
    if exposed:
        print(f"warning: serving on {args.host}: other machines can reach the explorer; "
              "every API call needs the token", file=sys.stderr)
    link = f"http://{_url_host(args.host)}:{args.port}/"
    if token is not None:
        link += f"?token={token}"
    print(f"convscope explorer on {link} (API docs at /docs)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def run_report(args: argparse.Namespace) -> int:
    """``convscope report``."""
    from convscope.images import load_image
    from convscope.report import ReportOptions, write_report

    steps = Steps(3, quiet=args.quiet, title="report")
    with steps.step("loading image"):
        image = load_image(args.image)
    with steps.step(f"loading model {args.model}"):
        model = load_model_from_args(args)
    with steps.step("building report"):
        options = ReportOptions(
            layers=args.layers, channels=args.channels, image_format=args.format,
            cam_method=args.cam_method, cam_topk=args.cam_topk, title=args.title,
            progress=lambda message: steps.progress(f"report: {message}", steps.done,
                                                    steps.total),
            visualize=args.visualize, vis_channels=args.vis_channels,
            vis_steps=args.vis_steps, vis_size=args.vis_size,
            vis_progress=None if args.quiet else steps.progress,
        )
        if args.title is None:
            name = args.image if args.image.startswith("sample:") else Path(args.image).name
            options.title = f"convscope report: {name} through {model.name}"
        out = write_report(args.out, model, image, options)
    size = out.stat().st_size
    print(f"{out} ({size / 1024 / 1024:.2f} MiB)")
    return 0
