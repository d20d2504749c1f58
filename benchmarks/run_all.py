"""Run every benchmark module (``benchmarks/bench_*.py``) and write docs/benchmarks.md.

Each module exposes ``TITLE`` and ``run(quick: bool) -> str`` returning a Markdown section;
ratios inside a section are measured in the same run, never against stored absolute times.
Usage: ``python benchmarks/run_all.py [--quick] [--only NAME ...]``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "benchmarks.md"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument("--only", nargs="*", help="bench module names, e.g. bench_capture")
    parser.add_argument("--no-write", action="store_true", help="print, do not write docs")
    args = parser.parse_args()
    paths = sorted(HERE.glob("bench_*.py"))
    if args.only:
        paths = [p for p in paths if p.stem in args.only]
    sections = []
    for path in paths:
        module = _load(path)
        print(f"== {path.stem}: {module.TITLE}", flush=True)
        start = time.perf_counter()
        body = module.run(quick=args.quick)
        print(body, flush=True)
        sections.append(f"## {module.TITLE}\n\n_`{path.stem}.py`, {time.perf_counter() - start:.0f} s._\n\n{body}\n")
    header = (
        "# Benchmarks\n\n"
        "Produced by `make bench` (`python benchmarks/run_all.py`) on "
        f"{datetime.date.today().isoformat()}: {platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU only. "
        "Every ratio compares measurements taken in the same run.\n\n"
    )
    text = header + "\n".join(sections)
    if args.no_write or args.only:
        if args.only and not args.no_write:
            # Update only the named sections, keep the rest of the file.
            _merge_sections(sections)
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


def _merge_sections(sections: list[str]) -> None:
    existing = DOC.read_text() if DOC.exists() else "# Benchmarks\n\n"
    parts = existing.split("\n## ")
    head, olds = parts[0], parts[1:]
    by_title = {old.split("\n", 1)[0]: "## " + old for old in olds}
    for section in sections:
        by_title[section.split("\n", 1)[0][3:]] = section
    DOC.write_text(head.rstrip("\n") + "\n\n" + "\n".join(s.rstrip("\n") + "\n" for s in by_title.values()))
    print(f"updated {DOC}")


if __name__ == "__main__":
    raise SystemExit(main())
