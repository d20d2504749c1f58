"""Capture overhead and memory against a plain forward pass and peer extractors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import torch
import torchvision
from torch import nn

TITLE = "Capturing activations (every conv layer; batch 1 and 8, 224x224)"

# (label, model builder, batch size): the batch-1 models and the batch-8 pair.
CASES = (
    ("EfficientNet-Lite0 (bundled)", "efficientnet_lite0", 1),
    ("MobileNetV3-small", "mobilenet_v3_small", 1),
    ("ResNet50", "resnet50", 1),
    ("VGG16", "vgg16", 1),
    ("ResNet50", "resnet50", 8),
    ("VGG16", "vgg16", 8),
)


def _conv_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "efficientnet_lite0":
        from convscope import load_model

        return load_model(name, device="cpu").module
    return getattr(torchvision.models, name)().eval()


def _methods(model: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Plain forward, convscope's three ways, naive hooks and torchvision's extractor."""
    from torchvision.models.feature_extraction import create_feature_extractor

    from convscope import capture

    convs = _conv_names(model)
    modules = dict(model.named_modules())
    try:
        extractor = create_feature_extractor(model, return_nodes=convs)
        copying = _copying_extractor(create_feature_extractor(model, return_nodes=convs),
                                     convs)
    except Exception:  # FX cannot trace it (or names differ): no extractor rows
        extractor = copying = None

    def plain() -> None:
        with torch.no_grad():
            model(x)

    def ours() -> None:
        with torch.no_grad(), capture(model, nn.Conv2d) as acts:
            model(x)
        assert len(acts) == len(convs)

    def ours_inference() -> None:
        with torch.inference_mode(), capture(model, nn.Conv2d):
            model(x)

    def ours_copy() -> None:
        with torch.no_grad(), capture(model, nn.Conv2d, copy=True):
            model(x)

    def naive(clone: bool) -> Callable[[], None]:
        def run() -> None:
            kept: list[torch.Tensor] = []
            handles = [modules[n].register_forward_hook(
                lambda _m, _i, out: kept.append(out.detach().clone() if clone else out))
                for n in convs]
            try:
                with torch.no_grad():
                    model(x)
            finally:
                for handle in handles:
                    handle.remove()
        return run

    def fx() -> None:
        with torch.no_grad():
            extractor(x)

    def fx_copy() -> None:
        with torch.no_grad():
            copying(x)

    methods = {"plain": plain, "ours": ours, "inference": ours_inference, "copy": ours_copy,
               "naive_clone": naive(True), "naive_alias": naive(False), "fx": fx,
               "fx_copy": fx_copy}
    if extractor is None:
        del methods["fx"], methods["fx_copy"]
    return methods


def _copying_extractor(extractor: torch.fx.GraphModule, names: list[str]
                       ) -> torch.fx.GraphModule:
    """The extractor with a ``clone`` right after each returned conv, inside the graph: the
    exact values at the least possible cost (no Python runs per output), the floor for
    any method that must copy (VGG's in-place ReLU rewrites every conv output)."""
    graph = extractor.graph
    wanted = set(names)
    clones = {}
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target in wanted:
            with graph.inserting_after(node):
                clones[node] = graph.call_method("clone", (node,))
    output = next(node for node in graph.nodes if node.op == "output")
    output.args = (torch.fx.node.map_arg(output.args[0], lambda n: clones.get(n, n)),)
    extractor.recompile()
    return extractor


LABELS = {
    "plain": "plain forward (`no_grad`)",
    "ours": "**convscope.capture, default** (`copy=\"auto\"`, exact)",
    "inference": "convscope.capture under `inference_mode` (copies at once, exact)",
    "copy": "convscope.capture, `copy=True` (exact)",
    "naive_clone": "plain hooks + `clone()` (exact)",
    "naive_alias": "plain hooks keeping the output, no copy (wrong where an in-place op "
                   "follows; the cost of holding the memory alone)",
    "fx": "torchvision `create_feature_extractor` (post-ReLU values where ReLU is in place)",
    "fx_copy": "the same with a copy of each conv output inside the graph (exact; no Python "
               "per output: the floor for copying)",
}


