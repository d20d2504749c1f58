"""ChannelStats: hand-worked values, order-independent exact merges, fused == eager."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convscope.atlas.stats import DEFAULT_EDGES, PAD_INDEX, ChannelStats


def test_hand_worked_values_and_ties():
    # 2 images x 2 channels x 2x2. Channel 0 ties across images (max 3 in both).
    x = torch.tensor([
        [[[1.0, 3.0], [0.0, -1.0]], [[-2.0, -2.0], [-2.0, -2.0]]],
        [[[3.0, 2.0], [0.5, 0.5]], [[-1.0, -4.0], [-3.0, -0.5]]],
    ])
    stats = ChannelStats(2, 3, rankings=("max", "mean"))
    stats.update(x, torch.tensor([7, 4]))
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


def test_exponent_bins_equal_bucketize_on_edges_and_extremes():
    from convscope.atlas.stats import _exponent_bins

    edges = torch.tensor(DEFAULT_EDGES)
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 2**-7, -(2**-7), *DEFAULT_EDGES,
                            *(e * 1.0001 for e in DEFAULT_EDGES), 1e30, -1e30,
                            float("inf"), -float("inf")])
    torch.manual_seed(2)
    x = torch.cat([special, torch.randn(5000) * 20, torch.randn(500) * 1e-3])
    assert torch.equal(_exponent_bins(x).long(), torch.bucketize(x, edges, right=False))


@pytest.mark.slow
def test_compiled_fused_pass_equals_eager():
    pytest.importorskip("torch._inductor")
    torch.manual_seed(1)
    x = torch.randn(3, 4, 6, 5) * 3
    eager = ChannelStats(4, 2)
    fused = ChannelStats(4, 2)
    eager.update(x, torch.arange(3))
    try:
        fused.update(x, torch.arange(3), compiled=True)
    except Exception as error:  # no C++ toolchain here
        pytest.skip(f"torch.compile unavailable: {error}")
    assert torch.equal(eager.hist, fused.hist)
    assert torch.equal(eager.top["max"]["index"], fused.top["max"]["index"])
    assert torch.equal(eager.top["max"]["location"], fused.top["max"]["location"])
    # float32 partial sums are added in another order: equal up to rounding.
    torch.testing.assert_close(eager.sum, fused.sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager.sumsq, fused.sumsq, rtol=1e-5, atol=1e-5)
