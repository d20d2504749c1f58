"""Only the model's thread keeps an OpenMP team: request threads draw with numpy.

torch gives each thread that runs a large op its own OpenMP team for the thread's life;
with more team threads than cores libgomp stops spinning between parallel regions and the
model's forward passes get ~1.7x slower (see convscope/server/state.py). These tests count
the process's native threads (OpenMP workers are threads Python does not know about).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from convscope.server.state import TORCH_GRAIN, run_apart, run_small

LINUX = Path("/proc/self/task").is_dir()

SCRIPT = r"""
import json, os, threading, time, warnings
warnings.simplefilter("ignore")
from fastapi.testclient import TestClient
from convscope.server import Settings, create_app

def native():
    return len(os.listdir("/proc/self/task")) - threading.active_count()

def settle():  # a finished short-lived thread's team exits asynchronously
    last, stable = native(), 0
    for _ in range(40):
        time.sleep(0.05)
        now = native()
        stable = stable + 1 if now == last else 0
        last = now
        if stable >= 3:
            break
    return last

def calibrate():  # the same library work once, in a thread that then ends: what torch
    # keeps for the whole process (a helper thread or two) stays, this thread's team goes
    from convscope.models import load_model
    loaded = load_model("efficientnet_lite0", device="cpu")
    loaded.predict(loaded.preprocess(image), k=5)

image = "sample:chelsea"
probe = threading.Thread(target=calibrate)
probe.start()
probe.join()
start = settle()
app = create_app(Settings(models=["efficientnet_lite0"], device="cpu"))
with TestClient(app, base_url="http://localhost") as client:
    def get(path, **params):
        response = client.get(path, params=params)
        assert response.status_code == 200, (path, params, response.text[:200])
    get("/api/predict", image=image, layer="_conv_stem")  # the model's thread and team
    get("/api/grid.png", image=image, layer="_conv_stem")
    before = settle()
    # Large maps (32 x 112 x 112, 96 x 112 x 112): every torch op on them would go parallel.
    for layer in ["_conv_stem", "_blocks.1._expand_conv", "_blocks.2", "_conv_head"]:
        get("/api/grid", image=image, layer=layer, sort="mean", count=64)
        get("/api/grid.png", image=image, layer=layer, normalize="layer", count=64)
        get("/api/channel", image=image, layer=layer, channel=3)
        get("/api/channel.png", image=image, layer=layer, channel=3, size=640)
        get("/api/channel.png", image=image, layer=layer, channel=3, over="true")
    get("/api/filters.png", layer="_conv_head", channel=5)
    get("/api/filters.png", layer="_blocks.15._expand_conv", count=200)
    get("/api/cam.png", image=image, method="gradcam")
    after = settle()
print(json.dumps({"start": start, "before": before, "after": after}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="counts threads in /proc/self/task (Linux)")
def test_views_leave_no_openmp_team_in_request_threads():
    env = dict(os.environ, OMP_NUM_THREADS="2")  # teams exist only with > 1 thread
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    # The model's team, two threads: the model's own thread and one OpenMP worker.
    assert counts["before"] == counts["start"] + 1, counts
    assert counts["after"] == counts["before"], counts


def _native() -> int:
    return len(os.listdir("/proc/self/task")) - threading.active_count()


@pytest.mark.skipif(not LINUX, reason="counts threads in /proc/self/task (Linux)")
def test_run_apart_returns_raises_and_leaves_no_thread():
    before = _native(), threading.active_count()
    x = torch.arange(4 * TORCH_GRAIN, dtype=torch.float32)
    assert run_apart(lambda: float(x.mul(2).sum())) == float(x.sum()) * 2
    with pytest.raises(KeyError, match="nope"):
        run_apart(lambda: {}["nope"])
    names: list[str] = []
    assert run_small(lambda: names.append(threading.current_thread().name) or 1, 10) == 1
    assert run_small(lambda: names.append(threading.current_thread().name) or 2,
                     TORCH_GRAIN) == 2
    assert names == [threading.current_thread().name, "convscope-apart"]
    deadline = time.monotonic() + 2
    while (_native(), threading.active_count()) != before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (_native(), threading.active_count()) == before
