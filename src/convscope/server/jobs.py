"""Expensive work (Score-CAM, Ablation-CAM, sanity checks) as jobs with a bounded queue.

A request for such work returns a job id at once; the page polls ``GET /api/jobs/{id}``
for the state and can cancel it. At most ``max_jobs`` jobs wait or run at once, and each
client at most ``per_client`` of them: more are refused with :class:`QueueFullError`
(HTTP 429 with ``Retry-After``), so a burst of slow requests cannot pile up threads or
memory. Jobs run one at a time on their own thread (the model itself runs one pass at a
time anyway), so the request threads stay free for cheap views.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConvscopeError, UnknownNameError

log = logging.getLogger(__name__)

#: States a job goes through; the last three are final.
STATES = ("queued", "running", "done", "failed", "cancelled")


class QueueFullError(ConvscopeError):
    """Too many jobs are waiting or running; try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class JobCancelledError(ConvscopeError):
    """Raised inside a job's work when it notices it was cancelled."""


class UnknownJobError(UnknownNameError):
    """A job id the server does not know (never made, or finished long ago)."""

    kind = "job"
    hint = "jobs are kept for a while after they finish; submit it again"


@dataclass
class Job:
    """One unit of expensive work and what the page shows of it."""

    id: str
    kind: str
    owner: str
    key: Hashable
    params: dict[str, Any]
    work: Callable[[], Any] = field(repr=False)
    status: str = "queued"
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    result: Any = None
    cancel_requested: bool = False
    #: The library's last progress report: phase, units done, total (None: unknown).
    phase: str | None = None
    done: int = 0
    total: int | None = None

    def report(self, phase: str, done: int, total: int | None) -> None:
        """The ``progress`` callback the job's library call gets: records how far it is,
        and stops the computation (by raising) once a cancel was asked for."""
        if self.cancel_requested:
            raise JobCancelledError("cancelled while running")
        self.phase, self.done, self.total = phase, done, total

    @property
    def final(self) -> bool:
        """Whether the job is done, failed or cancelled."""
        return self.status in ("done", "failed", "cancelled")

    def as_dict(self, position: int | None = None) -> dict[str, Any]:
        """The job as JSON: state, timing, queue position, error and result."""
        now = time.monotonic()
        out: dict[str, Any] = {
            "id": self.id, "kind": self.kind, "status": self.status, "params": self.params,
            "waited_s": round((self.started or now) - self.created, 3),
            "running_s": (round((self.finished or now) - self.started, 3)
                          if self.started is not None else None),
            "cancel_requested": self.cancel_requested,
        }
        if position is not None:
            out["position"] = position
        if self.phase is not None:
            out["progress"] = {"phase": self.phase, "done": self.done, "total": self.total}
        if self.error is not None:
            out["error"] = self.error
        if self.status == "done" and isinstance(self.result, dict):
            out["result"] = self.result
        return out


class JobQueue:
    """A bounded queue of jobs run one at a time on a private thread."""

    #: Finished jobs kept at most (oldest dropped first), whatever their age.
    max_kept = 256

    def __init__(self, max_jobs: int, per_client: int, ttl: float):
        if max_jobs < 1 or per_client < 1:
            raise ValueError("max_jobs and max_jobs_per_client must be >= 1")
        self.max_jobs = max_jobs
        self.per_client = per_client
        self.ttl = ttl
        self._jobs: dict[str, Job] = {}
        self._order: list[str] = []  # waiting and running jobs, oldest first
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self.completed = 0
        self.rejected = 0
        #: Seconds of the last finished jobs, for Retry-After.
        self._durations: list[float] = []

    def submit(self, owner: str, kind: str, key: Hashable, params: dict[str, Any],
               work: Callable[[], Any]) -> Job:
        """Queue ``work`` (or return the live job with the same ``key``)."""
        with self._lock:
            self._expire()
            for job_id in self._order:
                job = self._jobs[job_id]
                if job.key == key and not job.cancel_requested:
                    return job
            active = [self._jobs[i] for i in self._order]
            mine = sum(1 for job in active if job.owner == owner)
            if len(active) >= self.max_jobs or mine >= self.per_client:
                self.rejected += 1
                who = "this client has" if mine >= self.per_client else "the server has"
                raise QueueFullError(
                    f"{who} {mine if mine >= self.per_client else len(active)} jobs waiting "
                    "or running; try again shortly", self._retry_after(len(active)))
            job = Job(secrets.token_urlsafe(12), kind, owner, key, params, work)
            self._jobs[job.id] = job
            self._order.append(job.id)
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="convscope-jobs")
            self._executor.submit(self._run, job)
            return job

    def _retry_after(self, waiting: int) -> int:
        typical = (sum(self._durations) / len(self._durations)) if self._durations else 5.0
        return max(1, min(120, round(typical * max(1, waiting) / 2)))

    def _run(self, job: Job) -> None:
        with self._lock:
            if job.final:  # cancelled while waiting
                return
            job.status, job.started = "running", time.monotonic()
        try:
            result = job.work()
        except ConvscopeError as error:
            with self._lock:
                job.error = str(error)
                self._finish(job, "cancelled" if job.cancel_requested else "failed")
            return
        except Exception as error:  # reported on the job, never lost in a thread
            log.exception("job %s (%s) failed", job.id, job.kind)
            with self._lock:
                job.error = f"{type(error).__name__}: {error}"
                self._finish(job, "cancelled" if job.cancel_requested else "failed")
            return
        with self._lock:
            job.result = result
            self._finish(job, "cancelled" if job.cancel_requested else "done")

    def _finish(self, job: Job, status: str) -> None:
        job.status, job.finished = status, time.monotonic()
        job.work = _done  # drop references to the request's tensors
        if job.id in self._order:
            self._order.remove(job.id)
        if job.started is not None:
            self._durations = [*self._durations, job.finished - job.started][-10:]
        self.completed += 1

    def get(self, job_id: str) -> tuple[Job, int | None]:
        """The job and its place in the queue (0: running or next)."""
        with self._lock:
            self._expire()
            job = self._jobs.get(job_id)
            if job is None:
                raise UnknownJobError(job_id[:40], [])
            position = self._order.index(job_id) if job_id in self._order else None
            return job, position

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: a waiting one never runs; a running one is marked and its result
        discarded when the library call returns (it has no point to stop at)."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise UnknownJobError(job_id[:40], [])
            if not job.final:
                job.cancel_requested = True
                if job.status == "queued":
                    self._finish(job, "cancelled")
            return job

    def _expire(self) -> None:
        now = time.monotonic()
        for job_id in [i for i, job in self._jobs.items()
                       if job.final and now - (job.finished or now) > self.ttl]:
            del self._jobs[job_id]
        finished = [i for i, job in self._jobs.items() if job.final]  # oldest first
        for job_id in finished[: max(0, len(finished) - self.max_kept)]:
            del self._jobs[job_id]

    def status(self) -> dict[str, Any]:
        """Counts for ``/api/status``."""
        with self._lock:
            running = sum(1 for i in self._order if self._jobs[i].status == "running")
            return {"waiting": len(self._order) - running, "running": running,
                    "max_jobs": self.max_jobs, "per_client": self.per_client,
                    "completed": self.completed, "rejected": self.rejected,
                    "kept": len(self._jobs)}

    def close(self) -> None:
        """Cancel waiting jobs and stop the thread (waits for a running job)."""
        with self._lock:
            for job_id in list(self._order):
                job = self._jobs[job_id]
                job.cancel_requested = True
                if job.status == "queued":
                    self._finish(job, "cancelled")
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)


def _done() -> None:
    return None
