"""The browser explorer: ``create_app(settings)`` builds a FastAPI app (``convscope serve``).

Import cost is kept low: FastAPI is imported inside :func:`create_app`.
"""

from __future__ import annotations

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]
