"""Capture overhead and memory against a plain forward pass and peer extractors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from timing import interleaved_medians

TITLE = "Capturing activations (VGG16 and ResNet50, batch 8, 224x224)"


def _conv_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


def _extractors(model: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Plain forward, convscope (two copy modes) and torchvision's extractor on all convs."""
    from torchvision.models.feature_extraction import create_feature_extractor

    from convscope import capture

    convs = _conv_names(model)
    extractor = create_feature_extractor(model, return_nodes=convs)

    def plain() -> None:
        with torch.no_grad():
            model(x)

    def ours() -> None:
        with torch.no_grad(), capture(model, nn.Conv2d) as acts:
            model(x)
        assert len(acts) == len(convs)

    def ours_eager() -> None:
        with torch.no_grad(), capture(model, nn.Conv2d, copy=True):
            model(x)

    def fx() -> None:
        with torch.no_grad():
            extractor(x)

    return {"plain": plain, "ours": ours, "eager": ours_eager, "fx": fx}


def _speed(rounds: int) -> list[tuple[str, float, str]]:
    torch.manual_seed(0)
    model = torchvision.models.vgg16().eval()
    x = torch.randn(8, 3, 224, 224)
    convs = _conv_names(model)
    fns = _extractors(model, x)
    from captum.attr import LayerActivation

    captum = LayerActivation(model, [model.features[int(n.split(".")[1])] for n in convs])
    fns["captum"] = lambda: captum.attribute(x)
    try:
        import torchlens

        def run_torchlens() -> None:
            with torch.no_grad():
                torchlens.trace(model, x)

        fns["torchlens"] = run_torchlens
    except ImportError:  # pragma: no cover - optional peer
        pass
    vgg = interleaved_medians(fns, rounds)
    labels = {
        "plain": "plain forward",
        "ours": "convscope.capture (13 conv outputs, exact pre-ReLU values: each following "
                "ReLU(inplace=True) sits in an nn.Sequential and runs out of place, so "
                "nothing is copied)",
        "eager": "convscope.capture, copy=True (copy every output at once)",
        "fx": "torchvision create_feature_extractor (same nodes; post-ReLU values)",
        "captum": "Captum LayerActivation (same layers)",
        "torchlens": "TorchLens trace (records every op; no per-layer selection used)",
    }
    rows = [(f"VGG16: {labels[key]}", seconds, f"{seconds / vgg['plain']:.3f}x")
            for key, seconds in vgg.items()]
    resnet = torchvision.models.resnet50().eval()
    timings = interleaved_medians(_extractors(resnet, x), rounds)
    count = len(_conv_names(resnet))
    resnet_labels = {
        "plain": "plain forward",
        "ours": f"convscope.capture ({count} conv outputs; a BatchNorm follows each, "
                "nothing is copied)",
        "eager": "convscope.capture, copy=True",
        "fx": "torchvision create_feature_extractor (same nodes)",
    }
    rows += [(f"ResNet50: {resnet_labels[key]}", seconds,
              f"{seconds / timings['plain']:.3f}x") for key, seconds in timings.items()]
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
    rounds = 2 if quick else 7
    rows = _speed(rounds)
    lines = [
        f"Median of {rounds} rounds after a warm-up; each round calls every method once in "
        "turn (so load drift hits all alike); `torch.no_grad()`, random-init weights.",
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
