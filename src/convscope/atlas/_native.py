"""A small C kernel that reduces rows of float32 activations in one read (CPU atlas).

For each row of ``M`` contiguous float32 values (one (image, channel) feature map) the
kernel computes, reading every value once: the row max (NaN wins, like ``amax``), the row
sum and sum of squares in float64, and the count of every value in the 28 bins of
:data:`convscope.atlas.stats.DEFAULT_EDGES` plus a NaN bin, added into the row's channel
counts. Torch needs about ten small ops per 32768-value tile for the same work; their
dispatch overhead and the serial ``bincount`` were most of the atlas's reduction time.

The source is plain C99 (no torch headers), built at first use with the system C compiler
(``cc``, ``gcc`` or ``clang`` on ``PATH``) and loaded with :mod:`ctypes`, which releases
the GIL during a call. No OpenMP of its own: a second OpenMP runtime next to torch's slows
every forward pass; the threaded call runs on torch's own team where an OpenMP variant can
share torch's ``libgomp.so.1`` (:data:`OMP_SOURCE`), else on POSIX threads. The shared library is cached per user (``$XDG_CACHE_HOME/convscope`` or
``~/.cache/convscope``) under a hash of the source, the compiler's version, the flags and
the CPU's feature flags, written atomically (temporary file, then ``os.replace``); never
into the package. Without a compiler, or if the build fails, :func:`load` returns None and
the caller uses the torch reductions (one warning per process).

Summation order (documented because it fixes the last bits): values are assigned to
:data:`LANES` float64 accumulators by position (value ``i`` to lane ``i % LANES``),
summed in order within a lane, and the lanes are combined as a fixed pairwise tree. Squares
of float32 values are exact in float64, and ``-ffp-contract=off`` forbids fused
multiply-adds, so the result depends only on this order, not on vectorisation: the same
library gives the same bits for both ``fused`` modes (they both use it).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: float64 accumulators per row (value ``i`` goes to lane ``i % LANES``).
LANES = 16
#: Counts per channel that the kernel fills: 28 value bins, then the NaN bin.
BINS = 29

SOURCE = r"""
/* convscope atlas row reduction: see convscope/atlas/_native.py. C99 + GNU vectors. */
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <pthread.h>

#define LANES 16
#define BINS 29
#define BLOCK 256
#define SUB 8 /* sub histograms (at most) */

/* GNU vector extensions (gcc >= 9, clang): the compiler does not vectorise these lanes by
   itself without fast-math. Each operation is elementwise, so the order of the float64
   additions is exactly that of the scalar lanes: no reassociation. */
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));
typedef double vd8 __attribute__((vector_size(64)));
typedef uint8_t vu8 __attribute__((vector_size(16)));

static inline vi16 clamp16(vi16 e) { /* clamp(e, 120, 133), lane by lane */
    vi16 low = e < 120, high = e > 133;
    e = (120 & low) | (e & ~low);
    return (133 & high) | (e & ~high);
}

/* Bin of a float32 value (as its bits) for the edges 0, +-2**k (k = -6..6), bucketize
   semantics (bin j: edges[j-1] < x <= edges[j]); NaN (any sign) -> 28. x > 0: ceil(log2 x)
   clamped, from the exponent of (bits - 1); x <= 0 (-0.0 and -inf included): from the
   exponent of |x|. */
static inline int32_t bin_of(uint32_t u) {
    uint32_t mag = u & 0x7FFFFFFFu;
    int32_t up = (int32_t)((mag - 1u) >> 23);
    int32_t down = (int32_t)(mag >> 23);
    up = up < 120 ? 120 : (up > 133 ? 133 : up);
    down = down < 120 ? 120 : (down > 133 ? 133 : down);
    int32_t bin = ((int32_t)u > 0) ? up - 106 : 133 - down;
    return mag > 0x7F800000u ? 28 : bin;
}

/* Count bins[0..len) into sub histograms hist[0..sub): consecutive values go to different
   counters, so a run of equal bins does not wait for each increment's store. */
static inline void count_bins(uint32_t hist[][32], const uint8_t *bins, int64_t len,
                              const int sub) {
    int64_t i = 0;
    for (; i + sub <= len; i += sub)
        for (int t = 0; t < sub; t++) hist[t][bins[i + t]]++;
    for (; i < len; i++) hist[0][bins[i]]++;
}

