"""convscope.stats (the numbers behind the channel panel and the report), by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convscope.stats import as_floats, channel_order, channel_stats, layer_summary


@pytest.fixture
def act() -> torch.Tensor:
    # 3 channels of 2x2: mixed signs, all zero (dead), all positive.
    return torch.tensor([
        [[1.0, -1.0], [0.0, 4.0]],
        [[0.0, 0.0], [0.0, 0.0]],
        [[2.0, 2.0], [2.0, 6.0]],
    ])


def test_channel_stats_by_hand(act):
    stats = channel_stats(act)
    assert stats["mean"].tolist() == [1.0, 0.0, 3.0]
    assert stats["max"].tolist() == [4.0, 0.0, 6.0]
    assert stats["min"].tolist() == [-1.0, 0.0, 2.0]
    assert stats["frac_positive"].tolist() == [0.5, 0.0, 1.0]
    assert stats["frac_zero"].tolist() == [0.25, 1.0, 0.0]
    # population std of (1, -1, 0, 4): mean 1, squared deviations 0+4+1+9 = 14 -> sqrt(3.5)
    assert stats["std"][0].item() == pytest.approx(3.5 ** 0.5)
    assert stats["std"][2].item() == pytest.approx(3.0 ** 0.5)
    assert as_floats(stats, 2)["mean"] == 3.0


def test_batch_pools_over_samples(act):
    batch = torch.stack([act, -act])
    stats = channel_stats(batch)
    assert stats["mean"].tolist() == [0.0, 0.0, 0.0]
    assert stats["frac_positive"].tolist() == [pytest.approx(3 / 8), 0.0, 0.5]


def test_layer_summary_and_dead_channels(act):
    summary = layer_summary(act)
    assert summary["channels"] == 3
    assert summary["dead_channels"] == [1]
    assert summary["dead_count"] == 1
    assert summary["frac_zero"] == pytest.approx(5 / 12)
    assert summary["frac_positive"] == pytest.approx(6 / 12)
    assert summary["max"] == 6.0
    assert summary["mean"] == pytest.approx(16 / 12)


def test_channel_order(act):
    assert channel_order(act) == [0, 1, 2]
    assert channel_order(act, "mean") == [2, 0, 1]
    assert channel_order(act, "max") == [2, 0, 1]
    ties = torch.zeros(4, 2, 2)
    assert channel_order(ties, "max") == [0, 1, 2, 3]  # stable: ties keep index order
    with pytest.raises(ValueError, match="by must be"):
        channel_order(act, "median")


def test_flat_and_bad_inputs():
    flat = torch.tensor([[1.0, -2.0], [3.0, 0.0]])  # (N=2, C=2)
    stats = channel_stats(flat)
    assert stats["mean"].tolist() == [2.0, -1.0]
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        channel_stats([1, 2, 3])
    with pytest.raises(ValueError, match="got"):
        channel_stats(torch.zeros(2, 2, 2, 2, 2))


# Cases a mutation run (stop 20) found unpinned.


def test_channel_order_averages_over_the_whole_batch() -> None:
    """Over a batch the order is by the batch average of the per-sample spatial mean or
    max, not by the first sample: here sample 0 alone would order the channels 0, 1, 2."""
    act = torch.zeros(2, 3, 2, 3)
    act[0, 0] = 3.0
    act[0, 1] = 2.0
    act[0, 2] = 1.0
    act[1, 0] = -3.0
    act[1, 1] = 0.0
    act[1, 2, 1, 2] = 60.0  # mean 10, max 60
    maps = act.flatten(2).numpy()
    for by, per_sample in (("mean", maps.mean(-1)), ("max", maps.max(-1))):
        want = np.argsort(-per_sample.mean(0), kind="stable").tolist()
        assert want[0] == 2 and want != [0, 1, 2]
        assert channel_order(act, by) == want
