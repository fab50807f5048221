"""The engine shell: one job lifecycle for every engine that steps its own model on a worker thread.

The shell owns the waiting queue, the worker thread, admission into the backend, cancellation,
failing every job on close, and surviving a crashed step; a backend supplies only what differs:
whether it has room, admitting a job, running one step of what it holds, dropping a job, and what to
do when idle. (llama.cpp's server keeps its queue and result routing apart from its slot code the same
way.)

Invariants:
1. Only the worker thread calls the backend (admit, step, drop, idle, shutdown); request threads
   only submit jobs and set cancel events.
2. A job cancelled before admission is failed by the shell and never reaches the backend.
3. A job is in exactly one place: the queue, the backend (its `running()`), or done. It leaves the
   backend through its own finish (the backend's step), or through `drop` (cancelled, crashed, shut
   down), and gets exactly one terminal `finish` or `fail`.
4. A step that raises fails the jobs that were running in it, each dropped first; the worker goes on.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator

from ..errors import Cancelled, EngineError, NotReady, PureAPIError
from ..types import Chunk, GenerationRequest
from .jobs import Job, JobQueue

log = logging.getLogger(__name__)


class Backend(ABC):
    """What one engine does differently; called only from the shell's worker thread."""

    idle_seconds: float | None = None  # with nothing running, wake after this long to call idle()

    @abstractmethod
    def has_room(self) -> bool:
        """Whether another job can be admitted now."""

    @abstractmethod
    def admit(self, job: Job) -> None:
        """Take a job in (raise to refuse it: the shell fails it, dropped first)."""

    @abstractmethod
    def running(self) -> list[Job]:
        """The jobs admitted and not yet finished or dropped."""

    @abstractmethod
    def step(self) -> None:
        """Advance every running job by one step (emitting through the jobs; a finished job leaves)."""

    @abstractmethod
    def drop(self, job: Job, failed: bool = False) -> None:
        """Remove a job that will not finish (cancelled, shut down, or `failed`: the step it was in raised,
        so what it built may be broken); its stream is failed by the shell."""

    def idle(self) -> None:
        """Nothing is running or waiting: work ahead (llama.cpp decodes turn openings)."""

    def wants_idle(self) -> bool:
        """Whether idle() has work: the shell then waits only idle_seconds for a job before calling it."""
        return False

    def shutdown(self) -> None:
        """The worker stopped and every job is failed: release what the backend holds."""


def _failure(exc: Exception) -> PureAPIError:
    return exc if isinstance(exc, PureAPIError) else EngineError(f"generation failed: {type(exc).__name__}: {exc}")


class EngineShell:
    """A bounded queue and a worker thread driving one backend (invariants above)."""

    def __init__(self, backend: Backend, max_queue: int = 64, name: str = "engine"):
        self.backend = backend
        self.jobs = JobQueue(max_queue)
        # The worker: the only thread that calls the backend (invariant 1).
        self._thread = threading.Thread(target=self._loop, name=f"{name}-worker", daemon=True)

    def start(self) -> EngineShell:
        """Start the worker (once the backend is ready)."""
        self._thread.start()
        return self

    def ready(self) -> bool:
        """Whether the worker runs and takes jobs."""
        return self._thread.is_alive() and not self.jobs.closed

    def submit(self, request: GenerationRequest) -> Iterator[Chunk]:
        """Queue a request; its stream of chunks (closing it cancels the generation)."""
        if not self.ready():
            raise NotReady("the model is not loaded")
        return self.jobs.submit(request).stream()

    def close(self, timeout: float = 30) -> bool:
        """Refuse new jobs, fail the waiting and running ones, stop the worker and shut the backend down.

        False if the worker did not stop in time (still inside a step): the backend is then left as it is.
        """
        if not self.jobs.close():  # fails what still waits and wakes the worker
            return True
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)
        if self._thread.is_alive():
            return False
        self.jobs.fail_all("server shutting down")
        self._end_all(Cancelled("server shutting down"))
        self.backend.shutdown()
        return True

    def _loop(self) -> None:
        backend = self.backend
        while not self.jobs.closed:
            if not self._admit():
                break
            for job in backend.running():
                if job.request.cancel.is_set():
                    # Its reader may still wait (a shutdown or reset cancelled it): end its stream.
                    self._end(job, Cancelled("generation cancelled"))
            stepped = backend.running()
            if not stepped:
                continue
            try:
                backend.step()
            except Exception as exc:  # the worker must survive a failed step (invariant 4)
                if not isinstance(exc, PureAPIError):
                    log.exception("engine step failed")
                failure = _failure(exc)
                for job in stepped:
                    if job in backend.running():
                        self._end(job, failure, failed=True)
        self._end_all(Cancelled("server shutting down"))

    def _admit(self) -> bool:
        """Move waiting jobs into the backend; block only when nothing runs. False: the queue closed."""
        backend = self.backend
        while backend.has_room():
            if backend.running():
                job = self.jobs.take(timeout=0)
            elif backend.wants_idle():
                job = self.jobs.take(timeout=backend.idle_seconds)
            else:
                job = self.jobs.take()
            if job is None:
                if self.jobs.closed:
                    return False
                if not backend.running() and backend.wants_idle():
                    try:
                        backend.idle()  # idle for a while: nobody waits for this work
                    except Exception:
                        log.exception("engine idle work failed")
                return True
            if job.request.cancel.is_set():
                job.fail(Cancelled("cancelled before it started"))  # invariant 2
                continue
            try:
                backend.admit(job)
            except Exception as exc:  # one bad admission must not stop the worker
                if not isinstance(exc, PureAPIError):
                    log.exception("engine admission failed")
                self._end(job, _failure(exc))
        return True

    def _end(self, job: Job, exc: BaseException, failed: bool = False) -> None:
        if job in self.backend.running():
            self.backend.drop(job, failed)
        job.fail(exc)

    def _end_all(self, exc: BaseException) -> None:
        for job in self.backend.running():
            self._end(job, exc)
