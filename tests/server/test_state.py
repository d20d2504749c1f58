"""The explorer's LRU cache: bounded, computes each key once across threads."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from convscope.server.state import LRUCache


def test_lru_evicts_least_recently_used():
    cache: LRUCache[int] = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert "b" not in cache
    assert cache.get("a") == 1
    assert cache.get("c") == 3


def test_byte_bound_keeps_newest():
    cache: LRUCache[bytes] = LRUCache(10, max_bytes=10, size=len)
    cache.put("a", b"12345678")
    cache.put("b", b"123456")
    assert "a" not in cache
    cache.put("c", b"x" * 50)  # larger than the bound alone: still kept, others dropped
    assert len(cache) == 1
    assert cache.get("c") == b"x" * 50


def test_concurrent_misses_compute_once_and_failures_are_not_cached():
    cache: LRUCache[int] = LRUCache(4)
    calls = []

    def slow() -> int:
        calls.append(1)
        time.sleep(0.05)
        return 42

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_compute("k", slow)))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [42] * 8
    assert len(calls) == 1

    def boom() -> int:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        cache.get_or_compute("bad", boom)
    assert "bad" not in cache
    assert cache.get_or_compute("bad", lambda: 7) == 7


def test_different_keys_compute_in_parallel():
    cache: LRUCache[int] = LRUCache(4)
    barrier = threading.Barrier(2, timeout=5)

    def compute() -> int:
        barrier.wait()  # deadlocks (BrokenBarrierError) if keys were serialised
        return 1

    threads = [threading.Thread(target=cache.get_or_compute, args=(key, compute))
               for key in ("x", "y")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert "x" in cache
    assert "y" in cache


def test_first_pass_runs_on_the_model_thread(tiny_loaded, monkeypatch):
    """A new image's preprocessing, forward pass and displayed input run on the model's
    own thread (one thread's OpenMP pool for the whole first pass), with the same values
    as the library called directly."""
    from convscope.images import load_image
    from convscope.render.convert import to_pil
    from convscope.server import Settings
    from convscope.server.state import ServerState

    seen: list[str] = []
    preprocess = tiny_loaded.preprocess

    def spy(images):
        seen.append(threading.current_thread().name)
        return preprocess(images)

    monkeypatch.setattr(tiny_loaded, "preprocess", spy)
    state = ServerState(Settings(models={"tiny": tiny_loaded}, device="cpu"))
    try:
        result = state.forward("tiny", "sample:chelsea", "features.2")
    finally:
        state.models.close()
    assert seen and all(name.startswith("convscope-tiny") for name in seen)
    assert threading.current_thread().name not in seen
    assert list(result.acts) == ["features.2"] and not result.complete
    x = preprocess(load_image("sample:chelsea"))
    with torch.no_grad():
        expected = tiny_loaded.module.features[:3](x)[0]
        probs = torch.softmax(tiny_loaded.module(x), 1)[0]
    assert torch.allclose(result.acts["features.2"], expected, atol=1e-6)
    assert [p.index for p in result.predictions[:5]] == probs.argsort(descending=True)[:5].tolist()
    assert np.array_equal(np.asarray(result.display),
                          np.asarray(to_pil(tiny_loaded.transform.to_display(x[0]))))


def test_models_load_on_their_own_thread(tiny_loaded, monkeypatch):
    """Loading runs torch ops: it happens on the model's thread, so the calling thread (the
    server's main thread) keeps no OpenMP team of its own."""
    import convscope.models
    from convscope.server.state import ModelEntry

    seen: list[str] = []

    def spy(spec, device="auto"):
        seen.append(threading.current_thread().name)
        return tiny_loaded

    monkeypatch.setattr(convscope.models, "load_model", spy)
    entry = ModelEntry("tiny", "some-spec", "cpu")
    try:
        assert entry.get() is tiny_loaded and entry.get() is tiny_loaded
        assert entry.run(lambda: threading.current_thread().name) == seen[0]
    finally:
        entry.close()
    assert len(seen) == 1 and seen[0].startswith("convscope-tiny")
