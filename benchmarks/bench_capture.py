"""Capture overhead and memory against a plain forward pass and peer extractors."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
import torchvision
from torch import nn

from timing import median_time

TITLE = "Capturing activations (VGG16 and ResNet50, batch 8, 224x224)"


def _conv_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


def _speed(repeats: int) -> list[tuple[str, float, str]]:
    from torchvision.models.feature_extraction import create_feature_extractor

    from convscope import capture

    torch.manual_seed(0)
    model = torchvision.models.vgg16().eval()
    x = torch.randn(8, 3, 224, 224)
    convs = _conv_names(model)
    rows: list[tuple[str, float, str]] = []

    def plain() -> None:
        with torch.no_grad():
            model(x)

    def ours() -> None:
        with torch.no_grad(), capture(model, nn.Conv2d) as acts:
            model(x)
        assert len(acts) == len(convs)

    extractor = create_feature_extractor(model, return_nodes=convs)

    def fx() -> None:
        with torch.no_grad():
            extractor(x)

    def ours_eager() -> None:
        with torch.no_grad(), capture(model, nn.Conv2d, copy=True):
            model(x)

    base = median_time(plain, repeats)
    rows.append(("plain forward", base, "baseline"))
    rows.append(("convscope.capture (13 conv outputs; every one is rewritten by an in-place "
                 "ReLU, so copy-on-write copies each, exact pre-ReLU values)",
                 median_time(ours, repeats), ""))
    rows.append(("convscope.capture, copy=True (copy every output at once)",
                 median_time(ours_eager, repeats), ""))
    rows.append(("torchvision create_feature_extractor (same nodes; post-ReLU values)",
                 median_time(fx, repeats), ""))
    try:
        from captum.attr import LayerActivation

        layers = [model.features[int(name.split(".")[1])] for name in convs]
        captum = LayerActivation(model, layers)

        def run_captum() -> None:
            captum.attribute(x)

        rows.append(("Captum LayerActivation (same layers)", median_time(run_captum, repeats), ""))
    except ImportError as error:  # pragma: no cover - optional peer
        rows.append(("Captum LayerActivation", float("nan"), f"not installed: {error}"))
    try:
        import torchlens

        def run_torchlens() -> None:
            with torch.no_grad():
                torchlens.trace(model, x)

        rows.append(("TorchLens trace (records every op; no per-layer selection used)",
                     median_time(run_torchlens, max(1, repeats // 2)), ""))
    except Exception as error:
        rows.append(("TorchLens trace", float("nan"), f"failed: {str(error)[:80]}"))
    rows = [(name, seconds, note or f"{seconds / base:.3f}x") for name, seconds, note in rows]
    # A network whose conv outputs are not rewritten in place: nothing needs copying.
    resnet = torchvision.models.resnet50().eval()
    resnet_convs = _conv_names(resnet)

    def resnet_plain() -> None:
        with torch.no_grad():
            resnet(x)

    def resnet_ours() -> None:
        with torch.no_grad(), capture(resnet, nn.Conv2d) as acts:
            resnet(x)
        assert len(acts) == len(resnet_convs)

    resnet_fx = create_feature_extractor(resnet, return_nodes=resnet_convs)

    def resnet_extract() -> None:
        with torch.no_grad():
            resnet_fx(x)

    resnet_base = median_time(resnet_plain, repeats)
    for name, fn in ((f"ResNet50: convscope.capture ({len(resnet_convs)} conv outputs, no "
                      "in-place successor, nothing copied)", resnet_ours),
                     ("ResNet50: create_feature_extractor (same nodes)", resnet_extract)):
        seconds = median_time(fn, repeats)
        rows.append((name, seconds, f"{seconds / resnet_base:.3f}x of ResNet50's "
                                    f"{resnet_base:.3f} s"))
    return rows


_MEMORY_SCRIPT = r"""
import json, sys, threading, time, torch, torchvision
from torch import nn
from convscope import capture
PAGE = 4096
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE
torch.manual_seed(0)
model = torchvision.models.vgg16().eval()
x = torch.randn(8, 3, 224, 224)
mode = sys.argv[1]
peak = 0
stop = False
def sample():
    global peak
    while not stop:
        peak = max(peak, rss())
        time.sleep(0.0005)
with torch.no_grad():
    model(x)  # warm-up
    base = rss()
    thread = threading.Thread(target=sample)
    thread.start()
    held = 0
    if mode == "plain":
        model(x)
    else:
        dtype = torch.float16 if mode == "fp16" else None
        with capture(model, nn.Conv2d, dtype=dtype) as acts:
            model(x)
        held = acts.nbytes()
    stop = True
    thread.join()
print(json.dumps({"peak_mib": (peak - base) / 2**20, "held_mib": held / 2**20}))
"""


def _memory() -> dict[str, dict[str, float]]:
    results = {}
    for mode in ("plain", "fp32", "fp16"):
        out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, mode], capture_output=True,
                             text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def run(quick: bool = False) -> str:
    """Markdown section: speed ratios and peak memory."""
    repeats = 2 if quick else 5
    rows = _speed(repeats)
    lines = [
        f"Median of {repeats} runs after a warm-up, `torch.no_grad()`, random-init VGG16.",
        "",
        "| method | seconds | vs plain forward |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {seconds:.3f} | {note} |" for name, seconds, note in rows]
    memory = _memory()
    plain = memory["plain"]["peak_mib"]
    lines += [
        "",
        "Peak resident memory above the state before the forward (model, input and a warm-up "
        "forward already in place), sampled every 0.5 ms from /proc, each mode in a fresh "
        "process:",
        "",
        "| mode | activations held (MiB) | peak growth (MiB) | growth above plain forward (MiB) |",
        "|---|---:|---:|---:|",
    ]
    for mode, label in (("plain", "plain forward"), ("fp32", "capture 13 convs, float32"),
                        ("fp16", "capture 13 convs, float16")):
        entry = memory[mode]
        lines.append(f"| {label} | {entry['held_mib']:.0f} | {entry['peak_mib']:.0f} | "
                     f"{entry['peak_mib'] - plain:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