/* Float bits -> int32 in the floats' order, as max(dim) compares them: -0.0 equal to
   +0.0 (key 0), every NaN above +inf (it wins, at its first position). */
static inline int32_t order_key(int32_t b) {
    if ((b & 0x7FFFFFFF) > 0x7F800000) return INT32_MAX;
    int32_t k = b ^ ((b >> 31) & 0x7FFFFFFF);
    return k == -1 ? 0 : k;
}

/* Rows [0, rows) of x (rows x m, contiguous); row r belongs to channel
   (first_row + r) % channels. Writes maxv[r], sum[r], sumsq[r]; adds the row's bin counts
   to counts[channel * BINS + bin] (int64, channels x BINS). The max is taken on order
   keys (integer max vectorises; the float compare does not without fast-math):
   where[r] is its first position (the first NaN if any), maxv[r] the element there, as
   torch's max(dim) returns them. m < 2**31. */
void convscope_reduce_rows(const float *x, int64_t rows, int64_t m, int64_t channels,
                           int64_t first_row, float *maxv, int64_t *where, double *sum,
                           double *sumsq, int64_t *counts) {
    uint8_t bins[BLOCK];
    uint32_t hist[SUB][32];
    int64_t channel = first_row % channels;
    int sub = m >= 256 ? 8 : 4; /* sub histograms in use (zeroed and folded per row) */
    for (int64_t r = 0; r < rows; r++) {
        const float *p = x + r * m;
        const int32_t *bits = (const int32_t *)p;
        vi16 mk, at, lane;
        vd8 s0, s1, q0, q1;
        for (int j = 0; j < LANES; j++) { mk[j] = INT32_MIN; at[j] = 0; lane[j] = j; }
        for (int j = 0; j < 8; j++) { s0[j] = 0.0; s1[j] = 0.0; q0[j] = 0.0; q1[j] = 0.0; }
        memset(hist, 0, sizeof(hist[0]) * sub);
        for (int64_t i0 = 0; i0 < m; i0 += BLOCK) {
            int64_t len = m - i0 < BLOCK ? m - i0 : BLOCK;
            const float *v = p + i0;
            const int32_t *vb = bits + i0;
            int64_t full = len - len % LANES;
            for (int64_t i = 0; i < full; i += LANES) {
                vi16 k;
                vf8 a0, a1;
                memcpy(&k, vb + i, sizeof k);
                memcpy(&a0, v + i, sizeof a0);
                memcpy(&a1, v + i + 8, sizeof a1);
                vi16 mag = k & 0x7FFFFFFF; /* bin_of, lane by lane */
                vi16 up = (mag - 1) >> 23, down = mag >> 23;
                up = clamp16(up) - 106;
                down = 133 - clamp16(down);
                vi16 positive = k > 0, nan = mag > 0x7F800000;
                vi16 bin = (up & positive) | (down & ~positive);
                bin = (28 & nan) | (bin & ~nan);
                vu8 small = __builtin_convertvector(bin, vu8);
                memcpy(bins + i, &small, sizeof small);
                k ^= (k >> 31) & 0x7FFFFFFF; /* order_key, lane by lane */
                k -= k == -1;
                k = (INT32_MAX & nan) | (k & ~nan);
                vi16 more = k > mk; /* strict: a lane keeps its first position */
                mk = (k & more) | (mk & ~more);
                vi16 position = lane + (int32_t)(i0 + i);
                at = (position & more) | (at & ~more);
                vd8 d0 = __builtin_convertvector(a0, vd8);
                vd8 d1 = __builtin_convertvector(a1, vd8);
                s0 += d0;
                s1 += d1;
                q0 += d0 * d0;
                q1 += d1 * d1;
            }
            for (int64_t i = full; i < len; i++) { /* value i0 + i goes to lane i % LANES */
                int j = (int)(i % LANES);
                int32_t k = order_key(vb[i]);
                double d = (double)v[i];
                if (k > mk[j]) { mk[j] = k; at[j] = (int32_t)(i0 + i); }
                if (j < 8) { s0[j] += d; q0[j] += d * d; }
                else { s1[j - 8] += d; q1[j - 8] += d * d; }
            }
            for (int64_t i = full; i < len; i++) bins[i] = (uint8_t)bin_of((uint32_t)vb[i]);
            if (sub == 8) count_bins(hist, bins, len, 8);
            else count_bins(hist, bins, len, 4);
        }
        /* Fixed pairwise combination of the lanes: lane j + w into lane j (w = 8 is the
           vector addition of lanes 0-7 and 8-15). */
        vd8 sv = s0 + s1, qv = q0 + q1;
        double s[8], q[8];
        for (int j = 0; j < 8; j++) { s[j] = sv[j]; q[j] = qv[j]; }
        for (int w = 4; w >= 1; w /= 2) {
            for (int j = 0; j < w; j++) {
                s[j] += s[j + w];
                q[j] += q[j + w];
            }
        }
        int32_t best = INT32_MIN, first = INT32_MAX; /* the max; ties: the lowest position */
        for (int j = 0; j < LANES; j++) best = mk[j] > best ? mk[j] : best;
        for (int j = 0; j < LANES; j++) {
            int32_t here = mk[j] == best ? at[j] : INT32_MAX;
            first = here < first ? here : first;
        }
        for (int t = 1; t < sub; t++)
            for (int b = 0; b < 32; b++) hist[0][b] += hist[t][b];
        int64_t *out = counts + channel * BINS;
        for (int b = 0; b < BINS; b++) out[b] += hist[0][b];
        channel = channel + 1 == channels ? 0 : channel + 1;
        maxv[r] = p[first];
        where[r] = first;
        sum[r] = s[0];
        sumsq[r] = q[0];
    }
}

