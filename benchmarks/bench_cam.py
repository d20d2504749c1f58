"""Grad-CAM speed and memory against a full forward+backward and the peer libraries;
Score-CAM against TorchCAM's; Faster Score-CAM's agreement and speed-up; peers' maps on
the two layers where a naive implementation goes wrong.

Peak memory is measured in a fresh subprocess per (model, library), so one library's
allocations do not hide another's: the growth of the process's peak RSS (``ru_maxrss``)
over its RSS just before the first call (torch's CPU allocations are invisible to
tracemalloc). Times come from one subprocess per model in which the libraries take turns,
round by round, so a change in the shared machine's load hits them alike; per image, the
fastest round.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

TITLE = "Attribution: Grad-CAM, Score-CAM and peers"
HERE = Path(__file__).resolve().parent
LAYERS = {"resnet50": "layer4", "vgg16": "features.28"}
LIBS = ["forward+backward", "convscope", "torchcam", "captum", "pytorch-grad-cam"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _module(model, name):
    return dict(model.named_modules())[name]


def _gradcam_runner(lib: str, model, layer: str, x, targets):
    """A zero-argument callable computing Grad-CAM maps at input size with ``lib``."""
    import torch
    import torch.nn.functional as F

    if lib == "forward+backward":
        def run():
            out = model(x)
            out[torch.arange(len(targets)), targets].sum().backward()
            for p in model.parameters():
                p.grad = None
        return run
    if lib == "convscope":
        from convscope.methods.cam import cam
        return lambda: cam(model, x, layer=layer, target=targets)
    if lib == "torchcam":
        from torchcam.methods import GradCAM
        extractor = GradCAM(model, target_layer=layer, input_shape=tuple(x.shape[1:]))

        def run():
            maps = extractor(targets, model(x))[0]
            return F.interpolate(maps[:, None], size=x.shape[-2:], mode="bilinear")
        return run
    if lib == "captum":
        from captum.attr import LayerGradCam
        method = LayerGradCam(model, _module(model, layer))

        def run():
            maps = method.attribute(x, target=targets, relu_attributions=True)
            return F.interpolate(maps, size=x.shape[-2:], mode="bilinear")
        return run
    if lib == "pytorch-grad-cam":
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        extractor = GradCAM(model=model, target_layers=[_module(model, layer)])
        wanted = [ClassifierOutputTarget(t) for t in targets]
        return lambda: extractor(input_tensor=x, targets=wanted)
    raise ValueError(lib)


def worker(config: dict) -> dict:
    """Measure ``config["libs"]`` on one model in this process.

    With one library: its peak RSS growth during the first call (nothing else allocated
    in the process yet). With several: per-image times, the libraries interleaved round
    by round (each on its own copy of the model, so hooks do not meet) so that a change
    in the shared machine's load hits all of them alike; the fastest round counts.
    """
    import copy

    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, config["model"])().eval()
    x = torch.randn(config["batch"], 3, config["size"], config["size"])
    targets = [int(t) for t in torch.randint(0, 1000, (config["batch"],))]
    layer = LAYERS[config["model"]]
    libs = config["libs"]
    if len(libs) == 1:
        run = _gradcam_runner(libs[0], model, layer, x, targets)
        before = _rss_bytes()
        run()
        return {libs[0]: {"peak_bytes": max(0, _peak_bytes() - before)}}
    runs = {lib: _gradcam_runner(lib, copy.deepcopy(model), layer, x, targets) for lib in libs}
    times: dict[str, list[float]] = {lib: [] for lib in libs}
    for run in runs.values():
        run()
    for _ in range(config["reps"]):
        for lib, run in runs.items():
            start = time.perf_counter()
            run()
            times[lib].append(time.perf_counter() - start)
    return {lib: {"seconds_per_image": min(t) / config["batch"]} for lib, t in times.items()}


def _in_subprocess(config: dict) -> dict:
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(config)],
        capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _gradcam_section(quick: bool) -> tuple[str, dict]:
    batch, size, reps = (2, 160, 2) if quick else (4, 224, 4)
    results: dict = {}
    lines = [
        f"Grad-CAM, batch {batch} at {size}x{size} (small enough for 2 CPU cores), random "
        f"weights. Times: one process per model, the libraries interleaved for {reps} rounds "
        "after a warm-up call, fastest round. Time ratio: per-image time / per-image time of "
        "a full forward+backward (parameter gradients included). Peak: one fresh process "
        "per cell, growth of peak RSS over the RSS before the first call.",
        "",
        "| model (layer) | library | ms / image | x forward+backward | peak RSS growth (MB) |",
        "|---|---|---:|---:|---:|",
    ]
    for model in ("resnet50", "vgg16"):
        timing = _in_subprocess({"model": model, "libs": LIBS, "batch": batch, "size": size,
                                 "reps": reps})
        for lib in LIBS:
            memory = _in_subprocess({"model": model, "libs": [lib], "batch": batch,
                                     "size": size, "reps": 0})
            if "error" in timing or "error" in memory:
                results[(model, lib)] = {"error": timing.get("error") or memory.get("error")}
            else:
                results[(model, lib)] = {**timing[lib], **memory[lib]}
        base = results[(model, "forward+backward")].get("seconds_per_image")
        for lib in LIBS:
            cell = results[(model, lib)]
            if "error" in cell:
                lines.append(f"| {model} ({LAYERS[model]}) | {lib} | error: {cell['error']} | | |")
                continue
            ratio = cell["seconds_per_image"] / base if base else float("nan")
            lines.append(
                f"| {model} ({LAYERS[model]}) | {lib} | {cell['seconds_per_image'] * 1e3:.0f} "
                f"| {ratio:.2f}x | {cell['peak_bytes'] / 2**20:.0f} |"
            )
    lines.append("")
    for model in ("resnet50", "vgg16"):
        ours = results[(model, "convscope")]
        if "error" in ours:
            continue
        parts = []
        for lib in ("torchcam", "captum", "pytorch-grad-cam"):
            other = results[(model, lib)]
            if "error" not in other:
                parts.append(
                    f"{lib} takes {other['seconds_per_image'] / ours['seconds_per_image']:.2f}x "
                    f"convscope's time and {other['peak_bytes'] / max(ours['peak_bytes'], 1):.1f}x "
                    "its peak memory growth"
                )
        lines.append(f"- {model}: " + "; ".join(parts) + ".")
    return "\n".join(lines), results


def _pearson(a, b) -> float:
    import torch

    a = torch.as_tensor(a).double().flatten()
    b = torch.as_tensor(b).double().flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _best(fn, reps: int) -> tuple[float, object]:
    """(fastest of ``reps`` timed calls after one untimed call, last result)."""
    value = fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return min(times), value


def _scorecam_section(quick: bool) -> str:
    import torch
    import torch.nn.functional as F
    import torchvision
    from torchcam.methods import ScoreCAM

    from convscope.methods.cam import cam
    from convscope.models import load_model

    reps, chunk = (1, 64) if quick else (3, 64)
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    target = [int(model(x).argmax())]
    extractor = ScoreCAM(model, target_layer="layer4", batch_size=chunk, input_shape=(3, 64, 64))

    def torchcam_run():
        with torch.no_grad():
            scores = model(x)
        maps = extractor(target, scores)[0]
        return F.interpolate(maps[:, None], size=(64, 64), mode="bilinear")[:, 0]

    def ours_run():
        return cam(model, x, layer="layer4", target=target, method="scorecam", batch_size=chunk)

    theirs_t, theirs = _best(torchcam_run, reps)
    ours_t, ours = _best(ours_run, reps)
    extractor.remove_hooks()
    lines = [
        f"Score-CAM speed: ResNet18 (random) `layer4`, 512 channels = 512 masked forward "
        f"passes, 1 image 64x64, {chunk} masked copies per forward pass in both libraries, "
        f"fastest of {reps} calls.",
        "",
        "| library | s / image | convscope speed-up | Pearson r with convscope |",
        "|---|---:|---:|---:|",
        f"| convscope | {ours_t:.2f} | 1.00x | 1.0000 |",
        f"| TorchCAM | {theirs_t:.2f} | {theirs_t / ours_t:.2f}x | {_pearson(ours, theirs):.4f} |",
        "",
    ]
    loaded = load_model("efficientnet_lite0", device="cpu")
    size = 128 if quick else 160
    xs = F.interpolate(loaded.preprocess(["sample:chelsea", "sample:coffee"]), size=(size, size),
                       mode="bilinear", antialias=True)
    net = loaded.module
    full_t, full = _best(lambda: cam(net, xs, layer="_blocks.15", method="scorecam",
                                     batch_size=chunk), 1)
    lines += [
        f"Faster Score-CAM (only the `top_channels` channels of largest spatial variance) "
        f"against full Score-CAM: pretrained EfficientNet-Lite0 `_blocks.15` (320 channels), "
        f"chelsea and coffee at {size}x{size}, top-1 classes. r: Pearson correlation of the "
        "maps, chelsea / coffee (constant map: every weighted sum was negative, so the "
        "ReLU left nothing).",
        "",
        "| method | s / image | speed-up | r vs Score-CAM |",
        "|---|---:|---:|---:|",
        f"| Score-CAM | {full_t / 2:.2f} | 1.0x | 1.0000 |",
    ]
    for top in (10, 32, 96):
        fast_t, fast = _best(lambda top=top: cam(net, xs, layer="_blocks.15",
                                                 method="fasterscorecam", top_channels=top,
                                                 batch_size=chunk), 1)
        rs = []
        for i in range(2):
            r = _pearson(full[i], fast[i])
            rs.append("constant map" if r != r else f"{r:.4f}")  # NaN: every weight < 0
        lines.append(f"| Faster Score-CAM, top {top} | {fast_t / 2:.2f} | {full_t / fast_t:.1f}x "
                     f"| {' / '.join(rs)} |")
    return "\n".join(lines)


def _correctness_section() -> str:
    """Peers' Grad-CAM on VGG16 features.28 (in-place ReLU follows) and Lite0's _swish
    (one module called twice), as Pearson r against convscope's map."""
    import copy

    import torch
    import torch.nn.functional as F
    import torchvision
    from captum.attr import LayerGradCam
    from pytorch_grad_cam import GradCAM as PgcGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from torchcam.methods import GradCAM as TcGradCAM

    from convscope.images import load_image
    from convscope.methods.cam import cam
    from convscope.models import Preprocess, load_model

    rows = []
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16().eval()
    lite = load_model("efficientnet_lite0", device="cpu")
    cases = [
        ("VGG16 (random) `features.28`", vgg, "features.28",
         Preprocess()(load_image("sample:chelsea"))[None]),
        ("EfficientNet-Lite0 (pretrained) `_swish`", lite.module, "_swish",
         lite.preprocess("sample:chelsea")),
    ]
    for label, model, layer, x in cases:
        target = [int(model(x).argmax())]
        ours = cam(model, x, layer=layer, target=target)
        size = x.shape[-2:]
        peer = copy.deepcopy(model)
        captum = LayerGradCam(peer, _module(peer, layer)).attribute(x, target=target,
                                                                   relu_attributions=True)
        captum = F.interpolate(captum.detach(), size=size, mode="bilinear")[:, 0]
        peer = copy.deepcopy(model)
        with TcGradCAM(peer, target_layer=layer, input_shape=tuple(x.shape[1:])) as ext:
            tc = ext(target, peer(x))[0]
        tc = F.interpolate(tc[:, None], size=size, mode="bilinear")[:, 0]
        peer = copy.deepcopy(model)
        with PgcGradCAM(model=peer, target_layers=[_module(peer, layer)]) as ext:
            pgc = ext(input_tensor=x, targets=[ClassifierOutputTarget(target[0])])
        rows.append(f"| {label} | {_pearson(ours, captum):.3f} | {_pearson(ours, tc):.3f} | "
                    f"{_pearson(ours, pgc):.3f} |")
    return "\n".join([
        "Peers' Grad-CAM maps against convscope's on the chelsea photo, Pearson r at input "
        "size (1.000 = same map). convscope differentiates the layer's true output (the "
        "in-place ReLU modifies a copy) and explains the last call of a reused module.",
        "",
        "| layer | Captum | TorchCAM | pytorch-grad-cam |",
        "|---|---:|---:|---:|",
        *rows,
    ])


def run(quick: bool = False) -> str:
    """The Markdown section for docs/benchmarks.md."""
    gradcam, _ = _gradcam_section(quick)
    note = ("Measured on a 2-core machine shared with other jobs: single timings vary by up "
            "to 2x between runs (memory figures are stable); read ratios, not milliseconds.")
    return "\n\n".join([
        note,
        "### Grad-CAM speed and memory\n\n" + gradcam,
        "### Score-CAM and Faster Score-CAM\n\n" + _scorecam_section(quick),
        "### Where peers' maps differ\n\n" + _correctness_section(),
    ])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        print(run(quick="--quick" in sys.argv))
