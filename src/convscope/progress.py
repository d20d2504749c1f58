"""One progress mechanism: library code reports, front ends decide how to show it.

Long-running library functions (the atlas's phases, Score-/Ablation-CAM batches, sanity
steps, the report, visualisation) take an optional ``progress`` callable and call it as
``progress(phase, done, total)``. The library never prints: with ``progress=None`` nothing
happens. Front ends subscribe:

- :class:`TqdmProgress` draws one ``tqdm.auto`` bar per phase (a widget in Jupyter, a
  terminal bar elsewhere); the CLI uses it unless ``--quiet``.
- Any callable with the same signature works (a log line, a server job's state, a test's
  list). :func:`atlas_adapter` and :func:`message_adapter` plug it into the two older
  callback shapes (the atlas's ``(done, total, elapsed)`` and the report's ``(message)``).

>>> seen = []
>>> for item in track(range(3), lambda *a: seen.append(a), "scoring", total=3):
...     pass
>>> seen[-1]
('scoring', 3, 3)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, Protocol, TypeVar

T = TypeVar("T")


class ProgressCallback(Protocol):
    """``progress(phase, done, total)``: ``done`` units of ``total`` (None: unknown) in
    ``phase``. ``done == 0`` starts a phase; calls are made from the working thread."""

    def __call__(self, phase: str, done: int, total: int | None) -> None: ...


def report(progress: ProgressCallback | None, phase: str, done: int,
           total: int | None = None) -> None:
    """Call ``progress`` if there is one (the helper library code uses at each step)."""
    if progress is not None:
        progress(phase, done, total)


def track(items: Iterable[T], progress: ProgressCallback | None, phase: str,
          total: int | None = None) -> Iterator[T]:
    """Yield ``items`` unchanged, reporting ``(phase, done, total)`` before the first and
    after each one. ``total`` defaults to ``len(items)`` when it has one."""
    if progress is None:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    progress(phase, 0, total)
    for done, item in enumerate(items, 1):
        yield item
        progress(phase, done, total)


class TqdmProgress:
    """A :class:`ProgressCallback` that draws one ``tqdm.auto`` bar per phase.

    Phases named ``"group: detail"`` share the group's bar, whose label shows the detail
    (the report's steps: ``"report: layer table"``, ``"report: CAM"``).

    ``enabled=False`` makes it a no-op (the CLI's ``--quiet``). Bars go to ``file``
    (stderr by default, so a command's stdout stays machine-readable). Use it as a context
    manager, or call :meth:`close`, to close the last bar.
    """

    def __init__(self, *, enabled: bool = True, file: IO[str] | None = None,
                 unit: str = "it", leave: bool = True):
        self.enabled = enabled
        self.file = file
        self.unit = unit
        self.leave = leave
        self._bar: Any = None
        self._phase: str | None = None

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        group = phase.split(": ", 1)[0]
        if self._bar is None or group != self._phase or done < self._bar.n:
            self.close()
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=phase, unit=self.unit, leave=self.leave,
                             file=self.file if self.file is not None else sys.stderr,
                             dynamic_ncols=True)
            self._phase = group
        elif phase != self._bar.desc:
            self._bar.set_description_str(phase, refresh=False)
        if total is not None and self._bar.total != total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)
        if total is not None and done >= total:
            self.close()

    def close(self) -> None:
        """Close the open bar, if any."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._phase = None

    def __enter__(self) -> TqdmProgress:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def atlas_adapter(progress: ProgressCallback | None,
                  phase: str = "images") -> Callable[[int, int, float], None] | None:
    """The atlas's ``progress(done, total, elapsed)`` callback, forwarding to ``progress``."""
    if progress is None:
        return None

    def forward(done: int, total: int, _elapsed: float) -> None:
        progress(phase, done, total)

    return forward


def message_adapter(progress: ProgressCallback | None, group: str,
                    total: int | None = None) -> Callable[[str], None] | None:
    """A ``progress(message)`` callback (the report's) as steps of ``progress``: each
    message is one finished step of phase ``"group: message"``."""
    if progress is None:
        return None
    count = 0

    def forward(message: str) -> None:
        nonlocal count
        count += 1
        progress(f"{group}: {message}", count, total)

    return forward
