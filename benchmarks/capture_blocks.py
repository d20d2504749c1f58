"""Capture methods side by side in one process, in interleaved blocks of forwards.

Not part of ``make bench``: a tool for A/B checks of capture's own overhead, steadier than
one timed call per round (each block runs one method several times in a row, blocks of all
methods alternate, and the median block is kept). Compare two versions of convscope by
running it once per version in fresh processes, e.g. with ``PYTHONPATH`` pointing at a
copy of the older package::

    OMP_NUM_THREADS=2 python benchmarks/capture_blocks.py resnet50 1 --blocks 16 --per 10
    MALLOC_TRIM_THRESHOLD_=8589934592 MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=0 \\
        python benchmarks/capture_blocks.py resnet50 1   # glibc keeping freed memory

Methods: ``plain`` (no_grad forward), ``alias`` (hooks keeping each output, no copy; not
exact after an in-place op), ``nocopy`` (``capture(copy=False)``), ``copy``
(``capture(copy=True)``), ``ours`` (``capture()``, the default), ``fx`` (torchvision's
feature extractor, when the model traces).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from torch import nn


def methods(model: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], None]]:
    from convscope import capture

    convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    modules = dict(model.named_modules())

    def plain() -> None:
        with torch.no_grad():
            model(x)

    def alias() -> None:
        kept: list[torch.Tensor] = []
        handles = [modules[name].register_forward_hook(lambda _m, _i, out: kept.append(out))
                   for name in convs]
        try:
            with torch.no_grad():
                model(x)
        finally:
            for handle in handles:
                handle.remove()

    def captured(copy: bool | str) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), capture(model, nn.Conv2d, copy=copy):
                model(x)
        return run

    found = {"plain": plain, "alias": alias, "nocopy": captured(False),
             "copy": captured(True), "ours": captured("auto")}
    try:
        from torchvision.models.feature_extraction import create_feature_extractor

        extractor = create_feature_extractor(model, return_nodes=convs)

        def fx() -> None:
            with torch.no_grad():
                extractor(x)

        found["fx"] = fx
    except Exception:  # the model does not trace, or its node names differ
        pass
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="torchvision model name, e.g. resnet50")
    parser.add_argument("batch", type=int)
    parser.add_argument("--methods", default="plain,alias,nocopy,copy,ours,fx")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--per", type=int, default=10, help="forwards per block")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)().eval()
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
        print(f"{name:8s} {median * 1000:8.2f} ms  {ratio}")


if __name__ == "__main__":
    main()
