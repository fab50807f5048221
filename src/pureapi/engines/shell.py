"""The engine shell: one job lifecycle for every engine that drives its own model from a worker thread.

The shell owns the waiting queue, the worker thread, admission into the backend, cancellation,
failing every job on close, and surviving a crashed step; a backend supplies only what differs:
whether it has room, admitting a job, running one step of what it holds, dropping a job, and what to
do when idle. (llama.cpp's server keeps its queue and result routing apart from its slot code the same
way.) The backends: llama.cpp's slots (one decode a step), transformers' continuous batching
(`hf_batching.Batcher`: a step routes the batch's outputs), and `OneAtATime`, whose step runs one
whole generation (the transformers engine unbatched, the scripted fake engine).

Invariants:
1. Only the worker thread calls the backend (admit, step, drop, idle, shutdown); request threads
   only submit jobs and set cancel events (`close` sets those of the admitted jobs, so a step that
   runs a whole generation returns at its next token).
2. A job cancelled before admission is failed by the shell and never reaches the backend.
3. A job is in exactly one place: the queue, the backend (its `running()`), or done (a preempted job
   is back in the queue, invariant 5). It leaves the
   backend through its own end in the backend's step (`finish`, or `fail` for a failure of that job
   alone), or through `drop` (cancelled, crashed, shut down), and gets exactly one terminal `finish`
   or `fail`.
4. A step that raises fails the jobs that were running in it, each dropped first; the worker goes on.
5. With every slot busy, a waiting job of a tenant below its fair share of the slots may take one
   (jobs invariant 5) from a backend that can preempt: the backend sets the newest job of the tenant
   running the most aside (`preempt`, keeping its KV and progress), the shell puts that job back in
   the queue, and a later `admit` of it goes on where it stopped. A preempted job that never comes
   back (cancelled, shut down) is `discard`ed.
"""

from __future__ import annotations

import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

from ..errors import Cancelled, EngineError, NotReady, PureAPIError
from ..types import Chunk, GenerationRequest
from .jobs import SHUTTING_DOWN, Job, JobQueue

log = logging.getLogger(__name__)

T = TypeVar("T", covariant=True)


class _Outputs(Protocol[T]):
    """A thread-safe queue a backend's model thread fills (queue.Queue or queue.SimpleQueue)."""

    def get(self, block: bool = True, timeout: float | None = None) -> T: ...

    def get_nowait(self) -> T: ...


def arrived(outputs: _Outputs[T], timeout: float) -> Iterator[T]:
    """What a model thread has put in `outputs` by now, waiting up to `timeout` for the first item: a step
    of a backend whose model runs on a thread of its own (transformers' batch manager, vLLM's event loop)
    routes these to their jobs, and a step that saw nothing returns to let the shell admit and cancel."""
    try:
        item = outputs.get(timeout=timeout)
    except queue.Empty:
        return
    while True:
        yield item
        try:
            item = outputs.get_nowait()
        except queue.Empty:
            return


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

    def can_preempt(self) -> bool:
        """Whether `preempt` may be called now (invariant 5); backends that cannot set a job aside say no."""
        return False

    def preempt(self, job: Job) -> bool:
        """Set a running job aside to free its slot, keeping what it built so that a later `admit` of the
        same job goes on where it stopped; False (nothing changed) when it cannot."""
        return False

    def discard(self, job: Job) -> None:
        """A job that may have been preempted will not be admitted again: release what `preempt` kept."""


def failure(exc: Exception) -> PureAPIError:
    """The error a job's reader gets for an exception raised while it ran (ours pass through)."""
    return exc if isinstance(exc, PureAPIError) else EngineError(f"generation failed: {type(exc).__name__}: {exc}")


def run_whole(job: Job, run: Callable[[Job], None]) -> bool:
    """Run one generation start to end on the worker (`run` emits and finishes it). True once the job
    ended (finished, or failed: its failure is its own); False when a cancel stopped it first, which
    leaves it to the shell to end as cancelled."""
    try:
        run(job)
    except Exception as exc:  # the worker must survive any one bad generation
        if not isinstance(exc, PureAPIError):
            log.exception("generation failed")
        job.fail(failure(exc))
        return True
    if job.ended:
        return True
    if job.request.cancel.is_set():
        return False
    job.fail(EngineError("generation failed: it stopped without finishing"))
    return True