/* convscope_reduce_rows on `threads` POSIX threads (no OpenMP: a second OpenMP runtime
   next to torch's slows every forward pass): thread t reduces the t-th contiguous block
   of rows (rows * t / threads onwards) into its own counts (counts + t * channels * BINS),
   so every number is the same as on one thread. A thread that cannot be started has its
   block run on the calling thread. Returns 0. */
struct job {
    const float *x; int64_t rows, m, channels, first_row;
    float *maxv; int64_t *where; double *sum, *sumsq; int64_t *counts;
};

static void *run_job(void *arg) {
    struct job *j = (struct job *)arg;
    convscope_reduce_rows(j->x, j->rows, j->m, j->channels, j->first_row, j->maxv,
                          j->where, j->sum, j->sumsq, j->counts);
    return NULL;
}

int convscope_reduce_rows_threads(const float *x, int64_t rows, int64_t m,
                                  int64_t channels, int64_t first_row, float *maxv,
                                  int64_t *where, double *sum, double *sumsq,
                                  int64_t *counts, int threads) {
    enum { MAX_THREADS = 64 };
    struct job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;
    for (int t = 0; t < threads; t++) {
        int64_t r0 = rows * t / threads, r1 = rows * (t + 1) / threads;
        struct job j = {x + r0 * m, r1 - r0, m, channels, first_row + r0, maxv + r0,
                        where + r0, sum + r0, sumsq + r0, counts + t * channels * BINS};
        jobs[t] = j;
    }
    int started = 0;
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&ids[t], NULL, run_job, &jobs[t]) != 0) break;
        started = t;
    }
    run_job(&jobs[0]);
    for (int t = 1; t <= started; t++) pthread_join(ids[t], NULL);
    for (int t = started + 1; t < threads; t++) run_job(&jobs[t]); /* not started: here */
    return 0;
}

/* Add `threads` consecutive (channels, BINS) count arrays into the state: the value bins
   into hist (channels, BINS - 1), the NaN bin into nan (channels,); int64, contiguous.
   The counts are left zeroed, ready for the next batch. */
void convscope_fold_counts(int64_t *counts, int64_t threads, int64_t channels,
                           int64_t *hist, int64_t *nan) {
    for (int64_t t = 0; t < threads; t++) {
        int64_t *part = counts + t * channels * BINS;
        for (int64_t ch = 0; ch < channels; ch++) {
            for (int b = 0; b < BINS - 1; b++) hist[ch * (BINS - 1) + b] += part[ch * BINS + b];
            nan[ch] += part[ch * BINS + BINS - 1];
        }
        memset(part, 0, (size_t)(channels * BINS) * sizeof *part);
    }
}

