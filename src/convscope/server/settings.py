"""Settings of the explorer server: which models and images it offers, and its limits."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Model served when none is named.
DEFAULT_MODEL = "efficientnet_lite0"


@dataclass
class Settings:
    """Everything :func:`convscope.server.create_app` needs; no module globals.

    ``models`` maps a URL name to a model spec (anything :func:`convscope.load_model`
    takes) or an already loaded :class:`~convscope.models.LoadedModel`; a plain list of
    specs is named by the spec (or a checkpoint's file stem). ``images`` are files or
    folders whose images (non-recursive) are offered by file name: requests name them, they
    never carry paths, so nothing outside these folders can be read.
    """

    models: dict[str, Any] | list[Any] = field(default_factory=lambda: [DEFAULT_MODEL])
    images: list[str | Path] = field(default_factory=list)
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    #: Uploads: bytes read at most, pixels decoded at most (checked from the header).
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    #: Uploaded images kept (LRU), counted in entries and in decoded bytes (RGB, 3 bytes a
    #: pixel: one 40 MP upload is 120 MB), so a burst of huge uploads cannot grow the
    #: server without bound. A shared URL to an evicted upload asks to upload again.
    max_uploads: int = 32
    upload_bytes: int = 256 * 1024 * 1024
    #: Forward passes (activations of one image through one model) kept (LRU), and a
    #: bound on the bytes they hold together (the newest entry is always kept).
    cache_entries: int = 6
    cache_bytes: int = 512 * 1024 * 1024
    #: CAM maps kept (LRU), in entries and bytes (float32 maps at the input size).
    cam_entries: int = 64
    cam_bytes: int = 64 * 1024 * 1024
    #: Expensive work (Score-CAM, Ablation-CAM, sanity checks) runs as jobs: at most this
    #: many waiting or running at once (more answer 429 with Retry-After), each client at
    #: most ``max_jobs_per_client`` of them; finished jobs are kept ``job_ttl`` seconds.
    max_jobs: int = 4
    max_jobs_per_client: int = 2
    job_ttl: float = 600.0
    #: Feature visualisations of a channel (``convscope.visualize``, always a job): the
    #: optimisation steps and image size (kept small: a CPU does 128 steps at 128 px in
    #: seconds), and how many PNGs are kept, in entries and bytes.
    vis_steps: int = 128
    vis_size: int = 128
    vis_entries: int = 256
    vis_bytes: int = 32 * 1024 * 1024
    #: Host header values answered (DNS rebinding defence). None: the loopback names when
    #: bound to a loopback address, else any host (then set a token). "*" allows any.
    allowed_hosts: list[str] | None = None
    #: Shared secret checked on every API call (header ``Authorization: Bearer TOKEN`` or
    #: the cookie set by opening ``/?token=TOKEN``); None: no token.
    token: str | None = None
    #: Upper bounds for request parameters.
    max_channels: int = 1024
    max_tile: int = 512
    #: Threads that serve requests at once (FastAPI's pool, 40 by default; None keeps that).
    #: Request threads draw with numpy and zlib, which release the GIL, while the Python
    #: around them holds it, so many more threads than cores mostly add contention (in
    #: benchmarks/bench_server.py, 2 cores and 16 clients, 4 threads served more switches
    #: per second than 40). Torch work stays on the model's thread (see ``state.py``).
    worker_threads: int | None = field(
        default_factory=lambda: min(32, max(4, 2 * (os.cpu_count() or 1))))
    #: Answer the GETs of a layer or channel switch (grid, channel and filter views)
    #: through their route functions without FastAPI's routing and validation around them
    #: (:mod:`convscope.server.fast`: same answers; anything unusual still goes to
    #: FastAPI). That per-request work holds the GIL on the event loop's thread, which is
    #: what limited concurrent clients. False: every request through FastAPI.
    fast_path: bool = True
    #: Threads of the fast path (its own pool; the rest of the API keeps
    #: ``worker_threads``). They draw in parallel only while numpy and zlib have released
    #: the GIL, so beyond one per core they mostly queue for the GIL, and the event loop's
    #: thread with them (2 cores, 16 clients: 2 threads served about 10% more switches per
    #: second than 4). At least 2, so one request waiting for a forward pass does not hold
    #: up the others.
    fast_threads: int = field(default_factory=lambda: max(2, os.cpu_count() or 1))
    #: Optional atlas folder (convscope atlas output) for top-k examples per channel.
    atlas: str | Path | None = None

    def hosts(self) -> set[str] | None:
        """Allowed Host names (lower case, without port), or None for any host."""
        if self.allowed_hosts is not None:
            names = {h.strip().lower().strip("[]") for h in self.allowed_hosts}
            return None if "*" in names else names
        if is_loopback(self.host):
            return set(LOOPBACK_NAMES)
        return None

    def model_specs(self) -> dict[str, Any]:
        """``{url_name: spec_or_loaded_model}`` in the order given."""
        if isinstance(self.models, dict):
            return dict(self.models)
        named: dict[str, Any] = {}
        for spec in self.models:
            name = _model_key(spec)
            base, n = name, 2
            while name in named:
                name, n = f"{base}-{n}", n + 1
            named[name] = spec
        return named


#: Names of this machine that a loopback-bound server answers to.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name to bind) is reachable only from this machine."""
    import ipaddress

    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _model_key(spec: Any) -> str:
    if isinstance(spec, str):
        text = spec.strip()
        if text.endswith((".pt", ".pth", ".bin", ".ckpt")):
            return Path(text).stem
        return text.replace("-", "_").lower() if ":" not in text else text
    name = getattr(spec, "name", None) or type(spec).__name__
    return str(name).split(" ")[0]