class OneAtATime(Backend):
    """A backend whose step runs one whole generation: engines whose model generates a request from start
    to end in one call (transformers' `generate`, the scripted fake engine). One at a time because on one
    device a second concurrent generation only splits the same compute, and the model objects are not
    safe to share between threads."""

    def __init__(self, run: Callable[[Job], None]):
        self._run = run  # emits through the job and finishes it; returns early once its cancel is set
        self._job: Job | None = None

    def has_room(self) -> bool:
        return self._job is None

    def admit(self, job: Job) -> None:
        self._job = job

    def running(self) -> list[Job]:
        return [] if self._job is None else [self._job]

    def step(self) -> None:
        if self._job is not None and run_whole(self._job, self._run):
            self._job = None

    def drop(self, job: Job, failed: bool = False) -> None:
        self._job = None


class EngineShell:
    """A bounded queue and a worker thread driving one backend (invariants above)."""

    def __init__(self, backend: Backend, max_queue: int = 64, name: str = "engine", slots: int = 1):
        self.backend = backend
        self.slots = slots  # what the tenants share fairly (invariant 5)
        # max_queue jobs may wait beyond the `slots` the backend runs: when a whole batch of generations
        # ends at once and their clients ask again, those requests are bound for the freed slots, and
        # must not be refused in the moment before the worker moves them in (the server's admission
        # cap, max_queue + slots in flight, is the limit clients meet).
        self.jobs = JobQueue(max_queue + slots)
        # The jobs admitted and not yet ended, for `close` to cancel from its own thread (invariant 1).
        self._held: set[Job] = set()
        self._held_lock = threading.Lock()  # guards _held: the worker adds and prunes, close reads
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
        with self._held_lock:
            for job in self._held:  # a step running a whole generation returns at its next token
                job.request.cancel.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)
        if self._thread.is_alive():
            return False
        self.jobs.fail_all(SHUTTING_DOWN)
        self._end_all(Cancelled(SHUTTING_DOWN))
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
                    self._end(job, Cancelled(SHUTTING_DOWN if self.jobs.closed else "generation cancelled"))
            stepped = backend.running()
            if not stepped:
                continue
            try:
                backend.step()
            except Exception as exc:  # the worker must survive a failed step (invariant 4)
                if not isinstance(exc, PureAPIError):
                    log.exception("engine step failed")
                error = failure(exc)
                for job in stepped:
                    if job in backend.running():
                        self._end(job, error, failed=True)
            with self._held_lock:
                self._held.difference_update([job for job in stepped if job.ended])
        self._end_all(Cancelled(SHUTTING_DOWN))

    def _admit(self) -> bool:
        """Move waiting jobs into the backend; block only when nothing runs. False: the queue closed."""
        backend = self.backend
        while True:
            if not backend.has_room():
                job = self._claim()
                if job is None:
                    return True
            elif backend.running():
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
                self._forget(job)
                job.fail(Cancelled("cancelled before it started"))  # invariant 2
                continue
            with self._held_lock:
                self._held.add(job)
                if self.jobs.closed:  # taken as close began: close may have cancelled the others already
                    job.request.cancel.set()
            try:
                backend.admit(job)
            except Exception as exc:  # one bad admission must not stop the worker
                if not isinstance(exc, PureAPIError):
                    log.exception("engine admission failed")
                self._end(job, failure(exc))
        return True

    def _claim(self) -> Job | None:
        """Every slot is busy: preempt for a waiting job of a tenant below its fair share (invariant 5);
        the job to admit in the freed slot, or None."""
        backend = self.backend
        if self.slots < 2 or not backend.can_preempt():
            return None
        claim = self.jobs.claim(backend.running(), self.slots)
        if claim is None:
            return None
        job, victim = claim
        try:
            if not backend.preempt(victim):
                return None
        except Exception as exc:  # a failed preemption leaves the victim to end as a failed step's job
            log.exception("engine preemption failed")
            self._end(victim, failure(exc), failed=True)
            self.backend.discard(victim)
            return None
        if not self.jobs.requeue(victim):  # closed meanwhile: it ends with the others
            self._forget(victim)
            victim.fail(Cancelled(SHUTTING_DOWN))
        return job if self.jobs.take_claimed(job) else None

    def _forget(self, job: Job) -> None:
        """A job out of the backend that will not come back: release what a preemption kept of it."""
        self.backend.discard(job)
        with self._held_lock:
            self._held.discard(job)

    def _end(self, job: Job, exc: BaseException, failed: bool = False) -> None:
        if job in self.backend.running():
            self.backend.drop(job, failed)
        with self._held_lock:
            self._held.discard(job)
        job.fail(exc)

    def _end_all(self, exc: BaseException) -> None:
        for job in self.backend.running():
            self._end(job, exc)
