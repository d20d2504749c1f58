"""Progress of slow CLI work, drawn by :mod:`convscope.progress` (tqdm.auto) on stderr.

Every command uses the same mechanism: :class:`Steps` for a command's named steps, and
:func:`bar` for the library's ``progress`` callbacks (atlas phases, Score-/Ablation-CAM
batches, sanity steps, the report). ``--quiet`` turns both off; stdout stays for results.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from convscope.progress import TqdmProgress


def bar(args: argparse.Namespace | None = None, *, unit: str = "it",
        file: IO[str] | None = None) -> TqdmProgress:
    """A progress callback for library calls, silent when ``args.quiet`` is set."""
    return TqdmProgress(enabled=not getattr(args, "quiet", False), unit=unit, file=file)


class Steps:
    """A command's named steps as one progress bar: ``convscope: loading model  2/4``."""

    def __init__(self, total: int, *, quiet: bool = False, title: str = "convscope",
                 file: IO[str] | None = None):
        self.total = total
        self.done = 0
        self.quiet = quiet
        self.title = title
        self.progress = TqdmProgress(enabled=not quiet, unit="step", file=file)

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Run one step: the bar shows its name while it runs and counts it when done."""
        phase = f"{self.title}: {what}"
        self.progress(phase, self.done, self.total)
        try:
            yield
        except BaseException:
            self.progress.close()
            raise
        self.done += 1
        self.progress(phase, self.done, self.total)
        if self.done >= self.total:
            self.progress.close()

    def close(self) -> None:
        """Close the bar (a command that ends before its last step)."""
        self.progress.close()