/* Candidate (value s, image id) ranks before the list entry (v, i): value descending
   (IEEE compare: -0.0 == +0.0), then image index ascending; an equal pair keeps the
   entry first (the stable sorts of stats._pick_top: the list before the candidates,
   candidates in their order). */
static inline int ranks_before(float s, int64_t id, float v, int64_t i) {
    return s > v || (s == v && id < i);
}

/* Insert a batch's rows into the top-k lists of every channel, exactly as
   stats._pick_top/_apply_top merge them. Rows are (n, channels) row-major: maxv (float32,
   the row max element), total (float64 row sum), where (int64 position of the max); index
   (n,) the images' dataset indices. Score: mean == 0: maxv; else (float)total / (float)
   positions, in float32 (torch's total.float() / (h * w)); NaN -> -inf (stats._nan_last).
   Lists (channels, k), each sorted in that order: value float32, index int64, location
   int32 (channels, k, 2) = (where / w, where % w). Images in batch order (each
   channel's list sees its rows in that order), the rows of an image in memory order: an
   insertion keeps the list sorted, the last entry falls off. */
void convscope_top_insert(const float *maxv, const double *total, const int64_t *where,
                          const int64_t *index, int64_t n, int64_t channels, int64_t w,
                          int64_t positions, int mean, int64_t k, float *value,
                          int64_t *ids, int32_t *location) {
    if (k < 1) return;
    const float divisor = (float)positions;
    for (int64_t r = 0; r < n; r++) {
        const int64_t id = index[r];
        for (int64_t ch = 0; ch < channels; ch++) {
            float *v = value + ch * k;
            int64_t *i = ids + ch * k;
            int32_t *l = location + ch * k * 2;
            int64_t row = r * channels + ch;
            float s = mean ? (float)total[row] / divisor : maxv[row];
            if (s != s) s = -INFINITY;
            if (!ranks_before(s, id, v[k - 1], i[k - 1])) continue; /* most rows */
            int64_t p = k - 1;
            while (p > 0 && ranks_before(s, id, v[p - 1], i[p - 1])) p--;
            int64_t tail = k - 1 - p;
            memmove(v + p + 1, v + p, (size_t)tail * sizeof *v);
            memmove(i + p + 1, i + p, (size_t)tail * sizeof *i);
            memmove(l + 2 * (p + 1), l + 2 * p, (size_t)tail * 2 * sizeof *l);
            v[p] = s;
            i[p] = id;
            l[2 * p] = (int32_t)(where[row] / w);
            l[2 * p + 1] = (int32_t)(where[row] % w);
        }
    }
}
"""

#: The threaded entry point of the OpenMP variant (:data:`SOURCE` plus this, built with
#: ``-fopenmp``): the same blocks of rows and counts per thread as
#: ``convscope_reduce_rows_threads``, run by torch's own OpenMP team. Used only where the
#: library it needs is the very ``libgomp.so.1`` torch has loaded (one runtime: see
#: :func:`_torch_gomp`). Inside the atlas's pass the reductions run between convolutions,
#: while torch's OpenMP workers still spin waiting for work: a POSIX thread of our own
#: then shares a core with a spinning worker, whereas the team's workers take the blocks
#: at once (measured in the pass, 2 threads: 0.86x of plain inference against 0.74x).
OMP_SOURCE = r"""
int convscope_reduce_rows_omp(const float *x, int64_t rows, int64_t m, int64_t channels,
                              int64_t first_row, float *maxv, int64_t *where, double *sum,
                              double *sumsq, int64_t *counts, int threads) {
    if (threads < 1) threads = 1;
    #pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; t++) {
        int64_t r0 = rows * t / threads, r1 = rows * (t + 1) / threads;
        convscope_reduce_rows(x + r0 * m, r1 - r0, m, channels, first_row + r0, maxv + r0,
                              where + r0, sum + r0, sumsq + r0, counts + t * channels * BINS);
    }
    return 0;
}
"""

#: Compiler flags: optimised and vectorised for this CPU, IEEE semantics kept (no
#: fast-math; no contraction into fused multiply-adds, so the bits follow the source).
FLAGS = ("-O3", "-std=gnu99", "-fPIC", "-shared", "-pthread", "-fno-math-errno",
         "-ffp-contract=off", "-fno-strict-aliasing")
#: Tuning for this CPU, tried in order until the compiler accepts one (512-bit vectors
#: where the CPU has them: measured 1.4x faster than 256-bit for the float64 sums).
ARCHES: tuple[tuple[str, ...], ...] = (("-march=native", "-mprefer-vector-width=512"),
                                       ("-march=native",), ())


class Kernel:
    """The loaded library's row reduction (see :data:`SOURCE`)."""

    def __init__(self, path: Path, compiler: str | None = None):
        self.path = path
        self.compiler = compiler  # builds the OpenMP variant at the first threaded call
        self._omp: Any = None  # its entry point; False once unavailable
        self._lib = ctypes.CDLL(str(path))
        fn = self._lib.convscope_reduce_rows
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr]
        fn.restype = None
        self._fn = fn
        many = self._lib.convscope_reduce_rows_threads
        many.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
        many.restype = ctypes.c_int
        self._many = many
        top = self._lib.convscope_top_insert
        top.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int, i64, ptr, ptr,
                        ptr]
        top.restype = None
        self._top = top
        fold = self._lib.convscope_fold_counts
        fold.argtypes = [ptr, i64, i64, ptr, ptr]
        fold.restype = None
        self._fold = fold

    def reduce_rows(self, x: int, rows: int, m: int, channels: int, first_row: int,
                    maxv: int, where: int, total: int, sumsq: int, counts: int) -> None:
        """Reduce ``rows`` rows of ``m`` (< 2**31) float32 at address ``x`` (pointers as
        ints from ``tensor.data_ptr()``; the caller keeps the tensors alive and
        contiguous): ``maxv`` float32, ``where`` int64, ``total`` and ``sumsq`` float64
        per row, ``counts`` int64 (channels, :data:`BINS`), added to."""
        self._fn(x, rows, m, channels, first_row, maxv, where, total, sumsq, counts)

    def reduce_rows_threads(self, x: int, rows: int, m: int, channels: int,
                            first_row: int, maxv: int, where: int, total: int, sumsq: int,
                            counts: int, threads: int) -> None:
        """:meth:`reduce_rows` on ``threads`` POSIX threads started in C (blocks of rows);
        ``counts``: ``threads`` consecutive (channels, :data:`BINS`) arrays, one per
        thread, for the caller to add. Run by torch's OpenMP team where the OpenMP variant
        can share torch's runtime (:data:`OMP_SOURCE`; same blocks, same numbers)."""
        if self._omp is None:
            self._omp = self._load_omp()
        run = self._omp or self._many
        run(x, rows, m, channels, first_row, maxv, where, total, sumsq, counts, threads)

    def _load_omp(self) -> Any:
        """The OpenMP variant's entry point, or False (then POSIX threads): built only when
        torch's ``libgomp.so.1`` is loaded and a compiler is known; refused if loading it
        mapped a second OpenMP runtime (slower forwards)."""
        before = _torch_gomp()
        if self.compiler is None or before is None or not _is_gcc(self.compiler):
            return False  # clang's -fopenmp would load libomp: a second runtime
        try:
            lib = ctypes.CDLL(str(build(self.compiler, SOURCE + OMP_SOURCE, ("-fopenmp",),
                                        "atlas_rows_omp")))
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            log.info("the atlas's OpenMP kernel is unavailable (%s): POSIX threads", error)
            return False
        if _openmp_runtimes() != before:
            log.warning("the atlas's OpenMP kernel loaded a second OpenMP runtime: not used")
            return False
        fn = lib.convscope_reduce_rows_omp
        fn.argtypes = self._many.argtypes
        fn.restype = ctypes.c_int
        self._omp_lib = lib  # kept alive with the kernel
        return fn

    def fold_counts(self, counts: int, threads: int, channels: int, hist: int, nan: int
                    ) -> None:
        """Add ``threads`` consecutive int64 (channels, :data:`BINS`) count arrays into
        ``hist`` (channels, BINS - 1) and ``nan`` (channels,) (int64, contiguous), and
        zero the counts (reused for the next batch): one call instead of a sum and two
        strided additions in torch (about 50 us a layer)."""
        self._fold(counts, threads, channels, hist, nan)

    def top_insert(self, maxv: int, total: int, where: int, index: int, n: int,
                   channels: int, w: int, positions: int, mean: bool, k: int, value: int,
                   ids: int, location: int) -> None:
        """Insert a batch's (n, channels) rows into the sorted (channels, k) top-k lists
        in place (pointers as ints; contiguous tensors the caller keeps alive): the row
        max ``maxv`` (float32) or, ``mean``, float32 ``total / positions`` (``total``
        float64) ranked under the order of :func:`convscope.atlas.stats._pick_top` (value
        descending, NaN as -inf, then image index ascending), with the dataset indices
        ``index`` (int64 (n,)) and the max's (row, col) from ``where`` (int64) and the
        map width ``w``. Lists: ``value`` float32, ``ids`` int64, ``location`` int32
        (channels, k, 2)."""
        self._top(maxv, total, where, index, n, channels, w, positions, int(mean), k,
                  value, ids, location)


