"""Build a dataset atlas: one streaming pass over the data, statistics reduced in hooks.

For every selected layer a :class:`~convscope.atlas.stats.ChannelStats` lives on the
model's device; a forward hook folds each batch's output into it and drops the output, so
memory is O(layers x channels x k) plus one batch, whatever the dataset size. The pass is
resumable from periodic checkpoints and runs sharded under ``torchrun`` (each rank takes a
contiguous, disjoint slice; states are gathered and merged exactly).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from convscope.hooks import forward_hooks, preserve_training
from convscope.layers import LayerSpec, list_layers, resolve_layers
from convscope.models import LoadedModel, Preprocess, load_model
from convscope.progress import ProgressCallback, report

from .atlas import FORMAT, FORMAT_VERSION, Atlas
from .data import ImageFiles, IndexedDataset, Listing, collate, dataset_names, list_images, shard
from .errors import AtlasError, AtlasExistsError, EmptyDatasetError, TopKTooLargeError
from .stats import DEFAULT_EDGES, RANKINGS, ChannelStats

log = logging.getLogger(__name__)

#: ``progress(done_images, total_images, elapsed_seconds)``; done/total of this process.
Progress = Callable[[int, int, float], None]

CHECKPOINT = "checkpoint{suffix}.pt"
#: ``fused="auto"`` compiles runs of at least this many batches (all ranks together) on
#: these device types: the one-off compilation (a few seconds) is repaid by then. Not on
#: CPU with the torch reductions: there the compiled reduction uses every OpenMP thread
#: and, next to other processes, was far slower than the one-thread eager tiles (faster
#: only on an idle machine; docs/atlas.md). With the C kernel, ``auto`` is ``compile``
#: (see :func:`_choose_reduction`).
AUTO_COMPILE_BATCHES = {"cuda": 10}
# Test hooks (environment): checkpoint every N batches; SIGKILL self after N batches.
_ENV_CHECKPOINT_BATCHES = "CONVSCOPE_ATLAS_CHECKPOINT_BATCHES"
_ENV_KILL_AFTER = "CONVSCOPE_ATLAS_KILL_AFTER"


def build(
    model: LoadedModel | nn.Module | str,
    data: Any,
    layers: LayerSpec,
    topk: int = 9,
    *,
    rank_by: Sequence[str] = ("max",),
    batch_size: int = 32,
    workers: int = 0,
    device: str | torch.device | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    force: bool = False,
    checkpoint_every: float = 60.0,
    fused: str = "auto",
    edges: Sequence[float] = DEFAULT_EDGES,
    crops: bool = True,
    crop_size: int = 64,
    html: bool = True,
    max_pixels: int | None = None,
    progress: Progress | None = None,
    distributed: bool | None = None,
    phases: ProgressCallback | None = None,
    reduction_threads: int = 1,
) -> Atlas:
    """Record per-channel statistics and the top-``topk`` images of every channel of
    ``layers`` over ``data``; save to ``out`` when given (atlas.json, atlas.npz, crops/,
    index.html) and return the :class:`Atlas`.

    ``model``: a :class:`~convscope.models.LoadedModel` (its ``transform`` preprocesses
    image files), an ``nn.Module`` (ImageNet preprocessing) or a name for
    :func:`~convscope.models.load_model`. ``data``: an image folder (recursive;
    ImageFolder sub-folders become labels), a text file listing image paths, a list of
    paths, a map-style ``Dataset`` of tensors or a ``DataLoader``. Unreadable files are
    skipped and listed in ``atlas.skipped``. ``rank_by`` keeps top-k lists by the
    channel's spatial ``"max"`` and/or ``"mean"``. ``fused``: ``"compile"`` makes the
    histogram's bin ids with one ``torch.compile``-d kernel, ``"eager"`` with plain tensor
    ops, ``"auto"`` compiles when the whole run (all ranks, from its start) has enough
    batches to repay the compile time; the choice is made once per run, by all ranks
    together, and both give identical statistics. On CPU with the default ``edges`` both
    modes reduce the rows with the same C kernel (one read of every value; built at first
    use with the system C compiler, torch ops without one), so nothing is compiled there
    (``"compile"`` runs the kernel on ``torch.get_num_threads()`` threads, ``"eager"`` on
    ``reduction_threads``, ``"auto"`` is ``"compile"``); the run records that kernel and
    a resume keeps it. With ``out`` and
    ``resume=True`` an interrupted run continues from its last checkpoint (written every
    ``checkpoint_every`` seconds) and ends with the same result. Under ``torchrun``
    (``torch.distributed`` initialised) every rank processes a disjoint shard and all ranks
    return the merged atlas; rank 0 writes the files.

    ``progress(done, total, elapsed)`` hears of the pass (this process's images).
    ``phases`` (a :class:`convscope.progress.ProgressCallback`, e.g.
    :class:`~convscope.progress.TqdmProgress`) hears of every phase as
    ``(phase, done, total)``: ``"atlas compile"`` (0/1, 1/1 around the compile warm-up,
    only when the run compiles), ``"atlas images"`` (images of this process),
    ``"atlas crops"`` (one unit per image read and per channel strip written) and
    ``"atlas html"`` (0/1, 1/1), the last two on rank 0 only.

    ``reduction_threads``: Python threads that share the eager reduction on CPU (blocks
    of rows for the C kernel, channel blocks of the torch tiles: the same numbers with any
    count). 1, the default, uses none:
    next to the model's OpenMP threads on 2 cores, 2 threads were no faster on an idle
    machine and several times slower on a loaded one (docs/atlas.md); machines with idle
    cores may gain.
    """
    topk = int(topk)
    if topk < 1:
        raise TopKTooLargeError(f"topk must be at least 1, got {topk}")
    if batch_size < 1:
        raise AtlasError(f"batch size must be at least 1, got {batch_size}")
    if reduction_threads < 1:
        raise AtlasError(f"reduction_threads must be at least 1, got {reduction_threads}")
    if fused not in ("auto", "compile", "eager"):
        raise AtlasError(f"fused must be 'auto', 'compile' or 'eager', got {fused!r}")
    rankings = tuple(dict.fromkeys(rank_by))
    for name in rankings:
        if name not in RANKINGS:
            raise AtlasError(f"unknown ranking {name!r}; choose from {', '.join(RANKINGS)}")
    loaded = _as_loaded(model, device)
    modules = resolve_layers(loaded.module, layers)
    source = _Source.make(data, loaded.transform, max_pixels)
    if topk > len(source.names):
        raise TopKTooLargeError(
            f"topk {topk} (--topk) is larger than the dataset ({len(source.names)} images)"
        )
    infos = _layer_infos(loaded, modules, source.input_size)

    rank, world = _dist_rank_world(distributed)
    if world > 1 and source.loader is not None:
        raise AtlasError("a distributed atlas shards the data itself: pass a dataset, a "
                         "folder or a list of paths instead of a DataLoader")
    out_dir = Path(out) if out is not None else None
    if resume and out_dir is None:
        raise AtlasError("resume needs an output folder (out=) to keep checkpoints in")
    fingerprint = _fingerprint(loaded, infos, source, topk, rankings, edges, max_pixels)
    run = _Run(loaded, modules, infos, source, topk, rankings, edges, rank, world)
    run.reduction_threads = reduction_threads
    ckpt = out_dir / CHECKPOINT.format(suffix=f"-rank{rank}of{world}" if world > 1 else "") \
        if out_dir is not None else None
    # Every rank takes the same decisions (finished or not, which reduction), and a rank
    # that fails here makes all of them fail: one rank returning while another waits in a
    # collective would hang torchrun.
    finished = False
    recorded: bool | None = None  # the reduction of the run being resumed
    recorded_kernel: str | None = None  # and its kernel ("native" or "torch")
    error: BaseException | None = None
    try:
        if out_dir is not None:
            _check_out_dir(out_dir, fingerprint, force)
            finished = resume and _finished(out_dir, fingerprint)
            if resume and ckpt is not None and ckpt.exists():
                recorded = run.load_checkpoint(ckpt, fingerprint, force)
                recorded_kernel = run.kernel if recorded is not None else None
    except Exception as caught:  # re-raised below, after the other ranks have heard of it
        error = caught
    if not _all_ranks(error is None, world, loaded.device):
        if error is not None:
            raise error
        raise AtlasError("another process of this torchrun failed before the pass (see its "
                         "error); nothing was computed")
    if _all_ranks(finished, world, loaded.device):
        log.info("%s already holds this finished atlas; nothing to resume", out_dir)
        if ckpt is not None and ckpt.exists():
            ckpt.unlink()  # left by a crash after the atlas was written
        return Atlas.load(out_dir)  # type: ignore[arg-type]
    batches = _batch_count(source, batch_size)
    run.kernel = _choose_kernel(loaded.device, edges, recorded_kernel, world)
    compiled = _choose_reduction(fused, batches, loaded.device, recorded, world, phases,
                                 probe=run.kernel != "native")
    run.compiled = compiled
    clock = time.perf_counter()
    run.execute(batch_size, workers, ckpt, fingerprint, checkpoint_every, progress, phases)
    log.info("timing rank %d: pass %.3f s for %d images", rank,
             time.perf_counter() - clock, len(run.shard))

    clock = time.perf_counter()
    states = run.export()
    if world > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, states)
        states = _merge_exports(gathered, loaded.device)
    atlas = run.to_atlas(states, fingerprint)
    log.info("timing rank %d: gather+merge %.3f s", rank, time.perf_counter() - clock)
    clock = time.perf_counter()
    if out_dir is not None and rank == 0:
        if crops:
            from .crops import crop_path, write_crops

            atlas.meta["crops"] = {"pattern": crop_path("{layer}", "{channel}"),
                                   "size": int(crop_size), "by": atlas.rankings[0]}
            write_crops(atlas, out_dir, source.dataset, run.original,
                        loaded.transform.to_display, crop_size=crop_size, workers=workers,
                        progress=phases)
        atlas.save(out_dir)
        if html:
            from .html import write_html

            report(phases, "atlas html", 0, 1)
            write_html(atlas, out_dir)
            report(phases, "atlas html", 1, 1)
    log.info("timing rank %d: write %.3f s", rank, time.perf_counter() - clock)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if ckpt is not None and ckpt.exists():
        ckpt.unlink()
    return atlas


# --------------------------------------------------------------------------------------


def _as_loaded(model: LoadedModel | nn.Module | str, device: Any) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        first = next(model.parameters(), None)
        where = first.device if first is not None else torch.device("cpu")
        return LoadedModel(module=model, transform=Preprocess(), class_names=None,
                           name=type(model).__name__, device=where, source="module")
    return load_model(model, device=device or "auto")


class _Source:
    """Where the images come from: a dataset to shard (or a fixed DataLoader), their
    names, labels and how to get back the preprocessed view of image ``i`` for crops."""

    def __init__(self, dataset: Any, names: list[str], labels: list[str | None] | None,
                 description: str, input_size: tuple[int, ...],
                 loader: torch.utils.data.DataLoader | None = None,
                 ignored: Sequence[str] = ()):
        self.dataset = dataset
        self.names = names
        self.labels = labels
        self.description = description
        self.input_size = input_size
        self.loader = loader
        self.ignored = list(ignored)

    @classmethod
    def make(cls, data: Any, transform: Preprocess, max_pixels: int | None) -> _Source:
        if isinstance(data, torch.utils.data.DataLoader):
            if not isinstance(data.sampler, torch.utils.data.SequentialSampler):
                raise AtlasError("pass a DataLoader without shuffling (its order names images)")
            base = data.dataset
            names = dataset_names(base)
            if not names:
                raise EmptyDatasetError("the DataLoader's dataset is empty")
            return cls(IndexedDataset(base), names, None, type(base).__name__,
                       _item_shape(base), loader=data)
        if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, ImageFiles):
            if len(data) == 0:  # type: ignore[arg-type]
                raise EmptyDatasetError("the dataset is empty")
            return cls(IndexedDataset(data), dataset_names(data), None, type(data).__name__,
                       _item_shape(data))
        listing: Listing = list_images(data)
        labels = listing.labels if any(label is not None for label in listing.labels) else None
        dataset = ImageFiles(listing.paths, transform, max_pixels)
        return cls(dataset, listing.paths, labels, listing.source,
                   (3, transform.crop, transform.crop), ignored=listing.ignored)


def _item_shape(dataset: Any) -> tuple[int, ...]:
    first = IndexedDataset(dataset)[0][0]
    return tuple(first.shape)


def _layer_infos(loaded: LoadedModel, modules: dict[str, nn.Module],
                 input_size: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    with preserve_training(loaded.module):
        table = {info.name: info for info in
                 list_layers(loaded.module, input_size, device=loaded.device)}
    from convscope.spatial import NoSpatialMapError, model_hints, spatial_layout

    hints = model_hints(loaded.module)
    infos = {}
    for name in modules:
        info = table[name]
        if info.output_shape is None:
            raise AtlasError(f"layer {name!r} did not run in the model's forward pass")
        if info.calls > 1:
            raise AtlasError(
                f"layer {name!r} runs {info.calls} times per forward pass; an atlas records "
                "layers that run once (select the modules of each call instead)"
            )
        layout = None
        if len(info.output_shape) == 1:
            shape = [*info.output_shape, 1, 1]
        else:  # the one spatial reading: conv maps, channels-last, transformer tokens
            try:
                found = spatial_layout((1, *info.output_shape), model=hints,
                                       module=modules[name], input_hw=input_size[-2:],
                                       batch_size=1, name=name)
            except NoSpatialMapError as error:
                raise AtlasError(
                    f"layer {name!r} outputs shape {info.output_shape}; an atlas needs "
                    f"spatial maps or (C,) vectors ({error})"
                ) from None
            shape = [found.channels, *found.grid]
            if found.kind != "nchw":
                layout = {"kind": found.kind, "grid": list(found.grid),
                          "channels": found.channels, "prefix": found.prefix}
        rf = info.receptive_field
        infos[name] = {
            "name": name, "type": info.type, "shape": shape,
            "receptive_field": None if rf is None else
            {"size": list(rf.size), "stride": list(rf.stride), "start": list(rf.start)},
        }
        if layout is not None:  # only then, so fingerprints of conv atlases stay as they were
            infos[name]["layout"] = layout
    return infos


def _dist_rank_world(distributed: bool | None) -> tuple[int, int]:
    if distributed is False:
        return 0, 1
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if distributed:
        raise AtlasError("distributed=True but torch.distributed is not initialised "
                         "(run under torchrun, or call init_process_group first)")
    return 0, 1


def _fingerprint(loaded: LoadedModel, infos: dict[str, Any], source: _Source, topk: int,
                 rankings: Sequence[str], edges: Sequence[float], max_pixels: int | None
                 ) -> str:
    """Hash of everything that changes a number of the result: model weights (per-tensor
    sums), layers, the image list, how files are decoded and preprocessed (every field of
    the transform: resize, crop, mean, std, interpolation...; ``max_pixels``), the input
    size, the settings, the device type and the torch version. A checkpoint or finished
    atlas with another fingerprint is never resumed."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for key, value in loaded.module.state_dict().items():
            if value.is_floating_point():
                checksum: float | int = float(value.sum(dtype=torch.float64))
            else:
                checksum = int(value.sum(dtype=torch.int64)) if value.numel() else 0
            digest.update(f"{key}:{tuple(value.shape)}:{value.dtype}:{checksum!r};".encode())
    preprocessing: Any = None
    if isinstance(source.dataset, ImageFiles):  # tensors from a Dataset skip the transform
        from convscope.images import DEFAULT_MAX_PIXELS

        transform = loaded.transform
        fields = (dataclasses.asdict(transform) if dataclasses.is_dataclass(transform)
                  and not isinstance(transform, type) else repr(transform))
        preprocessing = {"transform": type(transform).__qualname__, "fields": fields,
                         "max_pixels": max_pixels if max_pixels is not None
                         else DEFAULT_MAX_PIXELS}
    settings = {"model": loaded.name, "layers": infos, "topk": topk,
                "rank_by": list(rankings), "edges": [float(e) for e in edges],
                "input_size": list(source.input_size), "preprocessing": preprocessing,
                "device": loaded.device.type, "torch": torch.__version__}
    digest.update(json.dumps(settings, sort_keys=True, default=repr).encode())
    digest.update("\n".join(source.names).encode())
    return digest.hexdigest()[:24]


def _finished(out_dir: Path, fingerprint: str) -> bool:
    try:
        meta = json.loads((out_dir / "atlas.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("fingerprint") == fingerprint and (out_dir / "atlas.npz").exists()


def _check_out_dir(out_dir: Path, fingerprint: str, force: bool) -> None:
    meta = out_dir / "atlas.json"
    if out_dir.exists() and not out_dir.is_dir():
        raise AtlasError(f"output {out_dir} exists and is not a folder")
    if meta.exists() and not force:
        try:
            existing = json.loads(meta.read_text()).get("fingerprint")
        except (OSError, ValueError):
            existing = None
        if existing != fingerprint:
            raise AtlasExistsError(
                f"{out_dir} already holds a different atlas; pass --force (force=True) to "
                "overwrite it, or choose another output folder"
            )
    out_dir.mkdir(parents=True, exist_ok=True)


class _Run:
    """State of one process's pass: reducers per layer, predictions, skipped files."""

    def __init__(self, loaded: LoadedModel, modules: dict[str, nn.Module],
                 infos: dict[str, Any], source: _Source, topk: int,
                 rankings: tuple[str, ...], edges: Sequence[float], rank: int, world: int):
        self.loaded, self.modules, self.infos, self.source = loaded, modules, infos, source
        self.rank, self.world = rank, world
        self.shard = shard(len(source.names), rank, world)
        self.position = 0  # items of the shard consumed so far
        self.batch_size: int | None = None
        self.compiled = False  # the one reduction of this run (chosen before the pass)
        self.reduction_threads = 1  # Python threads sharing the eager tiles (see build)
        self.kernel = "torch"  # the row reductions: "native" (C kernel) or "torch"
        self.stats = {name: ChannelStats(info["shape"][0], topk, rankings=rankings,
                                         edges=edges, device=loaded.device)
                      for name, info in infos.items()}
        n = len(source.names)
        self.pred_class = torch.full((n,), -1, dtype=torch.int32)
        self.pred_prob = torch.zeros(n, dtype=torch.float32)
        self.failures: dict[int, str] = {}

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: Path, fingerprint: str) -> None:
        state = {
            "fingerprint": fingerprint, "rank": self.rank, "world": self.world,
            "position": self.position, "position_images": self.position_images,
            "batch_size": self.batch_size, "compiled": self.compiled, "kernel": self.kernel,
            "stats": {name: s.state_dict() for name, s in self.stats.items()},
            "pred_class": self.pred_class, "pred_prob": self.pred_prob,
            "failures": [[i, msg] for i, msg in sorted(self.failures.items())],
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a kill never leaves a half-written checkpoint

    def load_checkpoint(self, path: Path, fingerprint: str, force: bool) -> bool | None:
        """Continue from ``path``; returns the reduction it was made with (True: compiled),
        None when the checkpoint was ignored (``force``)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # truncated or foreign file
            raise AtlasError(f"cannot read the checkpoint {path}: {error}") from error
        if state.get("fingerprint") != fingerprint or state.get("world") != self.world:
            if not force:
                raise AtlasExistsError(
                    f"the checkpoint in {path.parent} belongs to a different atlas (model, "
                    "layers, data, settings or process count differ); pass --force to start "
                    "over"
                )
            log.warning("ignoring checkpoint %s of a different atlas", path)
            return None
        self.position = int(state["position"])
        self.position_images = int(state.get("position_images", 0))
        self.batch_size = state["batch_size"]
        self.stats = {name: ChannelStats.from_state_dict(s, self.loaded.device)
                      for name, s in state["stats"].items()}
        self.pred_class, self.pred_prob = state["pred_class"], state["pred_prob"]
        self.failures = {int(i): str(msg) for i, msg in state["failures"]}
        self.kernel = str(state.get("kernel", "torch"))  # checkpoints before the C kernel
        log.info("resuming from %s at image %d of %d", path, self.position, len(self.shard))
        return bool(state.get("compiled", False))

    # ------------------------------------------------------------------ the pass

    def _loader(self, batch_size: int, workers: int) -> Any:
        if self.source.loader is not None:
            return self.source.loader
        remaining = list(self.shard)[self.position:]
        subset = torch.utils.data.Subset(self.source.dataset, remaining)
        return torch.utils.data.DataLoader(
            subset, batch_size=batch_size, shuffle=False, num_workers=workers,
            collate_fn=collate, pin_memory=self.loaded.device.type == "cuda",
            persistent_workers=False,
        )

    def execute(self, batch_size: int, workers: int, ckpt: Path | None,
                fingerprint: str, checkpoint_every: float, progress: Progress | None,
                phases: ProgressCallback | None = None) -> None:
        if self.batch_size is not None and self.batch_size != batch_size:
            log.warning("resuming with the checkpoint's batch size %d (asked %d) so the "
                        "result matches an uninterrupted run", self.batch_size, batch_size)
            batch_size = self.batch_size
        self.batch_size = batch_size
        total = len(self.shard)
        compiled = self.compiled
        current: dict[str, torch.Tensor] = {}

        from convscope.spatial import SpatialLayout

        layouts = {name: SpatialLayout(info["layout"]["kind"], tuple(info["layout"]["grid"]),
                                       info["layout"]["channels"], info["layout"]["prefix"])
                   for name, info in self.infos.items() if "layout" in info}

        device = self.loaded.device
        threads = self.reduction_threads
        for stats in self.stats.values():  # the run's one kernel (see _choose_kernel)
            stats.native = self.kernel == "native"
        pool = ThreadPoolExecutor(threads, thread_name_prefix="atlas") \
            if threads > 1 and device.type == "cpu" and not compiled else None

        def hook(name: str, _module: nn.Module, _inputs: tuple, output: Any) -> None:
            value = output[0] if isinstance(output, (tuple, list)) else output
            if name in layouts:  # channels-last or tokens, read as (N, C, H, W) maps
                value = layouts[name].apply(value)
            self.stats[name].update(value, current["indices"], compiled=compiled, pool=pool)

        try:
            self._pass(batch_size, workers, ckpt, fingerprint, checkpoint_every, progress,
                       phases, hook, current, total)
        finally:
            if pool is not None:
                pool.shutdown()

    def _pass(self, batch_size: int, workers: int, ckpt: Path | None, fingerprint: str,
              checkpoint_every: float, progress: Progress | None,
              phases: ProgressCallback | None, hook: Callable[..., None],
              current: dict[str, torch.Tensor], total: int) -> None:
        """The loop over the batches (see :meth:`execute`)."""
        every_batches = int(os.environ.get(_ENV_CHECKPOINT_BATCHES, "0") or 0)
        kill_after = int(os.environ.get(_ENV_KILL_AFTER, "0") or 0)

        device = self.loaded.device
        model = self.loaded.module
        start = time.perf_counter()
        last_ckpt = start
        done_batches = 0
        uses_user_loader = self.source.loader is not None
        report(phases, "atlas images",
               self.position_images if uses_user_loader else self.position, total)
        with preserve_training(model), torch.inference_mode(), \
                forward_hooks(self.modules, hook):
            model.eval()
            for batch_number, batch in enumerate(self._loader(batch_size, workers)):
                if uses_user_loader:
                    if batch_number < self.position:
                        continue  # resuming over a fixed loader: skip what was done
                    images, indices, failures = _user_batch(batch, self.position_images)
                else:
                    images, indices, failures = batch
                for index, message in failures:
                    self.failures[int(index)] = message
                    log.warning("skipping %s: %s", self.source.names[int(index)], message)
                if images is not None:
                    current["indices"] = indices.to(device)
                    output = model(images.to(device, non_blocking=True))
                    self._record_predictions(output, indices)
                self.position += 1 if uses_user_loader else len(indices) + len(failures)
                if uses_user_loader:
                    self.position_images += len(indices)
                done_batches += 1
                now = time.perf_counter()
                if ckpt is not None and (
                        (every_batches and done_batches % every_batches == 0)
                        or (not every_batches and now - last_ckpt >= checkpoint_every)):
                    self.save_checkpoint(ckpt, fingerprint)
                    last_ckpt = now
                done = self.position_images if uses_user_loader else self.position
                if progress is not None:
                    progress(done, total, now - start)
                report(phases, "atlas images", done, total)
                if kill_after and done_batches >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)  # test hook: die like a crash

    position_images = 0  # images seen through a user DataLoader (indices for its items)

    def _record_predictions(self, output: Any, indices: torch.Tensor) -> None:
        from convscope.errors import ConvscopeError
        from convscope.models import logits_of

        try:  # tensors, Hugging Face ModelOutputs, dicts and tuples alike
            output = logits_of(output)
        except ConvscopeError:
            return  # no logits (a feature extractor): the atlas keeps no predictions
        if output.dim() != 2:
            return
        probs = torch.softmax(output.float(), dim=1)
        prob, cls = probs.max(dim=1)
        self.pred_class[indices] = cls.to("cpu", torch.int32)
        self.pred_prob[indices] = prob.cpu()

    # ------------------------------------------------------------------ results

    def export(self) -> dict[str, Any]:
        return {
            "stats": {name: s.state_dict() for name, s in self.stats.items()},
            "pred_class": self.pred_class, "pred_prob": self.pred_prob,
            "failures": dict(self.failures),
        }

    def to_atlas(self, states: dict[str, Any], fingerprint: str) -> Atlas:
        names = self.source.names
        failures = states["failures"]
        readable = np.array([i not in failures for i in range(len(names))], dtype=bool)
        if not readable.any():
            raise EmptyDatasetError(
                f"none of the {len(names)} files of {self.source.description} could be read"
            )
        new_index = np.cumsum(readable) - 1  # old index -> index among readable images
        self.original = np.flatnonzero(readable)  # readable index -> dataset index
        layers: dict[str, dict[str, Any]] = {}
        arrays: dict[str, np.ndarray] = {}
        k = next(iter(self.stats.values())).k
        if int(readable.sum()) < k:
            raise TopKTooLargeError(
                f"topk {k} is larger than the {int(readable.sum())} readable images of the "
                f"dataset ({len(failures)} could not be read)"
            )
        for name, state in states["stats"].items():
            stats = ChannelStats.from_state_dict(state, "cpu")
            layers[name] = dict(self.infos[name])
            for key, value in stats.summary().items():
                arrays[f"{name}/stats/{key}"] = value.numpy()
            for ranking, top in stats.top.items():
                index = top["index"].numpy()
                arrays[f"{name}/{ranking}/index"] = new_index[index].astype(np.int64)
                arrays[f"{name}/{ranking}/value"] = top["value"].numpy()
                arrays[f"{name}/{ranking}/location"] = top["location"].numpy().astype(np.int32)
        arrays["histogram_edges"] = np.asarray(
            next(iter(states["stats"].values()))["edges"].numpy(), dtype=np.float32)
        arrays["predictions/class"] = states["pred_class"].numpy()[readable]
        arrays["predictions/probability"] = states["pred_prob"].numpy()[readable]
        labels = self.source.labels
        skipped = [{"path": names[i], "error": msg} for i, msg in sorted(failures.items())]
        skipped += [{"path": p, "error": "not an image file (extension)"}
                    for p in self.source.ignored]
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION, "fingerprint": fingerprint,
            "model": self.loaded.name,
            "input_size": list(self.source.input_size),
            "layers": layers,
            "dataset": {"source": self.source.description, "listed": len(names),
                        "images": int(readable.sum()), "skipped": len(skipped)},
            "images": [n for n, ok in zip(names, readable, strict=False) if ok],
            "labels": None if labels is None else
            [lab for lab, ok in zip(labels, readable, strict=False) if ok],
            "skipped": skipped,
            "class_names": self.loaded.class_names,
            "settings": {"topk": k, "rank_by": list(next(iter(self.stats.values())).rankings),
                         "batch_size": self.batch_size, "processes": self.world,
                         "reduction": "compiled" if self.compiled else "eager",
                         "kernel": self.kernel},
        }
        return Atlas(meta, arrays)


def _user_batch(batch: Any, offset: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    indices = torch.arange(offset, offset + images.shape[0])
    return images, indices, []


def _batch_count(source: _Source, batch_size: int) -> int:
    """Batches of the whole run (all ranks, from the start): the same number on every rank
    and on resume, so ``fused="auto"`` takes the same decision everywhere."""
    if source.loader is not None:
        try:
            return len(source.loader)
        except TypeError:  # an iterable-style loader without a length
            return 0
    return -(-len(source.names) // batch_size)


def _choose_kernel(device: torch.device, edges: Sequence[float], recorded: str | None,
                   world: int) -> str:
    """The row reductions of the whole run, agreed by all ranks: ``"native"`` (the C
    kernel of :mod:`convscope.atlas._native`, on CPU with the default edges, whatever
    ``fused``) or ``"torch"``. Their float sums differ in the last bits, so a resumed run
    keeps the recorded one: a run started with torch stays on torch, and one started with
    the C kernel is refused where the kernel cannot be built."""
    from . import _native

    applies = device.type == "cpu" and [float(e) for e in edges] == list(DEFAULT_EDGES)
    want = applies and recorded != "torch"
    ok = want and _native.kernel() is not None
    agreed = _all_ranks(ok, world, device)
    if recorded == "native" and not agreed:
        raise AtlasError("this checkpoint was made with the atlas's C kernel, which cannot "
                         "be built or loaded here (see the warning above); resume where a C "
                         "compiler is available, or pass --force to start over")
    return "native" if agreed else "torch"


def _choose_reduction(fused: str, batches: int, device: torch.device, recorded: bool | None,
                      world: int, phases: ProgressCallback | None = None, *,
                      probe: bool = True) -> bool:
    """One reduction for the whole run, agreed by all ranks: compiled or eager (True:
    compiled). A resumed run keeps the one its checkpoint recorded. Both give identical
    statistics; compiling only pays off for long runs. ``probe=False`` (the C kernel
    reduces the rows, so nothing is compiled): the choice is only recorded."""
    if fused not in ("auto", "compile", "eager"):
        raise AtlasError(f"fused must be 'auto', 'compile' or 'eager', got {fused!r}")
    if recorded is not None:
        want = recorded
    elif fused == "auto" and not probe:
        # The C kernel: "compile" only spreads its rows over torch's threads (nothing to
        # compile, no warm-up); in the pass it measured faster than one thread, idle
        # (0.89x against 0.83x of plain inference) and loaded (docs/benchmarks.md).
        want = True
    elif fused == "auto":
        threshold = AUTO_COMPILE_BATCHES.get(device.type)
        want = threshold is not None and batches >= threshold
    else:
        want = fused == "compile"
    ok, error = want, None
    if want and probe:
        report(phases, "atlas compile", 0, 1)  # the warm-up: seconds, silent otherwise
        try:
            _probe_compile(device)
        except Exception as caught:  # no C++ compiler, unsupported backend, ...
            ok, error = False, caught
        report(phases, "atlas compile", 1, 1)
    agreed = _all_ranks(ok, world, device)
    if want and not agreed:
        if fused == "compile" and recorded is None:
            raise AtlasError(f"torch.compile of the histogram kernel failed: "
                             f"{error or 'on another process'}") from error
        log.warning("torch.compile unavailable (%s); using eager reductions (same result)",
                    error or "on another process")
    return agreed


def _probe_compile(device: torch.device) -> None:
    """Compile (and run once) the kernel the pass will use on ``device``: the exponent
    codes on CPU, the fused histogram elsewhere."""
    from .stats import _compiled_codes, _compiled_counts

    probe = torch.randn(6, 5, device=device)
    if device.type == "cpu":
        out = torch.empty(6, 5, dtype=torch.int32, device=device)
        _compiled_codes()(probe, torch.zeros(6, 1, dtype=torch.int32, device=device), out)
        return
    offsets = torch.zeros(6, 1, dtype=torch.int32, device=device)
    _compiled_counts()(probe, torch.tensor(DEFAULT_EDGES, device=device), True, offsets, 29)


def _all_ranks(flag: bool, world: int, device: torch.device) -> bool:
    """True when ``flag`` holds on every rank (a collective: every rank must call it)."""
    if world == 1:
        return bool(flag)
    import torch.distributed as dist

    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=where)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _merge_exports(gathered: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Merge every rank's export (in rank order) into one."""
    first = gathered[0]
    merged_stats = {}
    for name in first["stats"]:
        stats = ChannelStats.from_state_dict(first["stats"][name], device)
        for other in gathered[1:]:
            stats.merge(ChannelStats.from_state_dict(other["stats"][name], device))
        merged_stats[name] = stats.state_dict()
    pred_class = first["pred_class"].clone()
    pred_prob = first["pred_prob"].clone()
    failures: dict[int, str] = {}
    for part in gathered:
        seen = part["pred_class"] >= 0
        pred_class[seen] = part["pred_class"][seen]
        pred_prob[seen] = part["pred_prob"][seen]
        failures.update(part["failures"])
    return {"stats": merged_stats, "pred_class": pred_class, "pred_prob": pred_prob,
            "failures": failures}
