"""The explorer's state: loaded models, known images and cached forward passes.

One :class:`ServerState` is created by the app factory and lives on ``app.state``; there
are no module globals, so several apps (tests, benchmarks) can run in one process.

Thread safety: routes run in a thread pool. A model is used by one forward pass at a time
(its own lock), because ``capture`` and ``cam`` register hooks on the shared module and two
concurrent passes would record into each other's hooks. Cached activations are immutable
tensors read without any lock, so rendering runs in parallel.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from ..errors import UnknownNameError
from .settings import Settings

log = logging.getLogger(__name__)

V = TypeVar("V")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class UnknownImageError(UnknownNameError):
    """An image id the server does not offer (or an upload that was evicted)."""

    kind = "image"
    hint = "GET /api/images lists the images; uploads expire, upload again"


class UnknownChannelError(UnknownNameError):
    """A channel index outside the layer's channel range."""

    kind = "channel"


class LRUCache(Generic[V]):
    """A bounded least-recently-used cache that computes each missing key once.

    ``get_or_compute(key, fn)`` runs ``fn`` under a lock private to ``key``: concurrent
    requests for the same key wait for the first one instead of computing it again, while
    different keys compute in parallel. A failing ``fn`` caches nothing. Entries are
    evicted when there are more than ``max_entries`` or their ``size`` exceeds
    ``max_bytes`` (the newest entry always stays).
    """

    def __init__(self, max_entries: int, max_bytes: int | None = None,
                 size: Callable[[V], int] | None = None):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1; got {max_entries}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._size = size or (lambda _value: 0)
        self._data: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._key_locks: dict[Hashable, threading.Lock] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> V | None:
        """The cached value (marked as recently used) or None."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key][0]
        return None

    def put(self, key: Hashable, value: V) -> None:
        """Store ``value`` and evict the least recently used entries beyond the bounds."""
        nbytes = self._size(value)
        with self._lock:
            self._data[key] = (value, nbytes)
            self._data.move_to_end(key)
            self._evict()

    def _evict(self) -> None:
        total = sum(n for _, n in self._data.values())
        while len(self._data) > 1 and (
            len(self._data) > self.max_entries
            or (self.max_bytes is not None and total > self.max_bytes)
        ):
            _, (_, nbytes) = self._data.popitem(last=False)
            total -= nbytes

    def get_or_compute(self, key: Hashable, compute: Callable[[], V]) -> V:
        """The cached value, or ``compute()`` stored under ``key`` (once across threads)."""
        found = self.get(key)
        if found is not None:
            return found
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        try:
            with key_lock:
                found = self.get(key)
                if found is not None:
                    return found
                with self._lock:
                    self.misses += 1
                value = compute()
                self.put(key, value)
                return value
        finally:
            with self._lock:
                if self._key_locks.get(key) is key_lock and not key_lock.locked():
                    del self._key_locks[key]

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def nbytes(self) -> int:
        """Bytes held by all entries (as measured by ``size``)."""
        with self._lock:
            return sum(n for _, n in self._data.values())


@dataclass
class ModelEntry:
    """One served model: loaded once, on first use, with its layer table."""

    name: str
    spec: Any
    device: str
    loaded: Any = None
    layers: list[Any] | None = None
    #: Serialises forward passes of this model (hooks are registered on the shared module).
    lock: threading.RLock = field(default_factory=threading.RLock)
    _load_lock: threading.Lock = field(default_factory=threading.Lock)
    _executor: ThreadPoolExecutor | None = None

    def run(self, work: Callable[[], V]) -> V:
        """Run ``work`` (a forward pass, CAM) on this model's own thread, under its lock.

        One long-lived thread per model: torch's OpenMP pool is per calling thread, and the
        server's request threads come and go, so a forward pass in a fresh request thread
        pays for a new pool (about 2x slower here). Passes of one model run one at a time
        anyway, because hooks are registered on the shared module.
        """
        with self._load_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=f"convscope-{self.name}")
        return self._executor.submit(self._locked, work).result()

    def _locked(self, work: Callable[[], V]) -> V:
        with self.lock:
            return work()

    def close(self) -> None:
        """Stop the model's thread (waits for running work)."""
        with self._load_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def get(self) -> Any:
        """The :class:`~convscope.models.LoadedModel`, loading it the first time."""
        if self.loaded is None:
            with self._load_lock:
                if self.loaded is None:
                    from ..models import LoadedModel, load_model

                    if isinstance(self.spec, LoadedModel):
                        self.loaded = self.spec
                    else:
                        log.info("loading model %s (%s)", self.name, self.spec)
                        self.loaded = load_model(self.spec, device=self.device)
        return self.loaded

    def layer_table(self) -> list[Any]:
        """:func:`convscope.list_layers` rows for the model's input size (computed once)."""
        if self.layers is None:
            from ..layers import list_layers

            loaded = self.get()

            def table() -> list[Any]:
                if self.layers is None:
                    self.layers = list_layers(loaded.module, loaded.input_size,
                                              device=loaded.device)
                return self.layers

            self.run(table)
        return self.layers

    def layer_info(self, layer: str) -> Any:
        """The table row of ``layer``; unknown names raise with suggestions."""
        from ..errors import UnknownLayerError

        rows = self.layer_table()
        for row in rows:
            if row.name == layer:
                return row
        raise UnknownLayerError(layer, [row.name for row in rows if row.output_shape])


