"""Expensive work as jobs: a bounded queue, polling, cancel, 429 + Retry-After, and cheap
views that stay answered while a job holds the model."""

from __future__ import annotations

import io
import math
import threading
import time

import numpy as np
import pytest
from PIL import Image

from convscope.server.jobs import JobQueue, QueueFullError, UnknownJobError

#: A Host the explorer answers when bound to loopback (TestClient sends "testserver").
LOCAL = "http://localhost"


def wait_final(queue: JobQueue, job_id: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job, _ = queue.get(job_id)
        if job.final:
            return job
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} did not finish")


def test_queue_bounds_order_cancel_and_errors():
    queue = JobQueue(max_jobs=3, per_client=2, ttl=60)
    gate = threading.Event()
    ran: list[str] = []

    def blocked() -> str:
        gate.wait(10)
        ran.append("first")
        return "ok"

    first = queue.submit("a", "cam", "k1", {}, blocked)
    second = queue.submit("a", "cam", "k2", {}, lambda: ran.append("second"))
    assert queue.submit("a", "cam", "k1", {}, blocked) is first  # same work: same job
    with pytest.raises(QueueFullError) as per_client:
        queue.submit("a", "cam", "k3", {}, lambda: None)
    assert per_client.value.retry_after >= 1
    third = queue.submit("b", "cam", "k3", {}, lambda: ran.append("third"))
    with pytest.raises(QueueFullError, match="server"):
        queue.submit("c", "cam", "k4", {}, lambda: None)
    assert queue.status()["rejected"] == 2
    assert queue.get(second.id)[1] == 1  # second in line
    assert queue.cancel(second.id).status == "cancelled"  # never runs
    gate.set()
    assert wait_final(queue, first.id).status == "done"
    assert wait_final(queue, third.id).status == "done"
    assert ran == ["first", "third"]
    assert queue.get(first.id)[0].result == "ok"

    def boom() -> None:
        raise RuntimeError("bad input")

    failed = wait_final(queue, queue.submit("a", "cam", "k5", {}, boom).id)
    assert failed.status == "failed"
    assert "bad input" in failed.error
    with pytest.raises(UnknownJobError):
        queue.get("nope")
    queue.close()


def test_finished_jobs_expire():
    queue = JobQueue(max_jobs=2, per_client=2, ttl=0.0)
    job = queue.submit("a", "cam", "k", {}, lambda: 1)
    deadline = time.monotonic() + 10
    while not job.final and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.01)
    with pytest.raises(UnknownJobError):
        queue.get(job.id)
    queue.close()


def test_finished_jobs_are_bounded_in_number():
    queue = JobQueue(max_jobs=1, per_client=1, ttl=3600)
    queue.max_kept = 3
    ids = []
    for i in range(6):
        job = queue.submit("a", "cam", i, {}, lambda: None)
        ids.append(wait_final(queue, job.id).id)
    queue.submit("a", "cam", "last", {}, lambda: None)  # expiry runs on submit and get
    assert queue.status()["kept"] <= 4
    with pytest.raises(UnknownJobError):
        queue.get(ids[0])
    assert queue.get(ids[-1])[0].status == "done"
    queue.close()


@pytest.fixture
def jobs_app(tiny_loaded):
    from fastapi.testclient import TestClient

    from convscope.server import Settings, create_app

    app = create_app(Settings(models={"tiny": tiny_loaded}, max_jobs=2, max_jobs_per_client=1))
    with TestClient(app, base_url=LOCAL) as client:
        yield app, client


