"""Errors of the dataset atlas; all are :class:`~convscope.errors.ConvscopeError`."""

from __future__ import annotations

from convscope.errors import ConvscopeError


class AtlasError(ConvscopeError, ValueError):
    """An atlas that cannot be built or read as asked."""


class EmptyDatasetError(AtlasError):
    """The dataset holds no (readable) image."""

    exit_code = 2


class TopKTooLargeError(AtlasError):
    """``topk`` asks for more examples per channel than the dataset has images."""

    exit_code = 2


class AtlasExistsError(AtlasError):
    """The output folder already holds a different atlas (pass ``force=True``)."""

    exit_code = 2