class ModelRegistry:
    """The models named in the settings, each loaded once, on first use."""

    def __init__(self, settings: Settings):
        self.entries = {
            name: ModelEntry(name, spec, settings.device)
            for name, spec in settings.model_specs().items()
        }
        if not self.entries:
            raise ValueError("the server needs at least one model")

    @property
    def default(self) -> str:
        return next(iter(self.entries))

    def close(self) -> None:
        """Stop every model's thread."""
        for entry in self.entries.values():
            entry.close()

    def __getitem__(self, name: str) -> ModelEntry:
        try:
            return self.entries[name]
        except KeyError:
            from ..errors import UnknownModelError

            raise UnknownModelError(name, list(self.entries),
                                    hint="GET /api/models lists the served models") from None


@dataclass(frozen=True)
class ImageRecord:
    """An image the server offers: a bundled sample, a file given at start or an upload."""

    id: str
    name: str
    kind: str  # "sample", "file" or "upload"
    path: Path | None = None


class ImageStore:
    """Bundled samples, files named in the settings (by name, never by path) and uploads."""

    def __init__(self, settings: Settings):
        from ..images import sample_names

        self.max_pixels = settings.max_pixels
        self.records: dict[str, ImageRecord] = {}
        for name in sample_names():
            self.records[f"sample:{name}"] = ImageRecord(f"sample:{name}", name, "sample")
        for source in settings.images:
            path = Path(source)
            files = (sorted(p for p in path.iterdir()
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
                     if path.is_dir() else [path])
            for file in files:
                if not file.is_file():
                    raise FileNotFoundError(f"no such image file: {file}")
                image_id, n = f"file:{file.name}", 2
                while image_id in self.records:
                    image_id, n = f"file:{file.stem}-{n}{file.suffix}", n + 1
                self.records[image_id] = ImageRecord(image_id, file.name, "file", file.resolve())
        self.uploads: LRUCache[Any] = LRUCache(settings.max_uploads)

    def listing(self) -> list[dict[str, str]]:
        """JSON rows ``{id, name, kind}`` of every offered image (uploads included)."""
        rows = [{"id": r.id, "name": r.name, "kind": r.kind} for r in self.records.values()]
        with self.uploads._lock:
            upload_ids = list(self.uploads._data)
        rows += [{"id": str(i), "name": str(i), "kind": "upload"} for i in upload_ids]
        return rows

    def add_upload(self, data: bytes) -> tuple[str, Any]:
        """Decode uploaded bytes (bounded) and keep them; the id is a content hash."""
        from ..images import load_image

        image = load_image(data, max_pixels=self.max_pixels)
        image_id = "upload:" + hashlib.sha256(data).hexdigest()[:16]
        self.uploads.put(image_id, image)
        return image_id, image

    def load(self, image_id: str) -> Any:
        """The PIL image of ``image_id``."""
        from ..images import load_image

        if image_id.startswith("upload:"):
            found = self.uploads.get(image_id)
            if found is None:
                raise UnknownImageError(image_id, [])
            return found
        record = self.records.get(image_id)
        if record is None:
            raise UnknownImageError(image_id, list(self.records))
        if record.kind == "sample":
            return load_image(record.id, max_pixels=self.max_pixels)
        return load_image(record.path, max_pixels=self.max_pixels)


@dataclass
class ForwardResult:
    """One image through one model: the input, the top classes and every layer's output."""

    x: Any  # (1, 3, H, W) preprocessed input on the model's device
    display: Any  # PIL image of the input as the model sees it (after resize and crop)
    predictions: list[Any]
    acts: dict[str, Any]  # layer name -> (C, H, W) or (F,) CPU tensor of the last call
    nbytes: int
    #: Small values derived from the activations (layer summaries, channel orders), kept
    #: with them so switching back to a layer does not recompute them.
    derived: dict[Hashable, Any] = field(default_factory=dict)

    def memo(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per key (a race computes twice, harmlessly: same value)."""
        try:
            return self.derived[key]
        except KeyError:
            value = self.derived[key] = compute()
            return value


class ServerState:
    """Everything the routes share, created once per app by :func:`create_app`."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.models = ModelRegistry(settings)
        self.images = ImageStore(settings)
        self.forwards: LRUCache[ForwardResult] = LRUCache(
            settings.cache_entries, settings.cache_bytes, size=lambda r: r.nbytes
        )
        self.cams: LRUCache[Any] = LRUCache(settings.cam_entries)
        self.forward_count = 0
        self.atlas: Any = None
        if settings.atlas is not None:
            from ..atlas import Atlas

            self.atlas = Atlas.load(settings.atlas)

    def forward(self, model: str, image: str) -> ForwardResult:
        """The cached forward pass of ``image`` through ``model`` (computed once)."""
        entry = self.models[model]
        return self.forwards.get_or_compute((model, image), lambda: self._run(entry, image))

    def _run(self, entry: ModelEntry, image_id: str) -> ForwardResult:
        import torch

        from ..hooks import capture
        from ..layers import first_tensor
        from ..render.convert import to_pil

        pil = self.images.load(image_id)
        loaded = entry.get()
        x = loaded.preprocess(pil)

        def forward() -> tuple[Any, Any]:
            # One forward pass gives both the predictions and every layer's output.
            # Copy-on-write keeps the outputs without copying them (a container and its
            # last child share one tensor), so it is cheaper than copy=True here
            # (Lite0, all 184 layers: ~27 vs ~35 ms per pass).
            with capture(loaded.module, "all") as acts:
                predictions = loaded.predict(x, k=10)[0]
            self.forward_count += 1
            return acts, predictions

        acts, predictions = entry.run(forward)
        kept: dict[str, torch.Tensor] = {}
        for name in acts:
            value = first_tensor(acts[name])
            if value is not None and value.dim() >= 2:
                kept[name] = value[0]
        display = to_pil(loaded.transform.to_display(x[0].detach().cpu()))
        nbytes = sum(t.element_size() * t.nelement() for t in kept.values())
        return ForwardResult(x=x, display=display, predictions=predictions, acts=kept,
                             nbytes=nbytes)