def png(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def poll(client, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/api/jobs/{job_id}").json()
        if body["status"] in ("done", "failed", "cancelled"):
            return body
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish")


def test_scorecam_runs_as_a_job_and_equals_the_library(jobs_app, tiny_loaded):
    from convscope.methods.cam import cam
    from convscope.render.overlay import overlay

    app, client = jobs_app
    params = {"model": "tiny", "image": "sample:chelsea", "method": "scorecam", "target": 2}
    queued = client.get("/api/cam.png", params=params)
    assert queued.status_code == 202
    job = queued.json()["job"]
    assert queued.headers["location"] == f"/api/jobs/{job['id']}"
    assert poll(client, job["id"])["status"] == "done"
    got = png(client.get("/api/cam.png", params=params))
    x = tiny_loaded.preprocess("sample:chelsea")
    heat = cam(tiny_loaded, x, target=2, method="scorecam")[0]
    display = app.state.convscope.forward("tiny", "sample:chelsea").display
    expected = np.asarray(overlay(display, heat, alpha=0.5, cmap="jet").convert("RGB"))
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    # POST /api/jobs for work already done answers at once.
    assert client.post("/api/jobs", params=params).json()["status"] == "done"
    # A cheap method never queues.
    assert client.post("/api/jobs", params={**params, "method": "gradcam"}).json() == {
        "id": None, "kind": "cam", "status": "done"}


def test_full_queue_429_cancel_and_cheap_views_stay_fast(jobs_app):
    app, client = jobs_app
    state = app.state.convscope
    entry = state.models["tiny"]
    # Warm a view, then hold the model's thread as a long Score-CAM would.
    grid = {"model": "tiny", "image": "sample:coffee", "layer": "features.0"}
    assert client.get("/api/grid.png", params=grid).status_code == 200
    assert client.get("/api/grid.png", params={**grid, "layer": "features.2"}).status_code == 200
    state.forward("tiny", "sample:chelsea")
    gate = threading.Event()
    holder = threading.Thread(target=entry.run, args=(lambda: gate.wait(30),))
    holder.start()
    try:
        params = {"model": "tiny", "image": "sample:chelsea", "method": "ablationcam",
                  "target": 1}
        first = client.post("/api/jobs", params=params)
        assert first.status_code == 202
        job_id = first.json()["id"]
        # This client may have one job: the next is refused with Retry-After.
        refused = client.post("/api/jobs", params={**params, "target": 3})
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert "try again" in refused.json()["detail"]
        # Cheap views of a computed image are answered while the job waits on the model.
        times = []
        for i in range(12):
            start = time.perf_counter()
            response = client.get("/api/grid.png", params={
                **grid, "layer": ["features.0", "features.2"][i % 2], "cmap": ["gray", "magma",
                                                                              "viridis"][i % 3]})
            times.append(time.perf_counter() - start)
            assert response.status_code == 200
        assert max(times) < 2.0, times  # not queued behind the job (that waits 30 s)
        status = client.get("/api/status").json()["jobs"]
        assert status["waiting"] + status["running"] == 1
        cancelled = client.delete(f"/api/jobs/{job_id}").json()
        assert cancelled["cancel_requested"]
    finally:
        gate.set()
        holder.join()
    final = poll(client, job_id)
    assert final["status"] == "cancelled"
    # Cancelled while it waited for the model: the library call never ran.
    assert ("tiny", "sample:chelsea", "ablationcam", None, 1) not in state.cams
    assert final["error"] == "cancelled before it started"
    assert client.get(f"/api/jobs/{'x' * 12}").status_code == 404


def test_sanity_check_job(jobs_app, tiny_loaded):
    from convscope.methods.sanity import sanity_check

    _, client = jobs_app
    submitted = client.post("/api/jobs", params={"model": "tiny", "image": "sample:rocket",
                                                 "kind": "sanity", "method": "gradcam",
                                                 "target": 0, "steps": 2})
    assert submitted.status_code == 202
    body = poll(client, submitted.json()["id"])
    assert body["status"] == "done", body
    expected = sanity_check(tiny_loaded, tiny_loaded.preprocess("sample:rocket"),
                            method="gradcam", target=0, steps=2).as_dict()
    assert body["result"]["passed"] == expected["passed"]
    # NaN (every map constant) travels as JSON null.
    want = [None if math.isnan(s["spearman"]) else s["spearman"] for s in expected["steps"]]
    got = body["result"]["steps"]
    assert [s["spearman"] is None for s in got] == [w is None for w in want]
    assert [s["spearman"] for s in got if s["spearman"] is not None] == pytest.approx(
        [w for w in want if w is not None], abs=1e-6)
    bad = client.post("/api/jobs", params={"model": "tiny", "image": "sample:nope",
                                           "kind": "sanity"})
    assert bad.status_code == 404


def test_running_job_reports_progress_and_stops_when_cancelled(jobs_app, monkeypatch):
    """The library's progress callback reaches the job: the page sees how far a Score-CAM
    is, and a cancel during the run stops it at the next batch (no map is cached)."""
    from convscope.server import jobs

    app, client = jobs_app
    reached, release = threading.Event(), threading.Event()
    original = jobs.Job.report

    def report(self, phase, done, total):
        original(self, phase, done, total)
        if done == 0:  # the phase started: hold the run here
            reached.set()
            release.wait(30)

    monkeypatch.setattr(jobs.Job, "report", report)
    params = {"model": "tiny", "image": "sample:astronaut", "method": "scorecam", "target": 0}
    job_id = client.post("/api/jobs", params=params).json()["id"]
    try:
        assert reached.wait(30)
        running = client.get(f"/api/jobs/{job_id}").json()
        assert running["status"] == "running"
        assert running["progress"]["phase"] == "score-cam: masked passes"
        assert running["progress"]["done"] == 0 and running["progress"]["total"] >= 1
        assert client.delete(f"/api/jobs/{job_id}").json()["cancel_requested"]
    finally:
        release.set()
    final = poll(client, job_id)
    assert final["status"] == "cancelled" and final["error"] == "cancelled while running"
    state = app.state.convscope
    assert state.cams.get(("tiny", "sample:astronaut", "scorecam", None, 0)) is None


def test_channel_visualisation_is_a_job_then_the_library_picture(tiny_loaded):
    """The channel panel's feature visualisation: queued as a job with progress, then the
    cached PNG equals convscope.visualize's image; out-of-range channels are refused."""
    from fastapi.testclient import TestClient

    from convscope import visualize
    from convscope.server import Settings, create_app

    settings = Settings(models={"tiny": tiny_loaded}, vis_steps=6, vis_size=32)
    params = {"model": "tiny", "layer": "features.0", "channel": 1}
    with TestClient(create_app(settings), base_url=LOCAL) as client:
        assert client.get("/api/visualization.png", params={**params, "start": False}
                          ).status_code == 204
        queued = client.get("/api/visualization.png", params=params)
        assert queued.status_code == 202
        job = poll(client, queued.json()["job"]["id"])
        assert job["status"] == "done" and job["kind"] == "visualize"
        assert job["progress"] == {"phase": "visualize: steps", "done": 6, "total": 6}
        got = png(client.get("/api/visualization.png", params={**params, "start": False}))
        status = client.get("/api/status").json()["caches"]["visualizations"]
        assert status["entries"] == 1
        bad = client.get("/api/visualization.png", params={**params, "channel": 999})
        assert bad.status_code in (400, 404, 422) and "out of range" in bad.text
    expected = visualize(tiny_loaded, "features.0:1", steps=6, size=32, progress=False)
    image = (expected.images[0].permute(1, 2, 0).numpy() * 255 + 0.5).clip(0, 255)
    assert np.abs(got.astype(int) - image.astype(np.uint8).astype(int)).max() <= 1
