"""The explorer's state: loaded models, known images and cached forward passes.

One :class:`ServerState` is created by the app factory and lives on ``app.state``; there
are no module globals, so several apps (tests, benchmarks) can run in one process.

Thread safety: routes run in a thread pool. A model is used by one forward pass at a time
(its own lock), because ``capture`` and ``cam`` register hooks on the shared module and two
concurrent passes would record into each other's hooks. Cached activations are immutable
tensors read without any lock, so rendering runs in parallel.

Threads and OpenMP: torch gives every thread that runs a large op its own OpenMP team, for
as long as that thread lives. With more team threads in the process than cores, libgomp
stops spinning between parallel regions, and every forward pass of the model's team gets
about 1.7x slower (measured: 34 -> 57 ms for EfficientNet-Lite0 on 2 cores, with one idle
second team). So the model's thread is the only long-lived thread that runs large torch
ops: pictures are drawn with numpy on the request threads, the statistics of the shown
layer are computed with the pass, and the rare large torch work of a request (statistics of
another layer, a resized heatmap) runs in a short-lived thread (:func:`run_apart`) whose
team ends with it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
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

    def refresh(self, key: Hashable) -> None:
        """Measure ``key``'s value again (it grew in place) and evict beyond the bounds."""
        with self._lock:
            if key in self._data:
                value = self._data[key][0]
                self._data[key] = (value, self._size(value))
                self._evict()

    def size_of(self, key: Hashable) -> int | None:
        """Bytes counted for ``key`` (None when absent)."""
        with self._lock:
            found = self._data.get(key)
            return None if found is None else found[1]

    def values(self) -> list[V]:
        """The cached values, least recently used first."""
        with self._lock:
            return [value for value, _ in self._data.values()]

    def status(self) -> dict[str, Any]:
        """Entries, bytes and bounds as JSON (for ``/api/status``)."""
        with self._lock:
            return {"entries": len(self._data), "max_entries": self.max_entries,
                    "bytes": sum(n for _, n in self._data.values()),
                    "max_bytes": self.max_bytes, "hits": self.hits, "misses": self.misses}

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
    _thread_lock: threading.Lock = field(default_factory=threading.Lock)
    _executor: ThreadPoolExecutor | None = None
    _hints: Any = None
    _modules: dict[str, Any] | None = None
    _rows: dict[str, Any] | None = None

    def run(self, work: Callable[[], V]) -> V:
        """Run ``work`` (a forward pass, CAM) on this model's own thread, under its lock.

        One long-lived thread per model: torch's OpenMP pool is per calling thread, and the
        server's request threads come and go, so a forward pass in a fresh request thread
        pays for a new pool (about 2x slower here). Passes of one model run one at a time
        anyway, because hooks are registered on the shared module.
        """
        with self._thread_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=f"convscope-{self.name}")
            executor = self._executor
        return executor.submit(self._locked, work).result()

    def _locked(self, work: Callable[[], V]) -> V:
        with self.lock:
            return work()

    def close(self) -> None:
        """Stop the model's thread (waits for running work)."""
        with self._thread_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def get(self) -> Any:
        """The :class:`~convscope.models.LoadedModel`, loading it the first time, on the
        model's own thread: loading runs torch ops, and a team started on the calling
        thread (the server's main thread) would outlive the load (see the module doc)."""
        if self.loaded is None:
            with self._load_lock:
                if self.loaded is None:
                    from ..models import LoadedModel, load_model

                    if isinstance(self.spec, LoadedModel):
                        self.loaded = self.spec
                        return self.loaded
                    log.info("loading model %s (%s)", self.name, self.spec)

                    def load() -> Any:
                        return load_model(self.spec, device=self.device)

                    on_model_thread = threading.current_thread().name.startswith(
                        f"convscope-{self.name}_")  # run() from here would wait on itself
                    self.loaded = load() if on_model_thread else self.run(load)
        return self.loaded

    def modules(self) -> dict[str, Any]:
        """``dict(module.named_modules())`` of the model, built once (a walk over every
        module, which channel and filter views would otherwise repeat per request)."""
        if self._modules is None:
            self._modules = dict(self.get().module.named_modules())
        return self._modules

    def hints(self) -> Any:
        """:func:`convscope.spatial.model_hints` of the model, read once: it walks every
        module and parameter (about 2 ms for EfficientNet-Lite0), and every pass needs it."""
        if self._hints is None:
            from ..spatial import model_hints

            self._hints = model_hints(self.get().module)
        return self._hints

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
        if self._rows is None or len(self._rows) != len(rows):
            self._rows = {row.name: row for row in reversed(rows)}  # the first of a name
        found = self._rows.get(layer)
        if found is None:
            raise UnknownLayerError(layer, [row.name for row in rows if row.output_shape])
        return found


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


