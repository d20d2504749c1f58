"""Step-by-step progress lines on stderr for slow CLI work."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Steps:
    """Prints ``[i/n] what ... 0.4 s`` lines to stderr, one per step."""

    def __init__(self, total: int, *, quiet: bool = False):
        self.total = total
        self.done = 0
        self.quiet = quiet

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Time one step and report it."""
        self.done += 1
        if not self.quiet:
            print(f"[{self.done}/{self.total}] {what} ...", end="", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            if not self.quiet:
                print(" failed", file=sys.stderr, flush=True)
            raise
        if not self.quiet:
            print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
