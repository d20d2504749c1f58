"""The atlas's C row kernel: values against numpy, both fused modes identical, the fallback
without a compiler, the per-user cache, and one kernel per run (resume keeps it)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from convscope.atlas import _native
from convscope.atlas.stats import DEFAULT_EDGES, ChannelStats

EDGES = np.array(DEFAULT_EDGES)


def _kernel() -> _native.Kernel:
    kernel = _native.kernel()
    assert kernel is not None, "the C kernel must build here (cc is part of the test setup)"
    return kernel


def _reduce(rows: torch.Tensor, channels: int, first_row: int = 0):
    """(max, sum, sumsq, counts (C, 29), position of the max) of rows (R, M) float32 by
    the kernel."""
    rows = rows.contiguous()
    r, m = rows.shape
    maxv = torch.empty(r)
    where = torch.empty(r, dtype=torch.int64)
    total = torch.empty(r, dtype=torch.float64)
    sumsq = torch.empty(r, dtype=torch.float64)
    counts = torch.zeros(channels, _native.BINS, dtype=torch.int64)
    _kernel().reduce_rows(rows.data_ptr(), r, m, channels, first_row, maxv.data_ptr(),
                          where.data_ptr(), total.data_ptr(), sumsq.data_ptr(),
                          counts.data_ptr())
    return maxv, total, sumsq, counts, where


def _special_values() -> torch.Tensor:
    """Every float class: zeros of both signs, subnormals, powers of two and their
    neighbours (the edges), the largest floats, +-inf, NaN of both signs."""
    powers = torch.tensor([2.0**k for k in range(-149, 128)])
    x = torch.cat([powers, -powers, torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3.4028235e38,
                                                  -3.4028235e38, float("inf"),
                                                  -float("inf")])])
    x = torch.cat([x, torch.nextafter(x, torch.tensor(float("inf"))),
                   torch.nextafter(x, torch.tensor(-float("inf")))])
    nan = torch.tensor([float("nan"), float("nan")])
    nan[1] = torch.tensor(-0x400000, dtype=torch.int32).view(torch.float32)  # sign bit set
    return torch.cat([x, nan])


def _numpy_expected(rows: np.ndarray, channels: int, first_row: int = 0):
    """Independent results: float64 sums, exact max (NaN wins), bucketize-semantics bins
    from numpy's searchsorted on the values, NaN counted apart (last column)."""
    r = rows.shape[0]
    finite_rows = [row[~np.isnan(row)] for row in rows]
    with np.errstate(invalid="ignore", over="ignore"):
        total = rows.astype(np.float64).sum(1)
        sumsq = (rows.astype(np.float64) ** 2).sum(1)
    maxv = np.array([np.nan if np.isnan(row).any() else row.max() for row in rows],
                    dtype=np.float32)
    counts = np.zeros((channels, len(EDGES) + 2), dtype=np.int64)
    for i, (row, finite) in enumerate(zip(rows, finite_rows, strict=True)):
        channel = (first_row + i) % channels
        counts[channel, :-1] += np.bincount(np.searchsorted(EDGES, finite, side="left"),
                                            minlength=len(EDGES) + 1)
        counts[channel, -1] += int(np.isnan(row).sum())
    assert r == rows.shape[0]
    return maxv, total, sumsq, counts


def _check(rows: torch.Tensor, channels: int, first_row: int = 0) -> None:
    maxv, total, sumsq, counts, where = _reduce(rows, channels, first_row)
    want = _numpy_expected(rows.numpy(), channels, first_row)
    np.testing.assert_array_equal(counts.numpy(), want[3])
    np.testing.assert_array_equal(maxv.numpy(), want[0])  # exact; NaN where NaN
    best, first = rows.max(dim=1)  # torch's first position of the max (NaN wins)
    assert where.tolist() == first.tolist()
    # the very element, down to the sign of a zero and a NaN's bits
    assert torch.equal(maxv.view(torch.int32), best.view(torch.int32))
    np.testing.assert_allclose(total.numpy(), want[1], rtol=1e-13, atol=1e-300)
    np.testing.assert_allclose(sumsq.numpy(), want[2], rtol=1e-13, atol=0)


