"""ChannelStats: hand-worked values, order-independent exact merges, fused == eager."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convscope.atlas.stats import DEFAULT_EDGES, PAD_INDEX, ChannelStats


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_hand_worked_values_and_ties(native):
    # 2 images x 2 channels x 2x2. Channel 0 ties across images (max 3 in both).
    x = torch.tensor([
        [[[1.0, 3.0], [0.0, -1.0]], [[-2.0, -2.0], [-2.0, -2.0]]],
        [[[3.0, 2.0], [0.5, 0.5]], [[-1.0, -4.0], [-3.0, -0.5]]],
    ])
    stats = ChannelStats(2, 3, rankings=("max", "mean"))
    stats.update(x, torch.tensor([7, 4]), native=native)
    top = stats.top["max"]
    # channel 0: both images reach 3.0 -> the lower index (4) first; third slot empty.
    assert top["index"][0].tolist() == [4, 7, PAD_INDEX]
    assert top["value"][0, :2].tolist() == [3.0, 3.0]
    assert top["location"][0, :2].tolist() == [[0, 0], [0, 1]]
    assert top["index"][1, :2].tolist() == [4, 7]  # -0.5 > -2
    assert top["location"][1, 0].tolist() == [1, 1]
    mean_top = stats.top["mean"]
    assert mean_top["index"][0, :2].tolist() == [4, 7]  # 6/4 > 3/4
    assert mean_top["value"][0, :2].tolist() == [1.5, 0.75]
    summary = stats.summary()
    assert summary["count"].tolist() == [8, 8]
    assert summary["mean"][0].item() == pytest.approx(9 / 8)
    values = x[:, 0].flatten().double()
    assert summary["std"][0].item() == pytest.approx(values.std(unbiased=False).item())
    assert summary["frac_positive"].tolist() == [6 / 8, 0.0]
    assert summary["dead"].tolist() == [False, True]
    assert summary["saturated"].tolist() == [False, False]
    edges = np.array(DEFAULT_EDGES)
    want = np.bincount(np.searchsorted(edges, values.numpy(), side="left"),
                       minlength=len(edges) + 1)
    np.testing.assert_array_equal(summary["histogram"][0].numpy(), want)


def test_merge_of_shards_equals_one_pass_in_any_order():
    torch.manual_seed(0)
    x = torch.randn(12, 5, 3, 4)
    x[6] = x[2]  # exact duplicate: a tie across shards
    indices = torch.arange(12)
    whole = ChannelStats(5, 4, rankings=("max", "mean"))
    for start in range(0, 12, 5):
        whole.update(x[start:start + 5], indices[start:start + 5])
    shards = [ChannelStats(5, 4, rankings=("max", "mean")) for _ in range(3)]
    for shard, part in zip(shards, ([9, 10, 11, 0], [5, 6, 7, 8], [1, 2, 3, 4]), strict=True):
        shard.update(x[part], indices[part])
    merged = ChannelStats(5, 4, rankings=("max", "mean"))
    for shard in (shards[2], shards[0], shards[1]):
        merged.merge(ChannelStats.from_state_dict(shard.state_dict()))
    for name in ("max", "mean"):
        assert torch.equal(merged.top[name]["index"], whole.top[name]["index"])
        assert torch.equal(merged.top[name]["location"], whole.top[name]["location"])
        torch.testing.assert_close(merged.top[name]["value"], whole.top[name]["value"])
    a, b = merged.summary(), whole.summary()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-12)


def test_pow2_bins_equal_bucketize_on_edges_and_extremes():
    from convscope.atlas.stats import _pow2_bins

    edges = torch.tensor(DEFAULT_EDGES)
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-45, -1e-45, 2**-7, -(2**-7),
                            *DEFAULT_EDGES, *(e * 1.0001 for e in DEFAULT_EDGES),
                            *(e * 0.9999 for e in DEFAULT_EDGES), 1e30, -1e30,
                            3.4e38, -3.4e38, float("inf"), -float("inf")])
    torch.manual_seed(2)
    x = torch.cat([special, torch.randn(5000) * 20, torch.randn(500) * 1e-3])
    assert torch.equal(_pow2_bins(x).long(), torch.bucketize(x, edges, right=False))
    nans = torch.tensor([float("nan"), -float("nan")])
    nans[1] = -nans[1].abs()  # a NaN with the sign bit set
    assert _pow2_bins(nans).tolist() == [len(DEFAULT_EDGES) + 1] * 2


def test_pow2_codes_give_the_bucketize_bin_of_every_float_class():
    """The exponent codes, mapped by _code_bins, equal bucketize on every power of two
    (normal and subnormal), its float neighbours, both zeros and +inf; -inf and NaN land
    in the outer or +0.0's bin (moved by the caller, see the histogram tests)."""
    from convscope.atlas.stats import CODE_OFFSET, _code_bins, _pow2_codes

    edges = torch.tensor(DEFAULT_EDGES)
    powers = torch.tensor([2.0**k for k in range(-149, 128)])
    x = torch.cat([powers, -powers, torch.tensor([0.0, -0.0, float("inf"),
                                                  3.4028235e38, -3.4028235e38])])
    x = torch.cat([x, torch.nextafter(x, torch.tensor(float("inf"))),
                   torch.nextafter(x, torch.tensor(-float("inf"))), torch.randn(4000) * 30])
    x = x[~torch.isnan(x) & (x != -float("inf"))]
    offset = torch.tensor(CODE_OFFSET, dtype=torch.int32)
    codes = _pow2_codes(x.clone(), offset)
    assert torch.equal(_code_bins()[codes.long()], torch.bucketize(x, edges, right=False))
    work = (torch.empty(x.numel(), dtype=torch.int32), torch.empty(x.numel(), dtype=torch.int32))
    assert torch.equal(_pow2_codes(x, offset, work), codes)
    odd = torch.tensor([float("nan"), float("nan"), -float("inf"), 0.0])
    odd[1] = -odd[1].abs()
    assert _code_bins()[_pow2_codes(odd, offset).long()].tolist() \
        == [len(DEFAULT_EDGES), 13, 13, 13]


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_positions_found_lazily_equal_a_full_argmax(native):
    """Positions are computed only for rows entering a top-k list (few after the first
    batches, all in the first): every stored location and value equals a brute force over
    all batches (first position of the max, NaN last)."""
    torch.manual_seed(5)
    batches = [torch.randn(6, 3, 5, 7) for _ in range(8)]
    batches[3][2, 1] = batches[1][0, 1]  # a tie across batches
    batches[5][1, 0, 2, 3] = float("nan")
    batches[6][0, 2] = 0.0  # a flat map: max 0 at (0, 0)
    stats = ChannelStats(3, 4, rankings=("max", "mean"))
    for b, x in enumerate(batches):
        stats.update(x, torch.arange(b * 6, b * 6 + 6), native=native)
    every = torch.cat(batches)
    flat = every.reshape(every.shape[0], 3, -1)
    peak, where = flat.max(dim=2)
    for name, score in (("max", peak), ("mean", flat.mean(dim=2))):
        score = torch.where(torch.isnan(score), -float("inf"), score)
        top = stats.top[name]
        for c in range(3):
            order = sorted(range(every.shape[0]), key=lambda i: (-float(score[i, c]), i))[:4]
            assert top["index"][c].tolist() == order
            rows = [[int(where[i, c]) // 7, int(where[i, c]) % 7] for i in order]
            assert top["location"][c].tolist() == rows
            if name == "max":
                assert top["value"][c].tolist() == [float(score[i, c]) for i in order]


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_threads_share_the_tiles_without_changing_a_number(native):
    """With a pool, rows (native) or channel blocks (torch) are reduced by several threads
    (the atlas's pass does so on CPU with reduction_threads=2): every state tensor equals
    the one-thread result, NaN rows included."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(6)
    x = torch.randn(4, 64, 32, 32) * 10  # 8 tiles of CHUNK values: enough to share
    x[1, 5, 3, 3] = float("nan")
    x[2, 60] = -0.0
    results = []
    for pool in (None, ThreadPoolExecutor(2)):
        stats = ChannelStats(64, 3, rankings=("max", "mean"))
        with torch.inference_mode():  # as in the pass: the threads must follow it
            stats.update(x, torch.arange(4), pool=pool, native=native)
        results.append(stats.state_dict())
        if pool is not None:
            pool.shutdown()
    one, shared = results
    for key in ("sum", "sumsq", "max", "hist", "nan"):
        assert torch.equal(one[key].nan_to_num(), shared[key].nan_to_num()), key
    for key, value in one["top"]["max"].items():
        assert torch.equal(shared["top"]["max"][key], value), key
    hist, nans = _numpy_histogram(x, np.array(DEFAULT_EDGES))
    np.testing.assert_array_equal(shared["hist"].numpy(), hist)
    np.testing.assert_array_equal(shared["nan"].numpy(), nans)


def _special_batch() -> torch.Tensor:
    """(3, 2, 3, 5): non-square maps with NaN (both signs), +-inf, -0.0, exact edges,
    ties."""
    torch.manual_seed(3)
    x = torch.randn(3, 2, 3, 5) * 4
    x[0, 0, 1, 2] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    x[1, 1, 2, 4] = -float("inf")
    x[2, 1, 0, 1] = -0.0
    x[2, 1, 0, 2] = 0.0
    x[0, 1, 2, 3] = 2.0  # an edge: counted in (1, 2]
    x[0, 1, 2, 4] = -2.0  # counted in (-4, -2]
    x[2, 0] = x[1, 0]  # a tie between images 1 and 2 (inf), same location
    x[2, 0, 0, 0] = 5.0
    x[2, 0, 2, 4] = float("inf")  # the same max, later position
    x[1, 1] = float("nan")  # a whole map of NaN: ranks last
    x[0, 1, 1, 1] = torch.tensor(-0x400000, dtype=torch.int32).view(torch.float32)  # -NaN
    x[0, 0, 2, 2] = -float("inf")
    x[2, 1, 2, 0] = float("inf")  # +inf and -inf in one map: a NaN sum without NaN
    x[2, 1, 2, 1] = -float("inf")
    return x


def _numpy_histogram(x: torch.Tensor, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Independent per-channel histogram: bin j holds edges[j-1] < v <= edges[j]; NaN in
    no bin, counted apart."""
    values = x.transpose(0, 1).reshape(x.shape[1], -1).numpy().astype(np.float64)
    hist, nans = [], []
    for row in values:
        finite = row[~np.isnan(row)]
        hist.append(np.bincount(np.searchsorted(edges, finite, side="left"),
                                minlength=len(edges) + 1))
        nans.append(int(np.isnan(row).sum()))
    return np.stack(hist), np.array(nans)


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_nan_inf_negative_zero_and_edges_against_numpy(native):
    x = _special_batch()
    stats = ChannelStats(2, 3, rankings=("max", "mean"))
    stats.update(x, torch.tensor([10, 11, 12]), native=native)
    summary = stats.summary()
    hist, nans = _numpy_histogram(x, np.array(DEFAULT_EDGES))
    np.testing.assert_array_equal(summary["histogram"].numpy(), hist)
    np.testing.assert_array_equal(summary["nan"].numpy(), nans)
    assert nans.tolist() == [1, 16]
    assert summary["count"].tolist() == [45, 45]
    # histogram rows add up to count - nan
    assert (summary["histogram"].sum(1) + summary["nan"]).tolist() == [45, 45]
    values = x.transpose(0, 1).reshape(2, -1)
    positive = (values > 0).sum(1).double() / 45  # NaN is not positive
    assert summary["frac_positive"].tolist() == positive.tolist()
    assert summary["max"][0].item() != summary["max"][0].item()  # NaN propagates
    # Ranking: channel 0's images 1 and 2 tie at +inf -> lower index first, at the first
    # position of the max; image 0's spatial max is NaN -> last.
    top = stats.top["max"]
    assert top["index"][0].tolist() == [11, 12, 10]
    assert top["value"][0, :2].tolist() == [float("inf")] * 2
    assert top["location"][0, :2].tolist() == [[0, 0], [2, 4]]
    assert top["index"][1, 2].item() == 11  # the all-NaN map ranks last
    assert top["value"][1, 2].item() == -float("inf")


def test_tiles_bound_memory_and_do_not_change_results(monkeypatch):
    """Torch reduction: histogram tiles never exceed CHUNK values (rows longer than CHUNK
    are cut), and the tiling changes no number."""
    from convscope.atlas import stats as stats_module

    x = _special_batch()
    whole = ChannelStats(2, 3, rankings=("max", "mean"))
    whole.update(x, torch.arange(3), native=False)
    seen: list[int] = []

    def recording(function):
        def wrapper(tile, *args):
            seen.append(tile.numel())
            return function(tile, *args)
        return wrapper

    for name in ("_keys", "_pow2_codes"):
        monkeypatch.setattr(stats_module, name, recording(getattr(stats_module, name)))
    for chunk in (4, 15, 31):  # cut rows of 15; exactly one row; two rows
        monkeypatch.setattr(stats_module, "CHUNK", chunk)
        seen.clear()
        tiled = ChannelStats(2, 3, rankings=("max", "mean"))
        tiled.update(x, torch.arange(3), native=False)
        assert max(seen) <= chunk
        assert sum(seen) == x.numel()
        assert torch.equal(tiled.hist, whole.hist)
        assert torch.equal(tiled.nan, whole.nan)
        for name in ("max", "mean"):
            for key, value in whole.top[name].items():
                assert torch.equal(tiled.top[name][key], value)


def test_custom_edges_use_bucketize_with_the_same_semantics():
    x = _special_batch()
    edges = [-1.0, 0.0, 0.5, 3.0]
    stats = ChannelStats(2, 2, edges=edges)
    stats.update(x, torch.arange(3))
    hist, nans = _numpy_histogram(x, np.array(edges))
    np.testing.assert_array_equal(stats.hist.numpy(), hist)
    np.testing.assert_array_equal(stats.nan.numpy(), nans)
    with pytest.raises(ValueError, match="increasing"):
        ChannelStats(2, 2, edges=[0.0, 0.0, 1.0])


@pytest.mark.slow
def test_compiled_and_eager_give_identical_statistics(monkeypatch):
    """Torch reductions, one kernel or the other: every number is bit-identical (NaN, inf,
    -0.0, ties, several images, rows cut into tiles). No skip: where torch.compile fails,
    this fails. (The native kernel is the same code in both modes: test_native.py.)"""
    from convscope.atlas import stats as stats_module

    monkeypatch.setattr(stats_module, "CHUNK", 32)  # 2 rows of 15 per tile; 63 cut in 2
    monkeypatch.setattr(stats_module, "COMPILED_CHUNK", 32)  # compiled codes: row blocks
    torch.manual_seed(4)
    big = torch.randn(4, 2, 7, 9) * 30
    big[0, 1, 3, 3] = float("nan")
    big[1, 0] = big[0, 0]
    big[2, 1, 0, 0] = -0.0
    big[3, 0, 6, 8] = -float("inf")
    for x in (_special_batch(), big):
        results = []
        for compiled in (False, True):
            stats = ChannelStats(2, 4, rankings=("max", "mean"))
            stats.update(x[:2], torch.arange(2), compiled=compiled, native=False)
            stats.update(x[2:], torch.arange(2, x.shape[0]), compiled=compiled, native=False)
            results.append(stats.state_dict())
        eager, fused = results
        for key in ("sum", "sumsq", "max", "hist", "nan"):
            assert torch.equal(eager[key].nan_to_num(), fused[key].nan_to_num()), key
            assert torch.equal(eager[key].isnan(), fused[key].isnan()), key
        for name in ("max", "mean"):
            for key, value in eager["top"][name].items():
                assert torch.equal(fused["top"][name][key], value), (name, key)
        hist, nans = _numpy_histogram(x, np.array(DEFAULT_EDGES))
        np.testing.assert_array_equal(fused["hist"].numpy(), hist)
        np.testing.assert_array_equal(fused["nan"].numpy(), nans)
    assert "codes" in stats_module._compiled  # the compiled exponent codes really ran
    # Other edges: the compiled fused histogram (bucketize semantics), same numbers.
    edges = [-1.0, 0.0, 0.5, 3.0]
    results = []
    for compiled in (False, True):
        stats = ChannelStats(2, 2, edges=edges)
        stats.update(big, torch.arange(4), compiled=compiled)
        results.append(stats.state_dict())
    for key in ("hist", "nan"):
        assert torch.equal(results[0][key], results[1][key]), key
    hist, nans = _numpy_histogram(big, np.array(edges))
    np.testing.assert_array_equal(results[1]["hist"].numpy(), hist)
    assert "fn" in stats_module._compiled


# Cases a mutation run (stop 20) found unpinned.


def _nan_batches() -> list[torch.Tensor]:
    """Four batches (3 images x 2 channels x 3 x 5) with NaN in known places of both
    channels, spread over the batches (so over the shards made of them)."""
    g = torch.Generator().manual_seed(11)
    batches = [torch.randn(3, 2, 3, 5, generator=g) for _ in range(4)]
    batches[0][1, 0, 2, 4] = float("nan")
    batches[1][0, 1, 0, 0] = float("nan")
    batches[1][2, 1, 1, 3] = float("nan")
    batches[3][0, 0, :, 1] = float("nan")  # a column: 3 values
    return batches


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_merged_shards_keep_the_nan_counts_of_every_shard(native: bool) -> None:
    """Two shards (two batches each) merged: per-channel NaN counts equal numpy's count
    over all the data, the histogram rows add up to ``count - nan``, and the merge equals
    one pass. A merge that forgot the other shard's NaN would under-report them."""
    batches = _nan_batches()
    shards = []
    for part in ((0, 1), (2, 3)):
        stats = ChannelStats(2, 3)
        for b in part:
            stats.update(batches[b], torch.arange(3 * b, 3 * b + 3), native=native)
        shards.append(stats)
    merged = ChannelStats(2, 3)
    for shard in reversed(shards):
        merged.merge(ChannelStats.from_state_dict(shard.state_dict()))
    values = torch.cat(batches).transpose(0, 1).reshape(2, -1).numpy()
    want_nan = np.isnan(values).sum(1)
    assert want_nan.tolist() == [4, 2]  # the data really has NaN in both channels
    summary = merged.summary()
    np.testing.assert_array_equal(summary["nan"].numpy(), want_nan)
    np.testing.assert_array_equal(summary["count"].numpy(), [values.shape[1]] * 2)
    np.testing.assert_array_equal(summary["histogram"].numpy().sum(1),
                                  values.shape[1] - want_nan)
    finite = [row[~np.isnan(row)] for row in values]
    want_hist = np.stack([np.bincount(np.searchsorted(np.array(DEFAULT_EDGES), row,
                                                      side="left"),
                                      minlength=len(DEFAULT_EDGES) + 1) for row in finite])
    np.testing.assert_array_equal(summary["histogram"].numpy(), want_hist)
    whole = ChannelStats(2, 3)
    for b, x in enumerate(batches):
        whole.update(x, torch.arange(3 * b, 3 * b + 3), native=native)
    np.testing.assert_array_equal(whole.summary()["nan"].numpy(), want_nan)

@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_minus_infinity_without_nan_lands_in_the_lowest_bin(native: bool) -> None:
    """Rows holding -inf but no NaN and no +inf (their sum is -inf, not NaN): every -inf
    is counted in bin 0 (``x <= -64``), not in the bin of +0.0, on both reductions; the
    counts equal numpy's ``searchsorted`` over two batches of 2 x 3 maps."""
    g = torch.Generator().manual_seed(7)
    batches = [torch.randn(2, 2, 2, 3, generator=g) for _ in range(2)]
    batches[0][0, 0, 1, 2] = -float("inf")
    batches[1][1, 0, 0, 0] = -float("inf")
    batches[1][1, 1, :, 1] = -float("inf")
    stats = ChannelStats(2, 2)
    for b, x in enumerate(batches):
        stats.update(x, torch.arange(2 * b, 2 * b + 2), native=native)
    values = torch.cat(batches).transpose(0, 1).reshape(2, -1).numpy()
    assert not np.isnan(values).any() and not np.isposinf(values).any()
    want = np.stack([np.bincount(np.searchsorted(np.array(DEFAULT_EDGES), row, side="left"),
                                 minlength=len(DEFAULT_EDGES) + 1) for row in values])
    assert want[:, 0].tolist() == [2, 2]  # the -inf values, and nothing else down there
    np.testing.assert_array_equal(stats.summary()["histogram"].numpy(), want)
    np.testing.assert_array_equal(stats.summary()["nan"].numpy(), [0, 0])
