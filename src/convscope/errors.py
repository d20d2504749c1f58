"""Exceptions raised by convscope.

Every error a user can cause by bad input derives from :class:`ConvscopeError`, so front ends
(CLI, server) can turn it into one clear line instead of a traceback. ``exit_code`` says how
the CLI exits: 2 for a bad argument (usage), 1 for a failure while running.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConvscopeError(Exception):
    """Base class of every expected, user-facing convscope error."""

    exit_code: int = 1


def close_matches(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Names among ``candidates`` that look like ``name``, best first.

    Adds candidates that contain ``name`` as a substring, which difflib's ratio misses for
    short queries such as ``"conv"``.
    """
    pool = list(dict.fromkeys(candidates))
    found = difflib.get_close_matches(name, pool, n=n, cutoff=0.6)
    if len(found) < n and name:
        lowered = name.lower()
        for candidate in pool:
            if lowered in candidate.lower() and candidate not in found:
                found.append(candidate)
                if len(found) >= n:
                    break
    return found


def _with_suggestions(message: str, suggestions: list[str], hint: str | None) -> str:
    if suggestions:
        message += "; did you mean " + ", ".join(repr(s) for s in suggestions) + "?"
    if hint:
        message += f" ({hint})"
    return message


class UnknownNameError(ConvscopeError, ValueError):
    """A name (layer, model, class, sample) that does not exist; suggests close matches."""

    exit_code = 2
    kind = "name"
    hint: str | None = None

    def __init__(self, name: str, candidates: Iterable[str] = (), hint: str | None = None):
        self.name = name
        self.suggestions = close_matches(str(name), candidates)
        message = _with_suggestions(
            f"unknown {self.kind} {name!r}", self.suggestions, hint or self.hint
        )
        super().__init__(message)


class UnknownLayerError(UnknownNameError):
    """A layer selector that matches no module of the model."""

    kind = "layer"
    hint = "convscope.list_layers(model) or `convscope layers MODEL` lists the valid names"


class UnknownModelError(UnknownNameError):
    """A model name that is neither a torchvision classifier nor a bundled model."""

    kind = "model"
    hint = "`convscope models` lists the known names"


class UnknownClassError(UnknownNameError):
    """A class name that the model's label set does not contain."""

    kind = "class"
    hint = None


class UnknownSampleError(UnknownNameError):
    """A ``sample:NAME`` image that is not bundled."""

    kind = "sample image"
    hint = None


class NotAConvLayerError(ConvscopeError, ValueError):
    """The layer has no convolution weight (for filter views)."""

    exit_code = 2


class ImageError(ConvscopeError, ValueError):
    """An image that cannot be read or is not an image at all."""


class ImageTooLargeError(ImageError):
    """An image whose pixel count exceeds the configured limit."""


class CheckpointError(ConvscopeError, ValueError):
    """A checkpoint that cannot be loaded safely or does not fit the architecture."""


class TargetError(ConvscopeError, ValueError):
    """A prediction target (class index, name or callable) that cannot be used."""

    exit_code = 2
