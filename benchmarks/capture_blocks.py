"""Capture methods side by side in one process, in interleaved blocks of forwards.

Not part of ``make bench``: a tool for A/B checks of capture's own overhead, steadier than
one timed call per round (each block runs one method several times in a row, blocks of all
methods alternate, and the median block is kept). Compare two versions of convscope by
running it once per version in fresh processes, e.g. with ``PYTHONPATH`` pointing at a
copy of the older package::

    OMP_NUM_THREADS=2 python benchmarks/capture_blocks.py resnet50 1 --blocks 16 --per 10
    MALLOC_TRIM_THRESHOLD_=8589934592 MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=0 \\
        python benchmarks/capture_blocks.py resnet50 1   # glibc keeping freed memory

Each method prints its median block time, the ratio of medians against ``plain``, and the
median of the per-round paired ratios with their interquartile range.

Methods: those of ``bench_capture.py`` (``plain``, ``ours`` = the default ``capture()``,
``inference``, ``copy``, ``naive_clone``, ``naive_alias`` = hooks keeping each output
without a copy, ``fx`` and ``fx_copy`` when the model traces), ``nocopy``
(``capture(copy=False)``) and ``thp_copy`` (hooks copying into huge-page memory of their
own; see docs/benchmarks.md, "What stop 20 tried").
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

HUGE_PAGE = 2**21


def _huge_page_empty_like(tensor: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor like ``tensor`` in its own anonymous mapping, 2 MiB aligned
    and advised for transparent huge pages (``MADV_HUGEPAGE``; THP is "madvise" here), so
    that filling it faults in 2 MiB pages instead of 4 KiB ones. Small tensors: ``empty_like``."""
    size = tensor.numel() * tensor.element_size()
    if size < 4 * 2**20:
        return torch.empty_like(tensor)
    mapping = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    start = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    raw = torch.frombuffer(mapping, dtype=torch.uint8, count=size, offset=-start % HUGE_PAGE)
    return raw.view(tensor.dtype).view(tensor.shape)


def methods(model: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], None]]:
    """bench_capture's methods, plus ``capture(copy=False)`` ("nocopy") and hooks copying
    each conv output into memory of its own on huge pages ("thp_copy", an experiment:
    exact, and the model's own memory is reused as in a plain forward)."""
    from bench_capture import _conv_names, _methods
    from convscope import capture
    from convscope.hooks import forward_hooks

    def nocopy() -> None:
        with torch.no_grad(), capture(model, nn.Conv2d, copy=False):
            model(x)

    modules = dict(model.named_modules())
    convs = {name: modules[name] for name in _conv_names(model)}

    def thp_copy() -> None:
        kept: list[torch.Tensor] = []

        def keep(_name: str, _module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            kept.append(_huge_page_empty_like(output).copy_(output))

        with forward_hooks(convs, keep), torch.no_grad():
            model(x)

    return {**_methods(model, x), "nocopy": nocopy, "thp_copy": thp_copy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="torchvision model name (resnet50) or efficientnet_lite0")
    parser.add_argument("batch", type=int)
    parser.add_argument("--methods", default="plain,naive_alias,nocopy,copy,ours,fx")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--per", type=int, default=10, help="forwards per block")
    args = parser.parse_args()

    from bench_capture import _build

    model = _build(args.model)
    torch.manual_seed(1)
    x = torch.randn(args.batch, 3, 224, 224)
    available = methods(model, x)
    chosen = {name: available[name] for name in args.methods.split(",") if name in available}
    times: dict[str, list[float]] = {name: [] for name in chosen}
    for run in chosen.values():
        run()
    for _ in range(args.blocks):
        for name, run in chosen.items():
            run()
            start = time.perf_counter()
            for _ in range(args.per):
                run()
            times[name].append((time.perf_counter() - start) / args.per)
    plain = statistics.median(times["plain"]) if "plain" in times else None
    for name, values in times.items():
        median = statistics.median(values)
        ratio = f"{median / plain:.3f}x" if plain else ""
        if plain and name != "plain":
            # Each block against the plain block of the same round: on a noisy machine the
            # spread of these paired ratios says how far apart two methods really are.
            paired = sorted(v / p for v, p in zip(values, times["plain"]))
            quarter = len(paired) // 4
            ratio += (f"  paired {statistics.median(paired):.3f}x "
                      f"[{paired[quarter]:.3f}-{paired[-1 - quarter]:.3f}]")
        print(f"{name:12s} {median * 1000:8.2f} ms  {ratio}")


if __name__ == "__main__":
    main()
