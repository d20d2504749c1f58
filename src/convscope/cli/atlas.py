"""``convscope atlas``: per-channel statistics and top-k examples over a dataset.

Runs single-process, or sharded under ``torchrun --nproc_per_node=N -m convscope atlas ...``
(gloo on CPU, NCCL on GPU); see docs/atlas.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from .common import add_json_arg, add_layer_args, add_model_args, add_quiet_arg

#: ``--visualize`` defaults, equal to convscope.featvis.atlas's (kept here so that
#: ``--help`` does not import torch; a test checks they agree).
VIS_CHANNELS, VIS_STEPS, VIS_SIZE, VIS_BATCH = 16, 128, 128, 16


def _channel_limit(text: str) -> int | None:
    """``--vis-channels``: a positive count, or ``all`` (None)."""
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 channel, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``atlas`` subcommand."""
    p = subparsers.add_parser(
        "atlas", help="top-k images and statistics of every channel over a dataset",
        description="Stream DATA through the model once and record, for every channel of "
                    "the selected layers, its statistics and the top-k images (with crops) "
                    "that excite it most. Writes atlas.json, atlas.npz, crops/ and "
                    "index.html to --out. Distributed: torchrun --nproc_per_node=N -m "
                    "convscope atlas ...",
    )
    p.add_argument("data", help="image folder (recursive; class sub-folders become labels) "
                                "or a text file listing one image path per line")
    add_model_args(p)
    add_layer_args(p, required=True, help="layer to record, e.g. _conv_head or '_blocks.1[0-5]'")
    p.add_argument("--topk", "-k", type=int, default=9, help="examples per channel (9)")
    p.add_argument("--rank-by", nargs="+", choices=["max", "mean"], default=["max"],
                   help="rank images by the channel's spatial max (default) and/or mean")
    p.add_argument("--batch-size", "-b", type=int, default=32, help="images per batch (32)")
    p.add_argument("--workers", "-j", type=int, default=max(1, min(4, (os.cpu_count() or 2) // 2)),
                   help="data-loading worker processes (default: half the cores, at most 4)")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its checkpoint in --out")
    p.add_argument("--force", action="store_true",
                   help="overwrite an output folder that holds a different atlas")
    p.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                   help="seconds between checkpoints (60)")
    p.add_argument("--fused", choices=["auto", "compile", "eager"], default="auto",
                   help="reductions: on CPU both modes use the atlas's C kernel (built at "
                        "first use with the system C compiler; compile runs it on every "
                        "torch thread, eager on one); without a compiler, and on CUDA, "
                        "torch.compile'd or eager torch ops; auto: compile with the C "
                        "kernel, else eager on CPU and compiled for runs of 10+ batches on "
                        "CUDA. Chosen once per run by all "
                        "processes; both modes give identical statistics")
    p.add_argument("--crop-size", type=int, default=64, help="pixels per crop tile (64)")
    p.add_argument("--no-crops", action="store_true", help="skip writing crops/")
    g = p.add_argument_group(
        "feature visualisations (--visualize)",
        "After the pass, synthesise one image per channel that maximises its mean activation "
        "(convscope.visualize) for the first --vis-channels channels of every layer, saved as "
        "crops/<layer>/vis_<channel>.png and shown on the channel pages. CPU cost grows with "
        "channels x steps x size^2: at the defaults a late EfficientNet-Lite0 block takes "
        "some seconds per channel on a CPU (22 s on one busy core), a few minutes per layer. "
        "Finished batches are kept, so a rerun or --resume does not redo them.")
    g.add_argument("--visualize", action="store_true",
                   help="add feature visualisations to the channel pages")
    g.add_argument("--vis-channels", type=_channel_limit, default=VIS_CHANNELS,
                   metavar="N|all", help=f"channels visualised per layer, the first N "
                                         f"(default {VIS_CHANNELS}; 'all' for every channel)")
    g.add_argument("--vis-steps", type=int, default=VIS_STEPS,
                   help=f"optimisation steps per image ({VIS_STEPS})")
    g.add_argument("--vis-size", type=int, default=VIS_SIZE,
                   help=f"visualisation size in pixels ({VIS_SIZE})")
    g.add_argument("--vis-batch", type=int, default=VIS_BATCH,
                   help=f"channels optimised together in one batch ({VIS_BATCH})")
    add_quiet_arg(p)
    add_json_arg(p, "the summary (images, skipped, layers, dead channels per layer)")
    p.set_defaults(func=run_atlas)


class _Progress:
    """``atlas: 640/5000 images  41.3 images/s  ETA 1:45`` on stderr, at most every 2 s."""

    def __init__(self, world: int, enabled: bool):
        self.world = world
        self.enabled = enabled
        self.last = 0.0

    def __call__(self, done: int, total: int, elapsed: float) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 2.0 and done < total):
            return
        self.last = now
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else float("nan")
        eta_text = f"{int(eta) // 60}:{int(eta) % 60:02d}" if eta == eta else "?"
        scope = f" (rank 0 of {self.world}, x{self.world} overall)" if self.world > 1 else ""
        print(f"atlas: {done}/{total} images  {rate:.1f} images/s  ETA {eta_text}{scope}",
              file=sys.stderr, flush=True)

    def phase(self, name: str, done: int, total: int | None) -> None:
        """The other phases (compile warm-up, crops, HTML): a line at start and end."""
        if self.enabled and name != "atlas images" and (done == 0 or done == total):
            print(f"{name}: {done}/{total}", file=sys.stderr, flush=True)