@dataclass(frozen=True)
class Upload:
    """A decoded upload, the client that sent it, and what it costs in memory."""

    image: Any  # RGB PIL image
    owner: str
    name: str

    @property
    def nbytes(self) -> int:
        """Decoded size: 3 bytes a pixel (``load_image`` returns 8-bit RGB)."""
        return self.image.width * self.image.height * len(self.image.getbands())


def upload_size(upload: Upload) -> int:
    """Bytes of an upload for the byte-bounded cache."""
    return upload.nbytes


class ImageStore:
    """Bundled samples, files named in the settings (by name, never by path) and uploads.

    Upload ids are capabilities: an HMAC of the client and the content under a secret made
    at start, so nobody can guess another client's id, while a shared URL still opens the
    image. The listing shows each client only its own uploads.
    """

    def __init__(self, settings: Settings):
        from ..images import sample_names

        self.max_pixels = settings.max_pixels
        self._secret = secrets.token_bytes(32)
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
        self.uploads: LRUCache[Upload] = LRUCache(settings.max_uploads, settings.upload_bytes,
                                                  size=upload_size)

    def listing(self, client: str = "") -> list[dict[str, str]]:
        """JSON rows ``{id, name, kind}``: samples, files and ``client``'s own uploads."""
        rows = [{"id": r.id, "name": r.name, "kind": r.kind} for r in self.records.values()]
        with self.uploads._lock:
            uploads = [(key, value) for key, (value, _) in self.uploads._data.items()]
        rows += [{"id": str(key), "name": upload.name or str(key), "kind": "upload"}
                 for key, upload in uploads if upload.owner == client]
        return rows

    def upload_id(self, data: bytes, client: str) -> str:
        """``upload:`` + 128 bits of HMAC(secret, client, content): stable for one client
        re-sending the same file, unguessable for anyone else."""
        digest = hmac.new(self._secret, client.encode() + b"\0" + hashlib.sha256(data).digest(),
                          hashlib.sha256).hexdigest()
        return "upload:" + digest[:32]

    def add_upload(self, data: bytes, client: str = "", name: str = "") -> tuple[str, Any]:
        """Decode uploaded bytes (bounded in pixels) and keep them for ``client``."""
        from ..images import load_image

        image = load_image(data, max_pixels=self.max_pixels)
        image_id = self.upload_id(data, client)
        self.uploads.put(image_id, Upload(image, client, name[:100]))
        return image_id, image

    def load(self, image_id: str) -> Any:
        """The PIL image of ``image_id``."""
        from ..images import load_image

        if image_id.startswith("upload:"):
            found = self.uploads.get(image_id)
            if found is None:
                raise UnknownImageError(image_id, [])
            return found.image
        record = self.records.get(image_id)
        if record is None:
            raise UnknownImageError(image_id, list(self.records))
        if record.kind == "sample":
            return load_image(record.id, max_pixels=self.max_pixels)
        return load_image(record.path, max_pixels=self.max_pixels)


#: Elements from which torch splits an op over its OpenMP team (``at::internal::GRAIN_SIZE``);
#: smaller ops run on the calling thread alone.
TORCH_GRAIN = 32768