def test_every_float_class_against_numpy():
    torch.manual_seed(0)
    special = _special_values()
    # one long row (longer than the kernel's 256-value block, not a multiple of its 16
    # lanes) holding every class, the finite ones alone, and short odd rows
    _check(special[torch.randperm(special.numel())].view(1, -1), 1)
    finite = special[torch.isfinite(special) & (special.abs() < 1e30)]
    _check(finite.view(1, -1), 1)
    small = special[:285].view(15, 19)  # 15 rows of 19: lanes and tails
    _check(small, 4, first_row=3)  # rows 3, 4, ... of a 4-channel layer


@pytest.mark.parametrize("shape", [(3, 5, 1, 1), (2, 3, 17, 31), (4, 2, 1, 257),
                                   (1, 1, 64, 64), (5, 7, 3, 5)])
def test_odd_shapes_and_long_rows_against_numpy(shape):
    torch.manual_seed(1)
    x = torch.randn(*shape) * 8
    x.view(-1)[::7] = 0.0  # runs of one bin (the sub-histograms)
    x.view(-1)[::11] = -0.0
    n, c = shape[:2]
    _check(x.reshape(n * c, -1), c)


def test_zeros_of_both_signs_tie_like_torch_max():
    """-0.0 and +0.0 are equal for the max (as for torch's max(dim)): the first of them
    wins, and it is returned as it is."""
    rows = torch.full((4, 41), -2.0)
    rows[0, :2] = -0.0
    rows[1, 0], rows[1, 1], rows[1, 2] = -0.0, 0.0, -0.0
    rows[2, 1], rows[2, 2] = 0.0, -0.0
    rows[3, 20], rows[3, 21:] = -0.0, 0.0  # in other lanes of the kernel: first one wins
    maxv, _, _, _, where = _reduce(rows, 1)
    assert where.tolist() == [0, 0, 1, 20]
    assert torch.signbit(maxv).tolist() == [True, True, False, True]
    assert where.tolist() == rows.max(dim=1).indices.tolist()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_activations_are_reduced_as_float32(dtype):
    torch.manual_seed(2)
    x = (torch.randn(3, 4, 6, 5) * 50).to(dtype)
    x[0, 1, 2, 2] = float("nan")
    x[1, 2, 0, 0] = -float("inf")
    stats = ChannelStats(4, 2, rankings=("max", "mean"))
    stats.update(x, torch.arange(3))
    want = _numpy_expected(x.float().transpose(0, 1).reshape(4, -1).numpy(), 4)
    np.testing.assert_array_equal(stats.hist.numpy(), want[3][:, :-1])
    np.testing.assert_array_equal(stats.nan.numpy(), want[3][:, -1])
    np.testing.assert_array_equal(stats.max.numpy(), want[0])
    np.testing.assert_allclose(stats.sum.numpy(), want[1], rtol=1e-13)
    np.testing.assert_allclose(stats.sumsq.numpy(), want[2], rtol=1e-13)


def test_eager_and_compiled_use_the_same_kernel_bit_for_bit(monkeypatch):
    """On CPU with the default edges ``compiled`` changes only how many threads run the
    same kernel (blocks of whole rows, counts per thread): every state tensor is identical,
    the torch kernels are never called, and the threads really ran (layers of at least
    4 x CHUNK values)."""
    from convscope.atlas import stats as stats_module

    def forbidden(*args, **kwargs):
        raise AssertionError("the torch reduction ran")

    monkeypatch.setattr(stats_module.ChannelStats, "_torch_rows", forbidden)
    threaded: list[int] = []
    many = _native.Kernel.reduce_rows_threads

    def recording(self, *args):
        threaded.append(args[-1])
        return many(self, *args)

    monkeypatch.setattr(_native.Kernel, "reduce_rows_threads", recording)
    torch.manual_seed(3)
    x = torch.randn(10, 7, 61, 67) * 20  # 143045 values per batch: threads; odd rows
    x[1, 2, 3, 4] = float("nan")
    x[2, 0] = -0.0
    x[4, 1, 0, 0] = float("inf")
    x[5, 6, 60, 66] = -float("inf")
    states = []
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # an odd count: uneven blocks of rows
    try:
        for compiled in (False, True):
            stats = ChannelStats(7, 3, rankings=("max", "mean"))
            stats.update(x[:5], torch.arange(5), compiled=compiled)
            stats.update(x[5:], torch.arange(5, 10), compiled=compiled)
            states.append(stats.state_dict())
    finally:
        torch.set_num_threads(threads)
    assert threaded == [3, 3]  # the compiled runs, both batches
    for key in ("sum", "sumsq", "max", "hist", "nan"):
        assert torch.equal(states[0][key].nan_to_num(), states[1][key].nan_to_num()), key
        assert torch.equal(states[0][key].isnan(), states[1][key].isnan()), key
    for name in ("max", "mean"):
        for key, value in states[0]["top"][name].items():
            assert torch.equal(states[1]["top"][name][key], value), (name, key)
    want = _numpy_expected(x.transpose(0, 1).reshape(7, -1).numpy(), 7)
    np.testing.assert_array_equal(states[1]["hist"].numpy(), want[3][:, :-1])
    np.testing.assert_array_equal(states[1]["nan"].numpy(), want[3][:, -1])