def run_atlas(args: argparse.Namespace) -> int:
    """``convscope atlas``."""
    import torch

    from convscope.atlas import build
    from convscope.models import load_model

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = args.device
    started_group = False
    if world > 1:
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if use_cuda:
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
            started_group = True
    try:
        rank = torch.distributed.get_rank() if world > 1 else 0
        loaded = load_model(args.model, args.weights, device, arch=args.arch,
                            num_classes=args.num_classes)
        atlas = build(
            loaded, args.data, args.layers, args.topk, rank_by=args.rank_by,
            batch_size=args.batch_size, workers=args.workers, out=args.out,
            resume=args.resume, force=args.force, checkpoint_every=args.checkpoint_every,
            fused=args.fused, crops=not args.no_crops, crop_size=args.crop_size,
            progress=(shown := _Progress(world, enabled=not args.quiet and rank == 0)),
            phases=shown.phase,
        )
        if rank == 0 and args.visualize:
            _visualize(loaded, atlas, args)
        if rank == 0:
            _summary(atlas, args.out, as_json=args.json)
    finally:
        if started_group:
            torch.distributed.destroy_process_group()
    return 0


def _visualize(loaded: Any, atlas: Any, args: argparse.Namespace) -> None:
    """``--visualize``: the channels' feature visualisations, then the pages again."""
    from pathlib import Path

    from convscope.atlas.html import write_html
    from convscope.featvis.atlas import visualize_atlas

    from .progress import bar

    with bar(args, unit="step") as progress:
        visualize_atlas(loaded, atlas, args.out, channels=args.vis_channels,
                        steps=args.vis_steps, size=args.vis_size, batch_size=args.vis_batch,
                        progress=progress)
    write_html(atlas, Path(args.out))


def _summary(atlas: Any, out: str, *, as_json: bool = False) -> None:
    dead = sum(len(atlas.dead(layer)) for layer in atlas.layers)
    if as_json:
        import json

        json.dump({
            "out": out, "index_html": f"{out}/index.html", "images": len(atlas.images),
            "skipped": atlas.skipped, "layers": list(atlas.layers),
            "dead": {layer: [int(c) for c in atlas.dead(layer)] for layer in atlas.layers},
        }, sys.stdout, indent=1)
        print()
        return
    print(f"atlas of {len(atlas.images)} images ({len(atlas.skipped)} skipped), "
          f"{len(atlas.layers)} layers, {dead} dead channels -> {out}/index.html")
    for entry in atlas.skipped[:10]:
        print(f"  skipped {entry['path']}: {entry['error']}", file=sys.stderr)
    if len(atlas.skipped) > 10:
        print(f"  ... and {len(atlas.skipped) - 10} more (atlas.json lists all)", file=sys.stderr)