def run_apart(work: Callable[[], V]) -> V:
    """``work()`` in a new short-lived thread: torch ops in it may start an OpenMP team, and
    that team ends with the thread instead of living on in a pooled request thread (see
    the module doc). Costs a thread start (~0.1 ms): for rare or large work only."""
    box: list[Any] = []

    def target() -> None:
        try:
            box.append((True, work()))
        except BaseException as error:  # handed to the caller below
            box.append((False, error))

    thread = threading.Thread(target=target, name="convscope-apart", daemon=True)
    thread.start()
    thread.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value


def run_small(work: Callable[[], V], elements: int) -> V:
    """``work()`` here when it touches fewer than :data:`TORCH_GRAIN` elements (torch runs
    it on this thread alone), else through :func:`run_apart`."""
    return work() if elements < TORCH_GRAIN else run_apart(work)


def tensor_bytes(tensor: Any) -> int:
    """Bytes of a tensor's elements."""
    return tensor.element_size() * tensor.nelement()


@dataclass
class ForwardResult:
    """One image through one model: the input, the top classes and the layer outputs.

    The first pass captures only the layer the page shows (the first view costs about one
    plain forward pass); the first request for any other layer captures all of them in
    one more pass (:meth:`ServerState.activation`), after which ``complete`` is True.
    """

    x: Any  # (1, 3, H, W) preprocessed input on the model's device
    display: Any  # PIL image of the input as the model sees it (after resize and crop)
    predictions: list[Any]
    acts: dict[str, Any]  # layer name -> (C, H, W) or (F,) CPU tensor of the last call
    complete: bool = False
    #: Small values derived from the activations (layer summaries, channel orders), kept
    #: with them so switching back to a layer does not recompute them.
    derived: dict[Hashable, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def nbytes(self) -> int:
        """Bytes of the kept activations and the input."""
        acts = self.acts
        return sum(tensor_bytes(t) for t in acts.values()) + tensor_bytes(self.x)

    def memo(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per key (a race computes twice, harmlessly: same value). A
        miss computes in a short-lived thread (:func:`run_apart`): these are torch
        reductions over a whole layer, which would leave an OpenMP team in a request
        thread."""
        try:
            return self.derived[key]
        except KeyError:
            value = self.derived[key] = run_apart(compute)
            return value


def derive(layer: str, act: Any) -> dict[Hashable, Any]:
    """The statistics the page shows with a layer's grid (its summary and channel orders),
    under the keys :meth:`ForwardResult.memo` uses, computed here (the first pass computes
    them on the model's thread, with the activation)."""
    from ..stats import channel_order, layer_summary

    if act.dim() != 3:
        return {}
    derived: dict[Hashable, Any] = {("summary", layer): layer_summary(act)}
    for sort in (None, "mean", "max"):
        derived[("order", layer, sort)] = channel_order(act, sort)
    return derived


def _heatmap_bytes(value: Any) -> int:
    return tensor_bytes(value) if hasattr(value, "element_size") else 0


class ServerState:
    """Everything the routes share, created once per app by :func:`create_app`."""

    def __init__(self, settings: Settings):
        from .jobs import JobQueue

        self.settings = settings
        self.models = ModelRegistry(settings)
        self.images = ImageStore(settings)
        self.forwards: LRUCache[ForwardResult] = LRUCache(
            settings.cache_entries, settings.cache_bytes, size=lambda r: r.nbytes
        )
        self.cams: LRUCache[Any] = LRUCache(settings.cam_entries, settings.cam_bytes,
                                            size=_heatmap_bytes)
        self.jobs = JobQueue(settings.max_jobs, settings.max_jobs_per_client, settings.job_ttl)
        self.visuals: LRUCache[bytes] = LRUCache(settings.vis_entries, settings.vis_bytes,
                                                 size=len)
        self.forward_count = 0
        self.atlas: Any = None
        if settings.atlas is not None:
            from ..atlas import Atlas

            self.atlas = Atlas.load(settings.atlas)

    def forward(self, model: str, image: str, layer: str | None = None) -> ForwardResult:
        """The cached forward pass of ``image`` through ``model`` (computed once); a new
        pass captures only ``layer`` (the one the page shows first)."""
        entry = self.models[model]
        return self.forwards.get_or_compute((model, image),
                                            lambda: self._run(entry, image, layer))

    def activation(self, model: str, image: str, layer: str) -> tuple[ForwardResult, Any]:
        """``(result, output of layer)``; None when the layer produced no tensor."""
        result = self.forward(model, image, layer)
        if layer not in result.acts and not result.complete:
            entry = self.models[model]
            with result.lock:
                if not result.complete:
                    entry.layer_info(layer)  # unknown names raise before a full pass
                    result.acts = self._capture(entry, result.x, "all")[0]
                    result.complete = True
            self.forwards.refresh((model, image))
        return result, result.acts.get(layer)

    def _capture(self, entry: ModelEntry, x: Any, layers: Any
                 ) -> tuple[dict[str, Any], list[Any]]:
        """One forward pass on the model's thread: kept activations and the top-10."""
        return entry.run(lambda: self._pass(entry, x, layers))

    def _pass(self, entry: ModelEntry, x: Any, layers: Any
              ) -> tuple[dict[str, Any], list[Any]]:
        """One forward pass on the calling thread (the model's): activations, top-10."""
        from ..hooks import capture
        from ..layers import first_tensor
        from ..spatial import NoSpatialMapError, spatial_maps

        loaded = entry.get()

        if not layers:
            predictions = loaded.predict(x, k=10)[0]
            self.forward_count += 1
            return {}, predictions
        # One layer: copy it at once (the copy-on-write guard watches every op of the
        # pass, which costs more than one copy). All layers: copy-on-write is cheaper.
        copy: Any = "auto" if layers == "all" else True
        with capture(loaded.module, layers, copy=copy) as acts:
            predictions = loaded.predict(x, k=10)[0]
        self.forward_count += 1
        kept: dict[str, Any] = {}
        hints = entry.hints()
        for name in acts:
            try:  # one reading for every view: conv maps, channels-last, patch tokens
                # (``acts.maps(name)`` with the model's hints read once, not per pass)
                kept[name] = spatial_maps(
                    acts.calls(name)[-1], model=hints, module=acts.modules.get(name),
                    input_hw=acts.input_hw, batch_size=acts.batch_size, name=name)[0]
                continue
            except NoSpatialMapError:
                pass
            value = first_tensor(acts[name])
            if value is not None and value.dim() >= 2:
                kept[name] = value[0]
        return kept, predictions

    def _run(self, entry: ModelEntry, image_id: str, layer: str | None) -> ForwardResult:
        """A new image's first pass: preprocessing, the forward pass and the displayed
        input together on the model's thread, so all of its torch work uses that thread's
        OpenMP pool (a request thread's pool, whose workers spin for a while after each
        parallel op, would compete with the model's for the cores)."""
        from ..render.convert import to_pil

        pil = self.images.load(image_id)
        loaded = entry.get()
        if layer:
            from ..errors import UnknownLayerError

            try:
                entry.layer_info(layer)
            except UnknownLayerError:  # a stale hint: predictions still answer
                layer = None

        def first_pass() -> ForwardResult:
            x = loaded.preprocess(pil)
            acts, predictions = self._pass(entry, x, [layer] if layer else [])
            display = to_pil(loaded.transform.to_display(x[0].detach().cpu()))
            derived = derive(layer, acts[layer]) if layer in acts else {}
            return ForwardResult(x=x, display=display, predictions=predictions, acts=acts,
                                 derived=derived)

        return entry.run(first_pass)

    def status(self) -> dict[str, Any]:
        """Caches, jobs and models as JSON (``/api/status``)."""
        return {
            "models_loaded": [n for n, e in self.models.entries.items() if e.loaded],
            "forward_passes": self.forward_count,
            "caches": {"uploads": self.images.uploads.status(),
                       "forwards": self.forwards.status(),
                       "cams": self.cams.status(), "visualizations": self.visuals.status()},
            "jobs": self.jobs.status(),
            "atlas": self.atlas is not None,
        }
