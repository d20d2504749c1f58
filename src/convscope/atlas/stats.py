"""Streaming, mergeable per-channel statistics and exact top-k of layer activations.

:class:`ChannelStats` keeps, for one layer, O(channels x (k + histogram bins)) numbers on the
device where the activations are made. Each batch is read by :meth:`ChannelStats.update`:
per (image, channel) row its max, sum and 2-norm (squared: the sum of squares), every
value's histogram bin, and the position of the max for the rows that enter a top-k list.
The histogram is counted either eagerly, tile by tile (:data:`CHUNK` values at a time,
which on CPU also take the three row reductions while the tile is in the cache), or with
``torch.compile``-d kernels (on CPU: exponent codes for blocks of rows, counted by
``bincount``; elsewhere one fused histogram kernel). The two paths share every
floating-point operation (each row is reduced whole by the same torch kernel) and differ
only in how integer counts are made, so they give bit-identical statistics. States of disjoint shards combine with
:meth:`ChannelStats.merge` into exactly what one pass over the whole data gives, whatever the
order: counts and histograms add, and top-k lists are merged under a total order (value
descending, then image index ascending), which also makes ties deterministic.

NaN values are counted per channel (``nan``) and in no histogram bin; they are neither
positive nor a maximum for ranking (a NaN spatial max ranks below every number), while
``mean``, ``std`` and ``max`` of a channel that produced NaN are NaN.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from . import _native

log = logging.getLogger(__name__)

#: Fixed histogram edges: 0 and +-2**k for k = -6..6; values beyond +-64 fall into the two
#: outer bins. Bin ``j`` counts ``edges[j-1] < x <= edges[j]`` (bin 0: ``x <= edges[0]``,
#: last bin: ``x > edges[-1]``), so "positive" is exactly the bins above the 0 edge.
_POWERS = [2.0**k for k in range(-6, 7)]
DEFAULT_EDGES: tuple[float, ...] = tuple([-p for p in reversed(_POWERS)] + [0.0] + _POWERS)

#: Rankings an atlas can keep top-k lists for: the channel's spatial max or spatial mean.
RANKINGS = ("max", "mean")

#: Index used for empty top-k slots; sorts after every real image index.
PAD_INDEX = torch.iinfo(torch.int64).max


#: Values per eager histogram tile. A tile's two int32 work buffers (256 KB) and the
#: layer's exponent-code counts (``C x CODES`` int64) are all the extra memory the eager
#: histogram takes, whatever the batch size (docs/atlas.md). At most ATen's parallel grain (32768), so each
#: op on a tile runs on one thread from the cache: bigger tiles wake the thread pool for
#: every op, which costs far more than it saves, worst on a busy machine.
CHUNK = 1 << 15


def _pow2_bins(x: torch.Tensor) -> torch.Tensor:
    """Bin of every float32 value for :data:`DEFAULT_EDGES`, from its exponent bits; NaN
    gets the extra bin ``len(DEFAULT_EDGES) + 1``.

    With edges 0 and +-2**k the bin is a function of the binary exponent: for x > 0 it is
    ``ceil(log2 x) + 20`` clamped to bins 14..27, for x <= 0 (-0.0 included)
    ``6 - floor(log2 |x|)`` clamped to bins 0..13; +inf is bin 27, -inf bin 0. A dozen
    integer ops, exact (tested against ``bucketize``), that ``torch.compile`` fuses into one
    elementwise kernel; bucketize's binary search costs several times more per value.
    """
    bits = x.view(torch.int32)
    magnitude = bits & 0x7FFFFFFF
    up = ((magnitude - 1) >> 23).clamp(120, 133) - 106  # positive: x in (2**(c-1), 2**c]
    down = 133 - (magnitude >> 23).clamp(120, 133)  # |x| in [2**f, 2**(f+1))
    bins = torch.where(bits > 0, up, down)
    return torch.where(magnitude > 0x7F800000, len(DEFAULT_EDGES) + 1, bins)


def _keys(x: torch.Tensor, edges: torch.Tensor, pow2: bool, offsets: torch.Tensor
          ) -> torch.Tensor:
    """int32 histogram key of every value of the rows ``x``: its bin (NaN: the extra bin
    ``len(edges) + 1``) plus its row's channel offset, for one ``bincount``.

    Only integers come out, so every exact way of computing them (this function compiled,
    :func:`_pow2_codes` mapped to bins with the NaN moved, bucketize) gives bit-identical histograms.
    """
    x = x.float()
    if pow2:
        bins = _pow2_bins(x)
    else:
        bins = torch.bucketize(x, edges, out_int32=True, right=False)
        bins = torch.where(torch.isnan(x), edges.shape[0] + 1, bins)
    return bins + offsets


#: Exponent codes :func:`_pow2_codes` keeps apart: ``k`` clamped to ``[-137, 133]``; add
#: :data:`CODE_OFFSET` to start them at 0.
CODES = 271
CODE_OFFSET = 137
#: The bin of code ``k = -1``: +0.0, and also (moved by the caller) -inf and NaN with the
#: sign bit set.
_ZERO_BIN = 13


def _code_bins(device: torch.device | str = "cpu") -> torch.Tensor:
    """The :data:`DEFAULT_EDGES` bin of every exponent code of :func:`_pow2_codes` (int64
    (CODES,), code ``k`` at ``k + CODE_OFFSET``): ``k >= 0`` (x > 0, biased exponent of
    ``m - 1``): ``clamp(k, 120, 133) - 106``; ``k = -1`` (+0.0): 13; ``k <= -2`` (x < 0
    with biased exponent ``E = k + 256``, clamped from below): ``133 - clamp(E, 120,
    133)``."""
    k = torch.arange(-CODE_OFFSET, CODES - CODE_OFFSET, device=device)
    negative = 133 - (k + 256).clamp(120, 133)
    bins = torch.where(k >= 0, k.clamp(120, 133) - 106, negative)
    return torch.where(k == -1, _ZERO_BIN, bins)


def _pow2_codes(x: torch.Tensor, offsets: torch.Tensor,
                work: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """Exponent code of every float32 value of ``x`` plus ``offsets`` (which must include
    the ``+CODE_OFFSET`` that makes codes start at 0): five cheap integer ops, no
    ``torch.where`` (on CPU ``where`` costs more than all of them together).
    :func:`_code_bins` maps codes to :data:`DEFAULT_EDGES` bins once per layer, on the
    counts, not on every value.

    With the float's bits as an int32 ``b``, ``k = (b - [b >= 0]) >> 23``. For x >= +0
    (``b = m`` >= 0) that is ``floor((m - 1) / 2**23)``: ``x > 2**j`` exactly when ``k >=
    j + 127`` (an exact power of two stays in the lower bin), +0.0 gets -1. For x < 0
    (-0.0 included) it is ``E - 256`` with ``E`` the biased exponent: ``|x|`` in ``[2**j,
    2**(j+1))`` (the bin ``(-2**(j+1), -2**j]``) exactly when ``E = j + 127``. So the bin
    is a function of ``k`` clamped to ``[-137, 133]``, except that -inf and NaN with the
    sign bit set share +0.0's code -1 and NaN with the sign bit clear gets the top code
    (the last value bin): the caller moves them (their rows' sums are not finite). Tested
    against ``bucketize`` on every power of two, its neighbours, zeros, subnormals and
    +inf.

    ``x`` may also be the float32 values' bits already viewed as int32. ``work``: two
    contiguous int32 buffers of at least ``x.numel()`` values (or exactly ``x``'s shape) to
    compute in (the result is the second): a fresh tensor per op costs more than the op
    itself (a tile's 128 KB are served by ``mmap`` and page faults); optionally then the
    int32 0-dim constants 0 and 23 (a Python number is converted at every call).
    """
    bits = x if x.dtype == torch.int32 else x.view(torch.int32)
    if work is None:
        q = bits - torch.ge(bits, 0).to(torch.int32)
        q.bitwise_right_shift_(23)
    else:
        zero, k23 = work[2:] if len(work) > 2 else (0, 23)
        first, second = work[0], work[1]
        if first.shape != x.shape:
            first, second = (w[:x.numel()].view(x.shape) for w in (first, second))
        torch.ge(bits, zero, out=first)  # 1 for x >= +0 (NaN with the sign bit clear too)
        q = torch.sub(bits, first, out=second).bitwise_right_shift_(k23)
    return q.clamp_(-CODE_OFFSET, CODES - CODE_OFFSET - 1).add_(offsets)


def _counts(x: torch.Tensor, edges: torch.Tensor, pow2: bool, offsets: torch.Tensor,
            size: int) -> torch.Tensor:
    """Histogram counts ``(size,)`` of the keys of ``x`` (see :func:`_keys`). Compiled, the
    keys are made and counted in one kernel and never stored, so the whole layer goes in one
    call with no extra memory."""
    keys = _keys(x, edges, pow2, offsets).view(-1)
    return torch.zeros(size, dtype=torch.int64, device=x.device).index_add_(0, keys,
                                                                            _ones(keys))


_compiled: dict[str, Callable[..., Any]] = {}

#: Values per block of the compiled exponent codes on CPU: one int32 key per value (4 MB),
#: counted by one ``bincount`` while in the cache.
COMPILED_CHUNK = 1 << 20


def _codes_into(x: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor) -> None:
    """:func:`_pow2_codes` of the rows ``x`` (r, M) plus ``offsets`` (r, 1), written into
    ``out`` (r, M) int32; compiled, one fused elementwise kernel."""
    bits = x.view(torch.int32)
    q = (bits - (bits >= 0).to(torch.int32)) >> 23
    out.copy_(q.clamp(-CODE_OFFSET, CODES - CODE_OFFSET - 1) + offsets)


def _compiled_codes() -> Callable[..., Any]:
    """:func:`_codes_into` through ``torch.compile`` (one kernel for every layer shape)."""
    if "codes" not in _compiled:
        _compiled["codes"] = torch.compile(_codes_into, dynamic=True)
    return _compiled["codes"]


def _compiled_counts() -> Callable[..., Any]:
    """:func:`_counts` through ``torch.compile`` (one fused kernel per layer and batch)."""
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(_counts, dynamic=True)
    return _compiled["fn"]


class ChannelStats:
    """Running statistics and top-k examples of one layer's channels.

    ``channels`` (C), ``k`` examples per channel and ranking, ``rankings`` (subset of
    ``("max", "mean")``), ``edges`` (fixed histogram edges). Tensors live on ``device``.
    """

    def __init__(self, channels: int, k: int, *, rankings: Sequence[str] = ("max",),
                 edges: Sequence[float] = DEFAULT_EDGES, device: torch.device | str = "cpu"):
        self.channels = int(channels)
        self.k = int(k)
        self.rankings = tuple(rankings)
        self.device = torch.device(device)
        self.edges = torch.tensor(list(edges), dtype=torch.float32, device=self.device)
        if self.edges.dim() != 1 or not bool((self.edges[1:] > self.edges[:-1]).all()):
            raise ValueError("histogram edges must be a strictly increasing sequence")
        self._pow2 = [float(e) for e in edges] == list(DEFAULT_EDGES)
        self.images = 0  # images reduced so far
        self.positions = 0  # values per channel per image (H * W); fixed per layer
        self.spatial: tuple[int, int] = (0, 0)
        c, dev = self.channels, self.device
        self.sum = torch.zeros(c, dtype=torch.float64, device=dev)
        self.sumsq = torch.zeros(c, dtype=torch.float64, device=dev)
        self.max = torch.full((c,), -float("inf"), dtype=torch.float32, device=dev)
        self.hist = torch.zeros(c, len(edges) + 1, dtype=torch.int64, device=dev)
        self.nan = torch.zeros(c, dtype=torch.int64, device=dev)
        self.top: dict[str, dict[str, torch.Tensor]] = {
            name: _empty_top(c, self.k, dev) for name in self.rankings
        }
        self._code_table: torch.Tensor | None = None  # exponent code -> bin
        self._buffers: tuple[torch.Tensor, ...] | None = None  # see _native_buffers
        #: Reduce rows with the C kernel where it applies (see :meth:`update`); an atlas
        #: run sets it once for all its layers (the kernel it recorded).
        self.native = True

    # ------------------------------------------------------------------ update

    def update(self, activation: torch.Tensor, indices: torch.Tensor, *,
               compiled: bool = False, pool: ThreadPoolExecutor | None = None,
               native: bool | None = None) -> None:
        """Fold a batch ``(N, C, H, W)`` (or ``(N, C)``) whose images have dataset indices
        ``indices`` (N,) into the state. The activation is only read, never kept.
        ``native`` (default: the ``native`` attribute, True unless set; on CPU with the
        default edges): every row's max, sum, sum of squares
        and histogram counts come from one read by the C kernel of
        :mod:`convscope.atlas._native` (float64 row sums), in both modes (``compiled``:
        on ``torch.get_num_threads()`` threads, same result); without a C
        compiler, or with ``native=False``, from torch ops. ``compiled`` makes the torch
        histogram's exponent codes (or bin ids) with ``torch.compile``-d kernels (same
        result). ``pool``: threads that share the rows (native) or the eager tiles'
        channel blocks; same result. The atlas's pass uses one only with
        ``build(..., reduction_threads=2)`` or more (it needs an idle core: next to the
        model's OpenMP threads on a loaded machine it measured far slower). The native
        and torch reductions differ in the last bits of the sums (another summation
        order): one run uses one of them."""
        x = activation.detach()
        if x.dim() == 2:
            x = x[:, :, None, None]
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"expected activations (N, {self.channels}, H, W), got {tuple(x.shape)}"
            )
        n, c, h, w = x.shape
        if self.positions and (h, w) != self.spatial:
            raise ValueError(f"spatial size changed from {self.spatial} to {(h, w)}")
        self.spatial, self.positions = (h, w), h * w
        rows = x.reshape(n * c, h * w)
        if rows.dtype != torch.float32 or not rows.is_contiguous():
            rows = rows.float().contiguous()
        native = self.native if native is None else native
        kernel = _native.kernel() if (
            native and self._pow2 and rows.device.type == "cpu" and 0 < h * w < 2**31) else None
        if kernel is not None:
            values, where, total, squares = self._native_rows(kernel, rows, n, pool, compiled)
            self.sum += total.sum(0)
            self.sumsq += squares.sum(0)
            self.images += n
            self.max = torch.maximum(self.max, values.amax(0))
            # the kernel found every row's max position on the way; the lists in C too
            self._native_top(kernel, values, where, total, indices, w)
            return
        values, total, squares = self._torch_rows(rows, n, compiled, pool, h * w <= CHUNK)
        self.sum += total.double().sum(0)
        self.sumsq += squares.double().sum(0)
        self.images += n
        self.max = torch.maximum(self.max, values.amax(0))
        idx = indices.to(self.device, torch.int64).view(n, 1).expand(n, c)
        scores = {name: values if name == "max" else total / float(h * w)
                  for name in self.rankings}
        picks = {name: _pick_top(self.top[name], scores[name].T, idx.T)
                 for name in self.rankings}
        location = self._locate(rows, values, picks, c, w)
        for name in self.rankings:
            _apply_top(self.top[name], scores[name].T, idx.T, location.transpose(0, 1),
                       picks[name])

    def _native_top(self, native: _native.Kernel, values: torch.Tensor, where: torch.Tensor,
                    total: torch.Tensor, indices: torch.Tensor, w: int) -> None:
        """Insert the rows (N, C) of :meth:`_native_rows` into every top-k list, in place,
        by the C kernel: the same lists, bit for bit, as :func:`_pick_top` and
        :func:`_apply_top` make (same scores, same total order; tested against them), in
        one call per ranking instead of about 25 torch ops. The lists are (re)made
        contiguous with their dtypes first (a loaded state may be neither)."""
        n, c = values.shape
        idx = indices.to("cpu", torch.int64).reshape(n).contiguous()
        for name in self.rankings:
            top = self.top[name]
            for key, dtype in (("value", torch.float32), ("index", torch.int64),
                               ("location", torch.int32)):
                if top[key].dtype != dtype or not top[key].is_contiguous():
                    top[key] = top[key].to(dtype).contiguous()
            native.top_insert(values.data_ptr(), total.data_ptr(), where.data_ptr(),
                              idx.data_ptr(), n, c, w, self.positions, name == "mean",
                              self.k, top["value"].data_ptr(), top["index"].data_ptr(),
                              top["location"].data_ptr())

    def _native_buffers(self, n: int, threads: int) -> tuple[torch.Tensor, ...]:
        """The (N, C) outputs of :meth:`_native_rows` and the zeroed per-thread counts,
        kept from batch to batch (the kernel's fold leaves the counts zeroed): fresh
        tensors of a few hundred KB per layer and batch come from ``mmap`` and cost page
        faults (measured: more than the kernel's row outputs take to fill). Only read
        within :meth:`update`."""
        c = self.channels
        held = self._buffers
        if held is None or held[0].shape[0] != n:
            held = (torch.empty(n, c, dtype=torch.float32),
                    torch.empty(n, c, dtype=torch.int64),
                    torch.empty(n, c, dtype=torch.float64),
                    torch.empty(n, c, dtype=torch.float64))
        counts = held[4] if len(held) > 4 and held[4].shape[0] == threads else torch.zeros(
            threads, c, _native.BINS, dtype=torch.int64)
        self._buffers = (*held[:4], counts)
        return self._buffers

    def _native_rows(self, native: _native.Kernel, rows: torch.Tensor, n: int,
                     pool: ThreadPoolExecutor | None, compiled: bool = False
                     ) -> tuple[torch.Tensor, ...]:
        """Every row's max (float32: the element ``max(dim=1)`` returns), its first
        position (int64), sum and sum of squares (float64) as (N, C) tensors, with the
        histogram and NaN counts added to the state: one read of every value by the C
        kernel (:mod:`convscope.atlas._native`). With ``pool``, contiguous blocks of
        rows go to the threads (ctypes releases the GIL), each with its own counts, added
        afterwards (integers: the same result; each row is reduced whole by one thread);
        ``compiled`` (the mode that used every OpenMP thread before the kernel) does the
        same with ``torch.get_num_threads()`` threads (torch's OpenMP team where the
        kernel can share its runtime, else POSIX threads started by the kernel).
        Layers under ``4 * CHUNK`` values run on one thread (starting threads would cost
        more)."""
        r, m = rows.shape
        c = self.channels
        if pool is not None:
            threads = max(2, torch.get_num_threads())
        else:
            threads = torch.get_num_threads() if compiled else 1
        threads = min(threads, r) if rows.numel() >= 4 * CHUNK else 1
        values, where, total, squares, counts = self._native_buffers(n, threads)
        bounds = [r * i // threads for i in range(threads + 1)]
        x = rows.data_ptr()
        out = (values.data_ptr(), where.data_ptr(), total.data_ptr(), squares.data_ptr())

        def run(part: int) -> None:
            r0, r1 = bounds[part], bounds[part + 1]
            native.reduce_rows(x + r0 * m * 4, r1 - r0, m, c, r0, out[0] + r0 * 4,
                               out[1] + r0 * 8, out[2] + r0 * 8, out[3] + r0 * 8,
                               counts[part].data_ptr())

        if threads > 1 and pool is not None:
            list(pool.map(run, range(threads)))
        elif threads > 1:
            native.reduce_rows_threads(x, r, m, c, 0, *out, counts.data_ptr(), threads)
        else:
            run(0)
        for key in ("hist", "nan"):  # written through pointers: a loaded state may
            held = getattr(self, key)  # be neither contiguous nor int64
            if held.dtype != torch.int64 or not held.is_contiguous():
                setattr(self, key, held.to(torch.int64).contiguous())
        native.fold_counts(counts.data_ptr(), threads, c, self.hist.data_ptr(),
                           self.nan.data_ptr())
        return values, where, total, squares

    def _torch_rows(self, rows: torch.Tensor, n: int, compiled: bool,
                    pool: ThreadPoolExecutor | None, fused: bool
                    ) -> tuple[torch.Tensor, ...]:
        """Every row's max, sum and squared 2-norm (float32 (N, C)), with the histogram
        counted into the state, by torch ops (GPU, custom edges, or no C compiler)."""
        c = self.channels
        # The spatial max alone (vectorised; NaN propagates): where it is, the slow part of
        # ``max(dim=1)``, is only needed for the rows that enter a top-k list (below).
        # Sum of squares as the squared 2-norm: one vectorised pass, no (R, M) temporary
        # (several times faster than a batched dot product on CPU).
        values, total, norms = (torch.empty(n, c, dtype=torch.float32, device=rows.device)
                                for _ in range(3))
        # On CPU with whole maps in a tile (``fused``), the three reductions run tile by
        # tile (eager: while the histogram has the tile in the cache, one read of the batch
        # instead of four). Each row is reduced whole, serially, by the same kernel in both
        # modes, so eager and compiled give the same bits whatever the thread count.
        fused = fused and rows.device.type == "cpu"
        if not fused:  # whole-layer reductions, rows split among threads: the same bits
            torch.amax(rows, dim=1, out=values.view(-1))
            torch.sum(rows, dim=1, out=total.view(-1))
            torch.linalg.vector_norm(rows, dim=1, out=norms.view(-1))
        self._histogram(rows, total.view(-1), compiled,
                        (values, total, norms) if fused else None, pool)
        return values, total, norms.square_()

    def _locate(self, rows: torch.Tensor, values: torch.Tensor,
                picks: dict[str, torch.Tensor], c: int, w: int) -> torch.Tensor:
        """(N, C, 2) (row, col) of every row's spatial max, for the rows that enter a top-k
        list (``picks``: the chosen columns (C, k), those >= k are this batch's images);
        other rows get a placeholder that no list keeps. ``max(dim=1)`` on just those rows
        gives exactly what it gives on the whole batch (first position of the max; NaN
        wins): after the first batches few images enter, so most rows never pay for the
        position (``max`` with indices is several times slower than ``amax``). ``values``
        (N, C) takes the max that ``max`` returns for those rows (the same number; this keeps
        the very element, down to the sign of a zero)."""
        r = rows.shape[0]
        k = next(iter(picks.values())).shape[1]
        wanted = torch.cat([((pick - k) * c + torch.arange(c, device=pick.device).view(c, 1)
                             )[pick >= k] for pick in picks.values()])
        location = torch.zeros(r, 2, dtype=torch.int32, device=rows.device)
        if wanted.numel() == 0:
            return location.view(-1, c, 2)
        flat = values.view(-1)
        if wanted.numel() * 2 >= r:  # most rows: one pass over all of them
            best, where = rows.max(dim=1)
            location[:, 0], location[:, 1] = where // w, where % w
            flat.copy_(best)
        else:
            unique = torch.unique(wanted)
            best, where = rows.index_select(0, unique).max(dim=1)
            location.index_copy_(0, unique, torch.stack([where // w, where % w], 1).to(
                torch.int32))
            flat.index_copy_(0, unique, best)
        return location.view(-1, c, 2)

    def _histogram(self, rows: torch.Tensor, total: torch.Tensor, compiled: bool,
                   rowstats: tuple[torch.Tensor, ...] | None = None,
                   pool: ThreadPoolExecutor | None = None) -> None:
        """Count every value of ``rows`` (R = N x C rows of M values) into ``hist`` and
        ``nan``. Compiled: one fused kernel that stores no bin id. Eager: tiles of at most
        :data:`CHUNK` values (see :meth:`_eager_counts`)."""
        c, stride = self.channels, self.hist.shape[1] + 1  # value bins + the NaN bin
        if compiled and self._pow2 and rows.device.type == "cpu":
            if rowstats is not None:  # one thread, tile by tile, from the cache
                self._eager_counts(rows.view(-1, c, rows.shape[1]), total, stride, rowstats,
                                   histogram=False)
            counts = self._compiled_code_counts(rows, total, stride)
        elif compiled:
            if rowstats is not None:
                self._eager_counts(rows.view(-1, c, rows.shape[1]), total, stride, rowstats,
                                   histogram=False)
            r = rows.shape[0]
            offsets = ((torch.arange(r, device=rows.device) % c) * stride).to(torch.int32)
            counts = _compiled_counts()(rows, self.edges, self._pow2, offsets.view(r, 1),
                                        c * stride)
            counts = counts.view(c, stride)
        else:
            counts = self._eager_counts(rows.view(-1, c, rows.shape[1]), total, stride,
                                        rowstats, pool)
        self.hist += counts[:, :-1]
        self.nan += counts[:, -1]

    def _compiled_code_counts(self, rows: torch.Tensor, total: torch.Tensor, stride: int
                              ) -> torch.Tensor:
        """Histogram counts ``(C, stride)`` of ``rows`` (R, M) on CPU with the default
        edges (the caller has the row reductions, tile by tile or whole-layer: the same
        bits): the exponent codes of :func:`_pow2_codes` made by one ``torch.compile``-d
        kernel (all threads, one read of the values) for blocks of whole rows of at most
        :data:`COMPILED_CHUNK` values, each block counted by one ``bincount``. The same
        integer codes and counts as the eager tiles, so the same histogram."""
        r, m = rows.shape
        c, device = self.channels, rows.device
        span = max(1, min(r, COMPILED_CHUNK // m))
        keys = torch.empty(span * m, dtype=torch.int32, device=device)
        offsets = ((torch.arange(r, device=device, dtype=torch.int32) % c) * CODES
                   + CODE_OFFSET).view(r, 1)
        counts = torch.zeros(c * CODES, dtype=torch.int64, device=device)
        kernel = _compiled_codes()
        for r0 in range(0, r, span):
            part = rows[r0:r0 + span]
            out = keys[:part.numel()]
            kernel(part, offsets[r0:r0 + span], out.view(part.shape))
            counts += torch.bincount(out, minlength=counts.numel())
        if self._code_table is None or self._code_table.device != device:
            self._code_table = _code_bins(device)
        bins = torch.zeros(c, stride, dtype=torch.int64, device=device)
        bins.index_add_(1, self._code_table, counts.view(c, CODES))
        suspects = (~torch.isfinite(total)).nonzero().view(-1)  # NaN or -inf: see below
        if suspects.numel():
            self._move_nan(rows[suspects], suspects % c, bins)
        return bins

    def _eager_counts(self, x: torch.Tensor, total: torch.Tensor, stride: int,
                      rowstats: tuple[torch.Tensor, ...] | None = None,
                      pool: ThreadPoolExecutor | None = None, histogram: bool = True
                      ) -> torch.Tensor:
        """Histogram counts ``(C, stride)`` of ``x`` (N, C, M), tile by tile.

        A tile is the block ``x[n0:n1, c0:c1, m0:m1]`` of at most :data:`CHUNK` values
        (whole maps of a few channels for all images when they fit, else fewer images, else
        pieces of one map), made by ``split`` (no Python slicing per tile). With the default
        edges each value's exponent code (:func:`_pow2_codes`, 5 integer ops in reused
        buffers) is counted per channel with ``bincount`` (tile-local keys: a ``c' x CODES``
        vector) added into ``(C, CODES)`` counts, mapped to bins once at the end; other
        edges count bins (``bucketize``; on a GPU the exact :func:`_keys`) with
        ``index_add_``. The tile, its two int32 work buffers and the tile's counts (under
        500 KB) are all the extra memory and stay in the cache. ``rowstats``: (N, C)
        outputs for each row's max, sum and 2-norm, reduced tile by tile while the tile is
        in the cache (whole maps only: ``M <= CHUNK``) into small fresh tensors joined once
        per layer; ``histogram=False`` fills only those (the compiled path's row
        reductions)."""
        n, c, m = x.shape
        device = x.device
        fast = self._pow2 and device.type == "cpu"  # on a GPU the exact kernel is cheap and
        # needs no host sync for NaN
        width = CODES if fast else stride
        counts = torch.zeros(c * width, dtype=torch.int64, device=device)
        span_m = min(m, CHUNK)
        span_n = max(1, min(n, CHUNK // span_m))
        span_c = max(1, min(c, CHUNK // (span_m * span_n)))  # > 1 only when span_n == n
        local = (torch.arange(span_c, device=device, dtype=torch.int32) * width).view(1, -1, 1)
        if fast:
            local += CODE_OFFSET  # codes start at 0
        # Tiles as views made by ``split`` (a few C++ calls per layer instead of three
        # Python slices per tile): channel blocks, then images, then pieces of maps.
        blocks = x.split(span_c, 1)
        bit_blocks = x.view(torch.int32).split(span_c, 1) if fast else blocks
        parts: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in blocks]

        inference = torch.is_inference_mode_enabled()  # thread-local: the pool's threads

        def run(chosen: range) -> None:
            """Count the channel blocks ``chosen`` (with their own work buffers)."""
            with torch.inference_mode(inference), torch.no_grad():
                count(chosen)

        def count(chosen: range) -> None:
            scratch = _Scratch(span_c * span_n * span_m, device)
            for b in chosen:
                c0, cc = b * span_c, blocks[b].shape[1]
                offsets = local[:, :cc]
                block = counts[c0 * width:(c0 + cc) * width]
                tiles = _split(blocks[b], span_n, span_m)
                bit_tiles = _split(bit_blocks[b], span_n, span_m) if fast else tiles
                for tile, bits in zip(tiles, bit_tiles, strict=True):
                    if rowstats is not None:  # fresh (n', c') outputs: no slicing per tile
                        parts[b].append((torch.amax(tile, dim=-1), torch.sum(tile, dim=-1),
                                         torch.linalg.vector_norm(tile, dim=-1)))
                    if not histogram:
                        continue
                    if fast:
                        work, keys = scratch.views(tile.shape)
                        _pow2_codes(bits, offsets, work)
                        block += torch.bincount(keys, minlength=block.numel())
                    else:
                        keys = _keys(tile, self.edges, self._pow2, offsets).view(-1)
                        block.index_add_(0, keys, _ones(keys))

        starts = range(len(blocks))
        threads = min(len(starts), max(2, torch.get_num_threads())) if pool is not None else 1
        if threads > 1 and x.numel() >= 4 * CHUNK:
            # Disjoint channel blocks per thread: disjoint counts and row outputs, so the
            # result is the same as one thread's (integers; each row reduced whole).
            list(pool.map(run, [starts[i::threads] for i in range(threads)]))
        else:
            run(starts)
        if rowstats is not None:
            for j, out in enumerate(rowstats):
                pieces = [piece[j] for block_parts in parts for piece in block_parts]
                if span_n == n:  # blocks of channels, every image: (N, c') pieces
                    out.copy_(torch.cat(pieces, 1))
                else:  # one channel per block, images cut: (n', 1) pieces, channel-major
                    out.copy_(torch.cat(pieces, 0).view(c, n).t())
        if not fast or not histogram:
            return counts.view(c, -1)
        bins = torch.zeros(c, stride, dtype=torch.int64, device=device)
        if self._code_table is None or self._code_table.device != device:
            self._code_table = _code_bins(device)  # made once per layer, not per batch
        bins.index_add_(1, self._code_table, counts.view(c, CODES))
        # Rows that can hold NaN or -inf: either makes the row's sum NaN or -inf (so does
        # an overflow). Rare, so they are fixed afterwards, row by row.
        suspects = (~torch.isfinite(total)).nonzero().view(-1)
        if suspects.numel():
            self._move_nan(x.reshape(n * c, m)[suspects], suspects % c, bins)
        return bins

    def _move_nan(self, rows: torch.Tensor, channels: torch.Tensor, counts: torch.Tensor
                  ) -> None:
        """Move what :func:`_pow2_codes` miscounts in ``rows`` (of ``channels``) in
        ``counts`` (C, stride): NaN with the sign bit clear from the last value bin and
        NaN with it set from +0.0's bin to the NaN bin; -inf from +0.0's bin to bin 0."""
        bits = rows.view(torch.int32)
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        high = (nan & (bits > 0)).sum(1)  # sign bit clear: counted in the last value bin
        every = nan.sum(1)
        minus_inf = (bits == -0x800000).sum(1)  # 0xFF800000
        last = self.hist.shape[1] - 1
        counts[:, last].index_add_(0, channels, -high)
        counts[:, _ZERO_BIN].index_add_(0, channels, high - every - minus_inf)
        counts[:, 0].index_add_(0, channels, minus_inf)
        counts[:, last + 1].index_add_(0, channels, every)

    # ------------------------------------------------------------------ merge / state

    def merge(self, other: ChannelStats) -> None:
        """Add another shard's state (same layer and settings) into this one."""
        if (other.channels, other.k, other.rankings) != (self.channels, self.k, self.rankings):
            raise ValueError("cannot merge atlas statistics built with different settings")
        if other.images == 0:
            return
        if self.images and other.spatial != self.spatial:
            raise ValueError("cannot merge statistics of different spatial sizes")
        self.spatial, self.positions = other.spatial, other.positions
        self.images += other.images
        self.sum += other.sum.to(self.device)
        self.sumsq += other.sumsq.to(self.device)
        self.max = torch.maximum(self.max, other.max.to(self.device))
        self.hist += other.hist.to(self.device)
        self.nan += other.nan.to(self.device)
        for name in self.rankings:
            theirs = {key: value.to(self.device) for key, value in other.top[name].items()}
            _merge_top(self.top[name], theirs["value"], theirs["index"], theirs["location"])

    def state_dict(self) -> dict[str, Any]:
        """Plain dict of CPU tensors and numbers (for checkpoints and gathering)."""
        return {
            "channels": self.channels, "k": self.k, "rankings": list(self.rankings),
            "edges": self.edges.cpu(), "images": self.images, "spatial": list(self.spatial),
            # copies (a state is a snapshot): updates add into sum, sumsq, hist and nan
            # and the C kernel writes the lists in place
            **{key: getattr(self, key).to("cpu", copy=True)
               for key in ("sum", "sumsq", "max", "hist", "nan")},
            "top": {name: {k: v.to("cpu", copy=True) for k, v in top.items()}
                    for name, top in self.top.items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str = "cpu"
                        ) -> ChannelStats:
        """Inverse of :meth:`state_dict`."""
        stats = cls(state["channels"], state["k"], rankings=state["rankings"],
                    edges=state["edges"].tolist(), device=device)
        stats.images = int(state["images"])
        stats.spatial = (int(state["spatial"][0]), int(state["spatial"][1]))
        stats.positions = stats.spatial[0] * stats.spatial[1]
        # copies: updates write into these tensors in place, never into the caller's state
        for key in ("sum", "sumsq", "max", "hist", "nan"):
            setattr(stats, key, state[key].to(stats.device, copy=True))
        stats.top = {name: {k: v.to(stats.device, copy=True) for k, v in top.items()}
                     for name, top in state["top"].items()}
        return stats

    # ------------------------------------------------------------------ results

    def summary(self) -> dict[str, torch.Tensor]:
        """Per-channel results as CPU tensors: count, nan, mean, std, max, frac_positive,
        dead, saturated, histogram (C, bins). ``count`` includes NaN values, the histogram
        does not (its rows add up to ``count - nan``)."""
        count = self.images * self.positions
        n = max(count, 1)
        mean = self.sum / n
        var = (self.sumsq / n - mean * mean).clamp_min(0)
        zero_edge = int(torch.searchsorted(self.edges, torch.tensor(0.0, device=self.device)))
        positive = self.hist[:, zero_edge + 1:].sum(1)
        return {
            "count": torch.full((self.channels,), count, dtype=torch.int64),
            "nan": self.nan.cpu(),
            "mean": mean.cpu(),
            "std": var.sqrt().cpu(),
            "max": self.max.cpu(),
            "frac_positive": (positive.double() / n).cpu(),
            "dead": (positive == 0).cpu(),
            "saturated": (positive == count).cpu() if count else torch.zeros(
                self.channels, dtype=torch.bool),
            "histogram": self.hist.cpu(),
        }


def _ones(like: torch.Tensor) -> torch.Tensor:
    return torch.ones((), dtype=torch.int64, device=like.device).expand(like.numel())


def _split(block: torch.Tensor, span_n: int, span_m: int) -> list[torch.Tensor]:
    """Tiles of a channel block (N, c', M): images in runs of ``span_n``, then maps in
    pieces of ``span_m`` (the order of the loops the tiles replace)."""
    pieces = block.split(span_n, 0) if span_n < block.shape[0] else (block,)
    if span_m >= block.shape[2]:
        return list(pieces)
    return [part for piece in pieces for part in piece.split(span_m, 2)]


class _Scratch:
    """Work buffers of one thread's eager histogram: two int32 buffers of ``span`` values,
    the int32 0-dim constants of :func:`_pow2_codes`, and their views shaped like each tile
    (made once per shape: a layer has at most a few tile shapes)."""

    def __init__(self, span: int, device: torch.device):
        self.buffers = (torch.empty(span, dtype=torch.int32, device=device),
                        torch.empty(span, dtype=torch.int32, device=device))
        self.constants = tuple(torch.tensor(k, dtype=torch.int32, device=device)
                               for k in (0, 23))
        self.shaped: dict[torch.Size, tuple[Any, torch.Tensor]] = {}

    def views(self, shape: torch.Size) -> tuple[Any, torch.Tensor]:
        """(work for :func:`_pow2_codes`, its result as flat keys) for a tile."""
        found = self.shaped.get(shape)
        if found is None:
            size = shape.numel()
            first, second = (b[:size] for b in self.buffers)
            found = ((first.view(shape), second.view(shape), *self.constants), second)
            self.shaped[shape] = found
        return found


def _empty_top(c: int, k: int, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "value": torch.full((c, k), -float("inf"), dtype=torch.float32, device=device),
        "index": torch.full((c, k), PAD_INDEX, dtype=torch.int64, device=device),
        "location": torch.zeros((c, k, 2), dtype=torch.int32, device=device),
    }


def _merge_top(top: dict[str, torch.Tensor], value: torch.Tensor, index: torch.Tensor,
               location: torch.Tensor) -> None:
    """Merge candidates (C, M) into the (C, k) lists in ``top``, in place.

    Order: value descending, then image index ascending (a total order, so the result is
    the same for any batching, sharding or merge order). NaN ranks below everything.
    """
    _apply_top(top, value, index, location, _pick_top(top, value, index))


def _nan_last(value: torch.Tensor) -> torch.Tensor:
    value = value.float()
    return torch.where(torch.isnan(value), -float("inf"), value)  # nan_to_num would clip inf


def _pick_top(top: dict[str, torch.Tensor], value: torch.Tensor, index: torch.Tensor
              ) -> torch.Tensor:
    """The columns (C, k) of ``[top, candidates]`` that :func:`_merge_top` keeps, in order;
    columns >= k are candidates."""
    k = top["value"].shape[1]
    values = torch.cat([top["value"], _nan_last(value)], 1)
    indices = torch.cat([top["index"], index], 1)
    by_index = torch.argsort(indices, dim=1, stable=True)
    order = torch.argsort(values.gather(1, by_index), dim=1, descending=True, stable=True)
    return by_index.gather(1, order[:, :k])


def _apply_top(top: dict[str, torch.Tensor], value: torch.Tensor, index: torch.Tensor,
               location: torch.Tensor, pick: torch.Tensor) -> None:
    """Keep the columns ``pick`` of ``[top, candidates]`` (see :func:`_pick_top`)."""
    top["value"] = torch.cat([top["value"], _nan_last(value)], 1).gather(1, pick)
    top["index"] = torch.cat([top["index"], index], 1).gather(1, pick)
    locations = torch.cat([top["location"], location], 1)
    top["location"] = locations.gather(1, pick.unsqueeze(-1).expand(-1, -1, 2))
