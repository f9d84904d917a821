"""The jobs of `daguerre serve`: one worker thread per loaded model runs them one at a time, in the order they came,
from a bounded queue (`--queue-size`): a job that finds it full is refused (`QueueFull`, a 503 with Retry-After),
so a burst of clients cannot pile up unbounded work or memory. The blocking routes (txt2img, img2img, OpenAI's)
submit a job and wait for it (`Jobs.call`); the asynchronous ones (`/jobs/...`, server/routes.py) submit and
return its id, then read its status, its result, or cancel it. Finished jobs are kept, results included, for
the last `KEEP` of them.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from .limits import QUEUE_SIZE
from .payload import ApiError

KEEP = 32  # finished jobs kept for /jobs/{id}/result ...
KEEP_BYTES = 512 * 1024 * 1024  # ... and the bytes of their images at most (the oldest results go first)
RETRY_AFTER = 5  # seconds a client told "the queue is full" should wait
POLL = 0.05  # seconds between two asks of a waiting client's `cancelled`


class QueueFull(ApiError):
    """The queue holds its `size` jobs already: a 503, with Retry-After `RETRY_AFTER` seconds."""

    def __init__(self, size: int):
        super().__init__(f"the queue is full ({size} jobs waiting, daguerre serve --queue-size); try again later",
                         HTTPStatus.SERVICE_UNAVAILABLE)


@dataclass(eq=False)
class Job:
    """One unit of work: `run(cancelled) -> result`, where `cancelled()` turns true once the job is cancelled."""

    kind: str
    run: Callable[[Callable[[], bool]], Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: str = "queued"  # queued, running, done, failed, cancelled
    listed: bool = True  # kept after it finishes, for /jobs (False: a blocking route's, whose caller waits)
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: Any = None
    error: BaseException | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def describe(self, position: int | None = None) -> dict[str, Any]:
        """The job as /jobs/{id} shows it (no result)."""
        out = {"id": self.id, "kind": self.kind, "status": self.status, "created": self.created,
               "started": self.started, "finished": self.finished}
        if position is not None:
            out["queued_ahead"] = position
        if self.error is not None:
            out["error"] = f"{type(self.error).__name__}: {self.error}"
        return out


class Jobs:
    """The queue and its one worker thread (started at the first job)."""

    def __init__(self, size: int = QUEUE_SIZE):
        if size < 1:
            raise ValueError(f"--queue-size must be at least 1, got {size}")
        self.size = size
        self.pending: deque[Job] = deque()
        self.running: Job | None = None
        self.finished: OrderedDict[str, Job] = OrderedDict()
        self.lock = threading.Condition()
        self.worker: threading.Thread | None = None

    def submit(self, kind: str, run: Callable[[Callable[[], bool]], Any], listed: bool = True) -> Job:
        """Queue a job; `QueueFull` when `size` are waiting already. `listed`: kept for /jobs once finished."""
        job = Job(kind, run, listed=listed)
        with self.lock:
            if len(self.pending) >= self.size:
                raise QueueFull(self.size)
            self.pending.append(job)
            if self.worker is None:
                self.worker = threading.Thread(target=self._work, name="daguerre-worker", daemon=True)
                self.worker.start()
            self.lock.notify_all()
        return job

    def call(self, kind: str, run: Callable[[Callable[[], bool]], Any], cancelled: Callable[[], bool] | None = None):
        """Submit a job and wait for it: its result (None if cancelled before it ran), or its exception raised.
        `cancelled()` (the client has gone) is asked while it waits and runs, and cancels it."""
        if cancelled is not None:  # the running job asks the client too, at its own checks
            inner = run

            def run(cancel: Callable[[], bool]) -> Any:
                return inner(lambda: cancel() or cancelled())

        job = self.submit(kind, run, listed=False)
        while not job.done.wait(POLL):  # a queued job is taken out when its client goes
            if cancelled is not None and cancelled() and not job.cancel.is_set():
                with self.lock:
                    job.cancel.set()
                    if job in self.pending:
                        self.pending.remove(job)
                        job.status, job.finished = "cancelled", time.time()
                        job.done.set()
        if job.error is not None:
            raise job.error
        return job.result

    def get(self, job_id: str) -> tuple[Job, int | None]:
        """The job of `job_id` and how many jobs are ahead of it (None unless queued); a 404 `ApiError` if none."""
        with self.lock:
            for i, job in enumerate(self.pending):
                if job.id == job_id:
                    return job, i
            job = self.running if self.running is not None and self.running.id == job_id else self.finished.get(job_id)
        if job is None:
            raise ApiError(f"no job {job_id!r} (finished jobs are kept for the last {KEEP})", HTTPStatus.NOT_FOUND)
        return job, None

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: a queued one is taken out, a running one stops at its next U-Net block (its result is the
        images so far); a finished one is left as it is."""
        job, _ = self.get(job_id)
        with self.lock:
            job.cancel.set()
            if job in self.pending:
                self.pending.remove(job)
                job.status, job.finished = "cancelled", time.time()
                self._keep(job)
                job.done.set()
        return job

    def counts(self) -> dict[str, int]:
        """What /sdapi/v1/progress adds: jobs running, waiting, and the queue's size."""
        with self.lock:
            return {"running": int(self.running is not None), "queued": len(self.pending), "queue_size": self.size}

    def list(self) -> list[dict[str, Any]]:
        """Every job known, oldest first: the finished ones kept, the running one, the queued ones."""
        with self.lock:
            return ([j.describe() for j in self.finished.values()] + ([self.running.describe()] if self.running
                    else []) + [j.describe(i) for i, j in enumerate(self.pending)])

    def _keep(self, job: Job) -> None:
        """Keep a finished listed job, dropping the oldest past `KEEP` jobs, then the oldest results past
        `KEEP_BYTES` (their status stays; their result reads as an error saying so)."""
        if not job.listed:
            return
        self.finished[job.id] = job
        while len(self.finished) > KEEP:
            self.finished.popitem(last=False)
        total = sum(_size(j.result) for j in self.finished.values())
        for old in self.finished.values():
            if total <= KEEP_BYTES or old is job:
                break
            if old.result is not None:
                total -= _size(old.result)
                old.result, old.error = None, ApiError(f"job {old.id}'s result was dropped to keep the server's "
                                                       f"memory under {KEEP_BYTES >> 20} MB of results; fetch "
                                                       "results sooner", HTTPStatus.GONE)

    def _work(self) -> None:
        while True:
            with self.lock:
                while not self.pending:
                    self.lock.wait()
                job = self.running = self.pending.popleft()
                job.status, job.started = "running", time.time()
            try:
                job.result = job.run(job.cancel.is_set)
                status = "cancelled" if job.cancel.is_set() else "done"
            except BaseException as e:  # noqa: BLE001 (handed to whoever waits for the job)
                job.error, status = e, "failed"
            with self.lock:
                job.status, job.finished = status, time.time()
                self.running = None
                self._keep(job)
            job.done.set()


def _size(result: Any) -> int:
    """The bytes of the images an answer holds (A1111's `images`, OpenAI's `data`), roughly."""
    if not isinstance(result, dict):
        return 0
    images = result.get("images") or [d.get("b64_json") or "" for d in result.get("data") or []]
    return sum(len(i) for i in images if isinstance(i, str))
