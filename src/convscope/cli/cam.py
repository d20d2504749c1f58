"""``convscope cam``: class activation map overlays for the top-k classes of an image."""

from __future__ import annotations

import argparse
import html
import re
import sys
from pathlib import Path

from ..methods import CAM_METHODS
from .common import (
    add_json_arg,
    add_layer_args,
    add_model_args,
    add_quiet_arg,
    load_model_from_args,
    single_layer,
)
from .progress import Steps, bar


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``cam`` subcommand."""
    p = subparsers.add_parser(
        "cam", help="class activation maps (Grad-CAM & co.) over an image, top-k classes",
        description="Write one overlay per explained class (file name: rank, class name, "
                    "probability) and an index.html to --out.",
    )
    p.add_argument("image", help="image path or sample:NAME (chelsea, coffee, rocket, astronaut)")
    add_model_args(p)
    add_layer_args(p, help="the layer to explain (one; default: the last spatial layer)")
    p.add_argument("--call", type=int, default=-1,
                   help="which call of a module run several times per forward (default last)")
    p.add_argument("--method", default="gradcam", choices=CAM_METHODS,
                   help="CAM method (default gradcam)")
    p.add_argument("--target", "-t", action="append",
                   help="class index or name to explain instead of the top-k; repeatable")
    p.add_argument("--topk", "-k", type=int, default=3, help="explain the k best classes (3)")
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity (0.5)")
    p.add_argument("--cmap", default="jet", help="matplotlib colour map (jet)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="samples per forward pass (Score-/Ablation-CAM copies) (32)")
    p.add_argument("--sanity", action="store_true",
                   help="also run the model-randomisation sanity check and print its table")
    p.add_argument("--sanity-steps", type=int, default=8,
                   help="randomisation steps of the sanity check (8)")
    p.add_argument("--out", "-o", default="cam-out", help="output folder (cam-out)")
    add_quiet_arg(p)
    add_json_arg(p, "the overlays written (and the sanity report)")
    p.set_defaults(func=run_cam)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60] or "class"


def run_cam(args: argparse.Namespace) -> int:
    """``convscope cam``."""
    from convscope.errors import ConvscopeError, TargetError
    from convscope.images import load_image
    from convscope.methods.cam import _one_layer, cam
    from convscope.render.overlay import overlay

    if args.topk < 1:
        raise ConvscopeError("--topk must be at least 1")
    steps = Steps(5 + bool(args.sanity), quiet=args.quiet, title="cam")
    with steps.step("loading image"):
        image = load_image(args.image)
    with steps.step(f"loading model {args.model}"):
        model = load_model_from_args(args)
        x = model.preprocess(image)
    with steps.step("predicting"):
        ranking = model.predict(x, k=100_000)[0]  # every class, best first
        by_index = {p.index: p for p in ranking}
        picked = ranking[: args.topk]
        if args.target:
            picked = []
            for t in args.target:
                index = model.class_index(t)
                if index not in by_index:
                    raise TargetError(
                        f"--target {t}: class index out of range (the model has "
                        f"{len(ranking)} classes, 0..{len(ranking) - 1})"
                    )
                picked.append(by_index[index])
        layer_name = _one_layer(model.module, single_layer(args.layers, "cam"), x)[0]
    passes = bar(args, unit="batches")
    with steps.step(f"{args.method} at {layer_name} for {len(picked)} class(es)"), passes:
        maps = cam(model, x.expand(len(picked), -1, -1, -1), layer=layer_name,
                   target=[p.index for p in picked], method=args.method, call=args.call,
                   batch_size=args.batch_size, progress=passes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    display = model.transform.to_display(x[0]).cpu()
    files = []
    with steps.step("writing overlays"):
        for rank, (pred, heat) in enumerate(zip(picked, maps, strict=True), start=1):
            name = f"{rank:02d}_{_slug(pred.label)}_{pred.probability:.3f}.png"
            overlay(display, heat, alpha=args.alpha, cmap=args.cmap).save(out / name)
            files.append((name, pred))
        _write_index(out, args, model.name, layer_name, files)
    if not args.json:
        print(f"layer {layer_name}, method {args.method}; wrote {len(files)} overlay(s) and "
              f"{out / 'index.html'}")
        for name, pred in files:
            print(f"  {pred.label} ({pred.probability:.3f}): {out / name}")
    report = None
    if args.sanity:
        from convscope.methods.sanity import sanity_check

        with steps.step("sanity check (cascading randomisation)"):
            report = sanity_check(model, x, method=args.method, layer=layer_name,
                                  target=[picked[0].index], call=args.call,
                                  steps=args.sanity_steps,
                                  progress=bar(args, unit="steps"))
        if not args.json:
            print(report.table())
    if args.json:
        import json

        json.dump({
            "model": model.name, "layer": layer_name, "method": args.method,
            "call": args.call, "index_html": str(out / "index.html"),
            "overlays": [{"file": str(out / name), "index": pred.index, "label": pred.label,
                          "probability": pred.probability} for name, pred in files],
            "sanity": report.as_dict() if report is not None else None,
        }, sys.stdout, indent=1)
        print()
    sys.stdout.flush()
    return 0


def _write_index(out: Path, args: argparse.Namespace, model_name: str, layer: str,
                 files: list) -> None:
    rows = "\n".join(
        f'<figure><img src="{html.escape(name)}" alt="{html.escape(pred.label)}">'
        f"<figcaption>{html.escape(pred.label)} (class {pred.index}): "
        f"{pred.probability:.3f}</figcaption></figure>"
        for name, pred in files
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>convscope cam</title>
<style>body{{font-family:sans-serif;margin:1.5em}}figure{{display:inline-block;margin:.5em}}
img{{width:224px;image-rendering:pixelated}}</style></head><body>
<h1>{html.escape(args.method)}: {html.escape(str(args.image))}</h1>
<p>model {html.escape(model_name)}, layer <code>{html.escape(layer)}</code>
(call {args.call})</p>
{rows}
</body></html>
"""
    (out / "index.html").write_text(page, encoding="utf-8")
