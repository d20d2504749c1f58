"""The C kernel's top-k insertion against the torch merge it replaces (``_pick_top`` and
``_apply_top``): the same lists, bit for bit, on adversarial scores (ties within and
across batches, NaN, +-inf, -0.0/+0.0, k above the images seen so far, both rankings, many
batches), and a check that these cases do tell a broken tie order apart."""

from __future__ import annotations

import pytest
import torch

from convscope.atlas import _native
from convscope.atlas.stats import PAD_INDEX, ChannelStats, _apply_top, _empty_top, _pick_top

SPECIAL = [0.0, -0.0, 1.0, -1.0, 2.5, float("inf"), -float("inf"), float("nan"), 3e38,
           -3e38, 1e-45]


def _kernel() -> _native.Kernel:
    kernel = _native.kernel()
    assert kernel is not None, "the C kernel must build here (cc is part of the test setup)"
    return kernel


def _torch_insert(top: dict[str, torch.Tensor], maxv: torch.Tensor, total: torch.Tensor,
                  where: torch.Tensor, index: torch.Tensor, w: int, positions: int,
                  mean: bool) -> None:
    """The merge of before, as ChannelStats.update made it from the kernel's rows (N, C):
    scores (the max, or float32 total / positions), the max's (row, col), two stable
    argsorts."""
    n, c = maxv.shape
    score = total.float() / float(positions) if mean else maxv
    idx = index.view(n, 1).expand(n, c)
    location = torch.stack([where // w, where % w], -1).to(torch.int32)
    pick = _pick_top(top, score.T, idx.T)
    _apply_top(top, score.T, idx.T, location.transpose(0, 1), pick)


def _c_insert(top: dict[str, torch.Tensor], maxv: torch.Tensor, total: torch.Tensor,
              where: torch.Tensor, index: torch.Tensor, w: int, positions: int,
              mean: bool) -> None:
    n, c = maxv.shape
    k = top["value"].shape[1]
    _kernel().top_insert(maxv.data_ptr(), total.data_ptr(), where.data_ptr(),
                         index.data_ptr(), n, c, w, positions, mean, k,
                         top["value"].data_ptr(), top["index"].data_ptr(),
                         top["location"].data_ptr())


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Equal lists down to the bits of every value (-0.0 is not +0.0 here)."""
    return (torch.equal(a["value"].view(torch.int32), b["value"].view(torch.int32))
            and torch.equal(a["index"], b["index"])
            and torch.equal(a["location"], b["location"]))


def _batches(seed: int, count: int, n: int, c: int, positions: int, *, reuse: bool):
    """Adversarial batches: scores from a few special values (many ties, NaN, +-inf, both
    zeros), float64 totals that round to the same float32 mean, image indices in shuffled
    order, with repeats across batches (``reuse``) and within one."""
    g = torch.Generator().manual_seed(seed)
    special = torch.tensor(SPECIAL)
    order = torch.randperm(count * n, generator=g)
    for b in range(count):
        maxv = special[torch.randint(len(SPECIAL), (n, c), generator=g)]
        base = special[torch.randint(len(SPECIAL), (n, c), generator=g)].double()
        # totals one float64 ulp apart: equal float32 means, or not, after the division
        total = base * positions + torch.randint(-2, 3, (n, c), generator=g).double() * 1e-12
        where = torch.randint(positions, (n, c), generator=g)
        if reuse:
            index = torch.randint(5, (n,), generator=g)
        else:
            index = order[b * n:(b + 1) * n].clone()
            index[-1] = index[0]  # one image twice in a batch
        yield maxv, total, where, index


@pytest.mark.parametrize("mean", [False, True], ids=["max", "mean"])
@pytest.mark.parametrize(("k", "n", "reuse"), [(7, 2, False), (3, 5, True), (1, 4, False),
                                               (16, 16, True)])
def test_c_insertion_equals_the_torch_merge_bit_for_bit(mean, k, n, reuse):
    c, w, positions = 5, 3, 12
    ours, theirs = _empty_top(c, k, torch.device("cpu")), _empty_top(c, k, torch.device("cpu"))
    for batch in _batches(k * 100 + n, 40, n, c, positions, reuse=reuse):
        _c_insert(ours, *batch, w, positions, mean)
        _torch_insert(theirs, *batch, w, positions, mean)
        assert _same(ours, theirs)
    assert (ours["index"] != PAD_INDEX).any()


def test_k_above_the_images_so_far_keeps_pads_last():
    c, k = 3, 6
    ours, theirs = _empty_top(c, k, torch.device("cpu")), _empty_top(c, k, torch.device("cpu"))
    maxv = torch.tensor([[float("nan"), -float("inf"), -0.0], [-float("inf"), 0.0, 0.0]])
    batch = (maxv, torch.zeros(2, c, dtype=torch.float64), torch.tensor([[0, 1, 2], [3, 4, 5]]),
             torch.tensor([9, 2]))
    _c_insert(ours, *batch, 4, 8, False)
    _torch_insert(theirs, *batch, 4, 8, False)
    assert _same(ours, theirs)
    # NaN ranks as -inf (image 9 after image 2 at -inf), pads after every image; the zero
    # that came first (its image index: 2 < 9) keeps its sign.
    assert ours["index"][0].tolist() == [2, 9] + [PAD_INDEX] * 4
    assert ours["value"][0, :2].tolist() == [-float("inf")] * 2
    assert ours["index"][2].tolist()[:2] == [2, 9]
    assert ours["value"][2, 0].item() == 0.0 and not ours["value"][2, 0].signbit()
    assert ours["value"][2, 1].signbit()
    assert ours["location"][2, :2].tolist() == [[1, 1], [0, 2]]


def test_a_broken_tie_order_is_caught():
    """The cases above tell the true order from a mutated one: ties broken by the higher
    image index, or -0.0 ranked below +0.0, give other lists."""
    c, k, n, w, positions = 5, 7, 2, 3, 12
    ours = _empty_top(c, k, torch.device("cpu"))
    flipped = _empty_top(c, k, torch.device("cpu"))
    for maxv, total, where, index in _batches(700 + n, 40, n, c, positions, reuse=False):
        _c_insert(ours, maxv, total, where, index, w, positions, False)
        # higher index first on ties: the same merge on negated indices
        _torch_insert(flipped, maxv, total, where, -index, w, positions, False)
    flipped["index"] = torch.where(flipped["index"] == PAD_INDEX, PAD_INDEX,
                                   -flipped["index"])
    assert not torch.equal(ours["index"], flipped["index"])

    signed = _empty_top(3, k, torch.device("cpu"))
    zeros = torch.tensor([[0.0, -0.0, -0.0], [-0.0, 0.0, 0.0]])
    batch = (zeros, torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.int64),
             torch.tensor([5, 1]))
    _c_insert(signed, *batch, w, positions, False)
    # -0.0 == +0.0: image 1 first on every channel, whatever the zero's sign
    assert signed["index"][:, 0].tolist() == [1, 1, 1]
    assert [bool(v) for v in signed["value"][:, 0].signbit()] == [True, False, False]


def _reference_native_top(self, native, values, where, total, indices, w):
    """ChannelStats._native_top as the torch merge of before (the test's reference)."""
    n = values.shape[0]
    for name in self.rankings:
        _torch_insert(self.top[name], values, total, where, indices.view(n), w,
                      self.positions, name == "mean")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_update_lists_equal_the_torch_merge_over_many_batches(monkeypatch, compiled):
    g = torch.Generator().manual_seed(3)
    batches = []
    for b in range(12):
        x = torch.randint(-2, 3, (3, 4, 5, 6), generator=g).float()  # ties everywhere
        x[0, 1, 2, 3] = float("nan") if b % 3 == 0 else x[0, 1, 2, 3]
        x[1, 2] = -float("inf") if b % 4 == 1 else x[1, 2]
        x[2, 3] = -0.0 if b % 2 else 0.0
        batches.append((x, torch.randperm(1000, generator=g)[:3]))

    def run() -> ChannelStats:
        stats = ChannelStats(4, 5, rankings=("max", "mean"))
        for x, index in batches:
            stats.update(x, index, compiled=compiled)
        return stats

    ours = run()
    monkeypatch.setattr(ChannelStats, "_native_top", _reference_native_top)
    theirs = run()
    for name in ("max", "mean"):
        assert _same(ours.top[name], theirs.top[name]), name
    for key in ("sum", "sumsq", "max", "hist", "nan"):
        a, b = getattr(ours, key), getattr(theirs, key)
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), key  # NaN: same bits


def test_state_is_a_snapshot_and_a_loaded_state_resumes_exactly():
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(4, 3, 4, 4, generator=g) for _ in range(4)]
    whole = ChannelStats(3, 4, rankings=("max", "mean"))
    half = ChannelStats(3, 4, rankings=("max", "mean"))
    for i, x in enumerate(xs):
        whole.update(x, torch.arange(4 * i, 4 * i + 4))
        if i < 2:
            half.update(x, torch.arange(4 * i, 4 * i + 4))
    state = half.state_dict()
    before = {key: value.clone() for key, value in state["top"]["max"].items()}
    for top in state["top"].values():  # a loaded state need not be contiguous
        top["location"] = top["location"].transpose(0, 1).contiguous().transpose(0, 1)
    state["hist"] = state["hist"].t().contiguous().t()
    resumed = ChannelStats.from_state_dict(state)
    for i, x in enumerate(xs[2:], 2):
        half.update(x, torch.arange(4 * i, 4 * i + 4))
        resumed.update(x, torch.arange(4 * i, 4 * i + 4))
    assert _same(state["top"]["max"], before)  # not changed by the later updates
    for name in ("max", "mean"):
        assert _same(half.top[name], whole.top[name])
        assert _same(resumed.top[name], whole.top[name])
    for key in ("sum", "sumsq", "max", "hist", "nan"):
        assert torch.equal(getattr(resumed, key), getattr(whole, key)), key