def _exactness(model: nn.Module, x: torch.Tensor) -> tuple[bool, int, int]:
    """Default capture equals clone-at-hook-time for every conv; bytes held vs requested."""
    from convscope import capture

    modules = dict(model.named_modules())
    truth: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_hook(
        lambda _m, _i, out, n=n: truth.__setitem__(n, out.detach().clone()))
        for n in _conv_names(model)]
    with torch.no_grad():
        expected_out = model(x)
    for handle in handles:
        handle.remove()
    with torch.no_grad(), capture(model, nn.Conv2d) as acts:
        out = model(x)
    exact = torch.equal(out, expected_out) and all(
        torch.equal(acts[name], value) for name, value in truth.items())
    requested = sum(value.element_size() * value.nelement() for value in truth.values())
    return exact, acts.nbytes(), requested


def _faults() -> int:
    """Minor page faults of this process so far (fresh pages the kernel had to supply)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _measure_case(name: str, batch: int, rounds: int, only: list[str] | None) -> dict:
    """Times (median of warm repeats) and page faults per call of every method, one case.

    Each round calls every method twice in a row and times the second call: the timed
    call finds the memory as its own previous call left it, not as another method left
    it (a method that just freed hundreds of MiB would otherwise make the next one,
    plain forwards included, pay for fresh pages).
    """
    import statistics
    import time

    model = _build(name)
    torch.manual_seed(1)
    x = torch.randn(batch, 3, 224, 224)
    exact, held, requested = _exactness(model, x)
    methods = _methods(model, x)
    if only:
        methods = {key: fn for key, fn in methods.items() if key in only}
    for fn in methods.values():
        fn()
    times: dict[str, list[float]] = {key: [] for key in methods}
    faults: dict[str, int] = {}
    for _ in range(rounds):
        for key, fn in methods.items():
            fn()
            before = _faults()
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
            faults[key] = _faults() - before
    return {"times": {key: statistics.median(v) for key, v in times.items()},
            "faults": faults, "exact": exact, "held": held, "requested": requested,
            "convs": len(_conv_names(model))}


def _case_in_subprocess(name: str, batch: int, rounds: int, only: list[str] | None = None,
                        env: dict[str, str] | None = None) -> dict:
    """One case in a fresh process (its own allocator state), with extra environment."""
    import os

    command = [sys.executable, __file__, "--case", name, str(batch), str(rounds)]
    if only:
        command += ["--only", ",".join(only)]
    out = subprocess.run(command, capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


#: Fresh processes per goal case: a process's calls meet fresh pages or not depending on
#: where glibc's heap top lies, so one process per case is one draw of that.
GOAL_PROCESSES = 3


def _speed(rounds: int, quick: bool) -> list[str]:
    """Table rows. Goal cases (VGG16, ResNet50) run in GOAL_PROCESSES fresh processes: the
    ms and page faults are the median over processes, the ratio is the median of the
    processes' ratios with their range."""
    import statistics

    rows = []
    for label, name, batch in CASES:
        if quick and batch > 1:
            continue
        draws = 1 if quick or name not in ("resnet50", "vgg16") else GOAL_PROCESSES
        results = [_case_in_subprocess(name, batch, rounds if batch == 1 else max(3, rounds // 2))
                   for _ in range(draws)]
        first = results[0]
        exact = all(result["exact"] for result in results)
        same_bytes = all(result["held"] == result["requested"] for result in results)
        for key in first["times"]:
            seconds = statistics.median(result["times"][key] for result in results)
            ratios = [result["times"][key] / result["times"]["plain"] for result in results]
            faults = statistics.median(result["faults"][key] for result in results)
            ratio = f"{statistics.median(ratios):.3f}x"
            if draws > 1:
                ratio += f" ({min(ratios):.3f}-{max(ratios):.3f})"
            note = ""
            if key == "ours":
                note = (f" values exact: {'yes' if exact else 'NO'}; held "
                        f"{first['held'] / 2**20:.1f} MiB = requested "
                        f"{first['requested'] / 2**20:.1f} MiB"
                        + ("" if same_bytes else " (DIFFERS)"))
            rows.append(f"| {label} | {batch} | {first['convs']} | {LABELS[key]}{note} | "
                        f"{seconds * 1000:.1f} | {ratio} | {int(faults):,} |")
    return rows


ENV_METHODS = ["plain", "ours", "copy", "naive_alias", "fx"]


# glibc keeps freed memory instead of returning it to the kernel (no trimming, no mmap for
# large blocks): the process-wide knob that removes fresh pages, set here for the child only.
KEEP_FREED = {"MALLOC_TRIM_THRESHOLD_": str(2**33), "MALLOC_MMAP_THRESHOLD_": str(2**32),
              "MALLOC_TOP_PAD_": "0"}


def _env_rows(rounds: int, quick: bool, env: dict[str, str], batches: tuple[int, ...]
              ) -> list[str]:
    """The goal cases again in a child process with extra environment (allocator knobs)."""
    rows = []
    for label, name, batch in CASES:
        if name not in ("resnet50", "vgg16") or batch not in batches or (quick and batch > 1):
            continue
        result = _case_in_subprocess(name, batch, rounds if batch == 1 else max(3, rounds // 2),
                                     ENV_METHODS, env)
        times, faults = result["times"], result["faults"]
        for key in ENV_METHODS:
            rows.append(f"| {label} | {batch} | {LABELS[key].split(' (')[0]} | "
                        f"{times[key] * 1000:.1f} | {times[key] / times['plain']:.3f}x | "
                        f"{faults[key]:,} |")
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


def run(quick: bool = False, thp: bool = False) -> str:
    """Markdown section: speed ratios and peak memory (``thp``: add the huge-page table,
    ``python benchmarks/bench_capture.py --thp``; left out of ``make bench`` for time)."""
    rounds = 3 if quick else 9
    rows = _speed(rounds, quick)
    thp_rows = _env_rows(rounds, quick, {"THP_MEM_ALLOC_ENABLE": "1"}, (1, 8)) if thp else []
    keep_rows = _env_rows(rounds, quick, KEEP_FREED, (1, 8))
    lines = [
        f"Each case in a fresh process. Median of {rounds} rounds (batch 8: "
        f"{max(3, rounds // 2)}) after a warm-up; each round calls every method twice in a "
        "row and times the second call (so each method meets the memory as its own last call "
        "left it, and load drift hits all alike). The goal cases (VGG16, ResNet50) run in "
        f"{GOAL_PROCESSES} fresh processes each: ms and page faults are the medians over the "
        "processes, 'vs plain' the median of their ratios with the range in brackets. Page "
        "faults: minor faults during one timed "
        "call (each is a fresh 4 KiB page the kernel must supply and zero). Random-init "
        f"weights except the bundled model; {torch.get_num_threads()} torch threads. Goal: "
        "the default at most 1.10x at batch 1 and 1.05x at batch 8 (VGG16, ResNet50), with "
        "exact values.",
        "",
        "| model | batch | convs | method | ms | vs plain | page faults |",
        "|---|---:|---:|---|---:|---:|---:|",
        *rows,
    ]
    if thp_rows:
        lines += [
            "",
            "The same goal cases with PyTorch's own huge-page allocation for large CPU "
            "tensors (`THP_MEM_ALLOC_ENABLE=1`, read once when torch starts; a setting of the "
            "whole process that convscope, a library, does not make for its users):",
            "",
            "| model | batch | method | ms | vs plain | page faults |",
            "|---|---:|---|---:|---:|---:|",
            *thp_rows,
        ]
    lines += [
        "",
        "The goal cases with glibc told to keep freed memory in the process "
        "(`MALLOC_TRIM_THRESHOLD_=2**33`, `MALLOC_MMAP_THRESHOLD_=2**32`, `MALLOC_TOP_PAD_=0`; "
        "again a process-wide setting that convscope does not make): no call needs fresh "
        "pages, so what remains above the plain forward is the cost of writing the held "
        "outputs to memory that the plain forward would have reused while still in cache:",
        "",
        "| model | batch | method | ms | vs plain | page faults |",
        "|---|---:|---|---:|---:|---:|",
        *keep_rows,
    ]
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
    if "--case" in sys.argv:  # one case in this process (see _case_in_subprocess)
        at = sys.argv.index("--case")
        only = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None
        print(json.dumps(_measure_case(sys.argv[at + 1], int(sys.argv[at + 2]),
                                       int(sys.argv[at + 3]), only)))
    else:
        print(run(quick="--quick" in sys.argv, thp="--thp" in sys.argv))