def cache_dir() -> Path:
    """Per-user cache folder of built kernels."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "convscope"


def find_compiler() -> str | None:
    """The system C compiler (``cc``, ``gcc`` or ``clang``), or None."""
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``), else the platform's name: the
    library is built for this CPU (``-march=native``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _openmp_runtimes() -> set[str] | None:
    """Paths of the OpenMP runtimes mapped into this process (Linux), or None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    return {line.split()[-1] for line in maps.splitlines()
            if "/" in line and any(name in line.rsplit("/", 1)[-1]
                                   for name in ("libgomp", "libiomp", "libomp"))}


def _is_gcc(compiler: str) -> bool:
    """Whether ``compiler`` is GCC (its ``-fopenmp`` needs ``libgomp.so.1``)."""
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "Free Software Foundation" in version and "clang" not in version


def _torch_gomp() -> set[str] | None:
    """The mapped OpenMP runtimes when exactly one is loaded and it is named
    ``libgomp.so.1`` (torch's on Linux): a library built with ``gcc -fopenmp`` needs that
    name, so the loader gives it the same runtime. Else None."""
    found = _openmp_runtimes()
    if found is None or len(found) != 1 or not next(iter(found)).endswith("/libgomp.so.1"):
        return None
    return found


def build(compiler: str, source: str = SOURCE, extra: tuple[str, ...] = (),
          stem: str = "atlas_rows") -> Path:
    """Build (or find in the cache) the library with ``compiler``; its path. Raises
    ``RuntimeError`` (or ``OSError``) when the build fails. ``source``, ``extra`` flags
    and the file name's ``stem``: for the OpenMP variant."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    folder = cache_dir()
    suffix = ".dll" if os.name == "nt" else ".so"
    errors = []
    for arch in ARCHES:
        flags = FLAGS + arch + extra
        key = hashlib.sha256("\0".join([source, version, " ".join(flags), _cpu_flags()])
                             .encode()).hexdigest()[:20]
        target = folder / f"{stem}_{key}{suffix}"
        if target.exists():
            return target
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            src = Path(tmp) / "atlas_rows.c"
            src.write_text(source)
            built = Path(tmp) / f"atlas_rows{suffix}"
            done = subprocess.run([compiler, *flags, "-o", str(built), str(src), "-lm"],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode == 0 and built.exists():
                os.replace(built, target)  # atomic: another process sees all or nothing
                return target
            errors.append(done.stderr.strip().splitlines()[-1:] or ["(no output)"])
    raise RuntimeError(f"{compiler} failed: {errors[-1][0]}")


def load() -> Kernel | None:
    """Build or find, then load the kernel; None (with one warning) when no compiler is
    found or building or loading fails, so the caller uses the torch reductions."""
    compiler = find_compiler()
    if compiler is None:
        log.warning("no C compiler (cc, gcc, clang) found: the atlas uses its torch "
                    "reductions (slower)")
        return None
    try:
        return Kernel(build(compiler), compiler)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        log.warning("building the atlas's C kernel failed (%s): using the torch reductions "
                    "(slower)", error)
        return None


#: The kernel once loaded (or None once it failed: one warning per process). A lazily
#: filled cache, like the compiled torch kernels of :mod:`convscope.atlas.stats`.
_loaded: dict[str, Kernel | None] = {}


def kernel() -> Kernel | None:
    """The loaded kernel (built at the first call), or None when it is unavailable."""
    if "kernel" not in _loaded:
        _loaded["kernel"] = load()
    return _loaded["kernel"]
