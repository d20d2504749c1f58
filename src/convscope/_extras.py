"""Optional dependencies: import them, or fail with one line naming the extra to install.

Heavy or optional parts of convscope (the explorer server, notebook widgets, other model
families) live behind pip extras, so ``pip install convscope`` stays small. Code that needs
one calls :func:`require` at the point of use instead of a bare ``import``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import ConvscopeError

#: module imported -> (extra that provides it, pip distribution name)
EXTRAS: dict[str, tuple[str, str]] = {
    "fastapi": ("serve", "fastapi"),
    "uvicorn": ("serve", "uvicorn"),
    "starlette": ("serve", "starlette"),
    "multipart": ("serve", "python-multipart"),
    "python_multipart": ("serve", "python-multipart"),
    "matplotlib": ("plot", "matplotlib"),
    "anywidget": ("notebook", "anywidget"),
    "timm": ("timm", "timm"),
    "transformers": ("hf", "transformers"),
    "safetensors": ("hf", "safetensors"),
    "huggingface_hub": ("hf", "huggingface-hub"),
    "onnx": ("onnx", "onnx"),
    "onnx2torch": ("onnx", "onnx2torch"),
    "onnxruntime": ("onnx", "onnxruntime"),
    "onnxscript": ("onnx", "onnxscript"),
    "mkdocs": ("docs", "mkdocs"),
}


class MissingExtraError(ConvscopeError, ImportError):
    """An optional dependency is not installed; the message names the pip extra."""

    exit_code = 1

    def __init__(self, module: str, extra: str, distribution: str, purpose: str | None = None):
        self.module = module
        self.extra = extra
        self.distribution = distribution
        what = purpose or "this feature"
        super().__init__(
            f"{what} needs {distribution}, which is not installed: "
            f"pip install 'convscope[{extra}]'"
        )


def require(module: str, purpose: str | None = None, *, extra: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming the extra that has it.

    ``purpose`` says what needed it (``"convscope serve"``); ``extra`` overrides the extra
    looked up from the top-level package name in :data:`EXTRAS`.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        top = module.split(".", 1)[0]
        missing = (getattr(error, "name", None) or top).split(".", 1)[0]
        if missing != top and missing not in EXTRAS:
            raise  # the optional package is there but one of its own imports is broken
        known_extra, distribution = EXTRAS.get(missing, EXTRAS.get(top, (extra or "", top)))
        chosen = extra or known_extra
        if not chosen:
            raise
        raise MissingExtraError(missing, chosen, distribution, purpose) from None