def test_native_and_torch_agree_within_rounding():
    """The two reductions: identical counts, max and top-k; sums within float32 rounding
    of the torch path (it sums each row in float32)."""
    torch.manual_seed(4)
    x = torch.randn(4, 6, 13, 13) * 3
    results = []
    for native in (True, False):
        stats = ChannelStats(6, 2, rankings=("max", "mean"))
        stats.update(x, torch.arange(4), native=native)
        results.append(stats.state_dict())
    fast, slow = results
    for key in ("max", "hist", "nan"):
        assert torch.equal(fast[key], slow[key]), key
    torch.testing.assert_close(fast["sum"], slow["sum"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fast["sumsq"], slow["sumsq"], rtol=1e-5, atol=1e-4)
    assert torch.equal(fast["top"]["max"]["index"], slow["top"]["max"]["index"])


def test_no_compiler_falls_back_to_torch_with_one_warning(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(_native, "_loaded", {})  # a fresh process's cache
    monkeypatch.setattr(_native, "find_compiler", lambda: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    torch.manual_seed(5)
    x = torch.randn(2, 3, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="convscope.atlas._native"):
        stats = ChannelStats(3, 2)
        stats.update(x, torch.arange(2))
        stats.update(x, torch.arange(2, 4))
    warnings = [r for r in caplog.records if "no C compiler" in r.getMessage()]
    assert len(warnings) == 1
    assert _native._loaded == {"kernel": None}
    want = _numpy_expected(x.transpose(0, 1).reshape(3, -1).numpy(), 3)
    np.testing.assert_array_equal(stats.hist.numpy(), 2 * want[3][:, :-1])
    np.testing.assert_array_equal(stats.nan.numpy(), 2 * want[3][:, -1])
    assert not (tmp_path / "convscope").exists()


def test_failed_build_falls_back_and_the_cache_is_per_user(monkeypatch, caplog, tmp_path):
    import shutil

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(_native, "_loaded", {})
    monkeypatch.setattr(_native, "find_compiler", lambda: shutil.which("false"))
    with caplog.at_level(logging.WARNING, logger="convscope.atlas._native"):
        assert _native.kernel() is None
    assert any("building the atlas's C kernel failed" in r.getMessage()
               for r in caplog.records)
    # A real compiler: built once into the per-user cache (no temporary left), then found.
    monkeypatch.setattr(_native, "_loaded", {})
    monkeypatch.setattr(_native, "find_compiler", lambda: shutil.which("cc")
                        or shutil.which("gcc") or shutil.which("clang"))
    kernel = _native.kernel()
    assert kernel is not None and kernel.path.parent == tmp_path / "convscope"
    assert [p.name for p in (tmp_path / "convscope").iterdir()] == [kernel.path.name]
    compiles: list[list[str]] = []
    real_run = _native.subprocess.run

    def counting(command, **kwargs):
        compiles.append(command)
        return real_run(command, **kwargs)

    monkeypatch.setattr(_native.subprocess, "run", counting)
    assert _native.build(_native.find_compiler()) == kernel.path
    assert len(compiles) == 1  # only "--version": the cached library is reused


def test_one_kernel_per_run_and_resume_keeps_it(monkeypatch):
    import importlib

    build_module = importlib.import_module("convscope.atlas.build")
    choose = build_module._choose_kernel
    cpu = torch.device("cpu")
    assert choose(cpu, DEFAULT_EDGES, None, 1) == "native"
    assert choose(cpu, DEFAULT_EDGES, "native", 1) == "native"
    assert choose(cpu, DEFAULT_EDGES, "torch", 1) == "torch"  # resumed: what it recorded
    assert choose(cpu, [-1.0, 0.0, 1.0], None, 1) == "torch"  # custom edges: bucketize
    monkeypatch.setattr(_native, "_loaded", {"kernel": None})  # no compiler here
    assert choose(cpu, DEFAULT_EDGES, None, 1) == "torch"
    with pytest.raises(build_module.AtlasError, match="C kernel"):
        choose(cpu, DEFAULT_EDGES, "native", 1)


def test_a_run_started_on_torch_resumes_on_torch(tiny_loaded, image_folder, tmp_path,
                                                monkeypatch):
    """Interrupted while no kernel was available, resumed where it is: the run keeps the
    torch reduction (recorded in the checkpoint and the atlas) and equals an uninterrupted
    torch run exactly."""
    from convscope.atlas import build

    class Stop(Exception):
        pass

    def stop(done, total, elapsed):
        if done >= 10:
            raise Stop

    out = tmp_path / "atlas"
    monkeypatch.setattr(_native, "_loaded", {"kernel": None})
    monkeypatch.setenv("CONVSCOPE_ATLAS_CHECKPOINT_BATCHES", "1")
    with pytest.raises(Stop):
        build(tiny_loaded, image_folder, ["0", "3"], topk=2, batch_size=5, out=out,
              crops=False, progress=stop)
    monkeypatch.delenv("CONVSCOPE_ATLAS_CHECKPOINT_BATCHES")
    whole = build(tiny_loaded, image_folder, ["0", "3"], topk=2, batch_size=5)
    assert whole.meta["settings"]["kernel"] == "torch"
    monkeypatch.setattr(_native, "_loaded", {})  # the kernel is available again
    resumed = build(tiny_loaded, image_folder, ["0", "3"], topk=2, batch_size=5, out=out,
                    crops=False, resume=True)
    assert resumed.meta["settings"]["kernel"] == "torch"
    fresh = build(tiny_loaded, image_folder, ["0", "3"], topk=2, batch_size=5)
    assert fresh.meta["settings"]["kernel"] == "native"
    for layer in ("0", "3"):
        for key, value in whole.stats(layer).items():
            np.testing.assert_array_equal(resumed.stats(layer)[key], value, err_msg=key)
            np.testing.assert_allclose(fresh.stats(layer)[key], value, rtol=1e-5,
                                       atol=1e-6, err_msg=key)
        np.testing.assert_array_equal(resumed.histogram(layer)[0], whole.histogram(layer)[0])
        np.testing.assert_array_equal(fresh.histogram(layer)[0], whole.histogram(layer)[0])


def test_threads_run_on_torchs_openmp_team_with_the_same_numbers():
    """Where torch's runtime is ``libgomp.so.1`` and the compiler is GCC (this setup), the
    threaded call runs the OpenMP variant on torch's own team: still one OpenMP runtime in
    the process, and the same bits as one thread (the same blocks of rows)."""
    kernel = _kernel()
    # Other libraries may have loaded their own runtime (scikit-learn bundles a libgomp):
    # the kernel never adds one, and takes torch's team only where it is the only one.
    runtimes = _native._openmp_runtimes()
    torch.manual_seed(8)
    rows = (torch.randn(37, 4099) * 30).contiguous()
    rows[3, 5] = float("nan")
    rows[20] = -0.0
    one = _reduce(rows, 5)
    r, m = rows.shape
    outs = (torch.empty(r), torch.empty(r, dtype=torch.int64),
            torch.empty(r, dtype=torch.float64), torch.empty(r, dtype=torch.float64))
    counts = torch.zeros(3, 5, _native.BINS, dtype=torch.int64)
    kernel.reduce_rows_threads(rows.data_ptr(), r, m, 5, 0, *(t.data_ptr() for t in outs),
                               counts.data_ptr(), 3)
    if _native._torch_gomp() is not None and _native._is_gcc(_native.find_compiler()):
        assert kernel._omp, "the OpenMP variant should be used here"
    assert _native._openmp_runtimes() == runtimes
    for got, want in zip(outs, (one[0], one[4], one[1], one[2]), strict=True):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(counts.sum(0), one[3])
