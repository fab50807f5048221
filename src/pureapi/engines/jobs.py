"""The one job lifecycle every engine uses: a bounded waiting queue, and a job's stream of chunks.

Invariants:
1. A job is numbered and queued under the queue's lock, which `close` also takes: a job is either
   refused at once (`NotReady`, `Overloaded`) or queued before the close, and then it is failed by
   the close or taken by a worker. No job waits on a closed queue.
2. Jobs leave the queue tenant by tenant: the oldest job of the tenant taken from least recently, so
   one tenant's backlog never holds another tenant's request behind it; with one tenant, oldest first.
3. A job gets exactly one terminal `finish` or `fail`; its reader's `stream()` ends there.
4. Closing a stream early (client gone, stop string hit) sets the request's `cancel`, which the
   worker sees at its next token.
5. Tenants share the slots fairly: each tenant with work (running or waiting) is owed
   `slots // tenants` of them. When none is free, a waiting job of a tenant running fewer than its
   share may claim the newest generation of the tenant running the most, if that is more than its
   share (`claim`); the preempted job goes back to the queue (`requeue`) as its tenant's oldest, and
   comes back when that tenant's turn does. A claim never takes a tenant below its share, so two
   tenants never take a slot back and forth.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Iterator, Sequence

from ..errors import Cancelled, NotReady, Overloaded
from ..types import Chunk, GenerationRequest, TokenLogprob

SHUTTING_DOWN = "server shutting down"  # what every job still waiting or running reads at close


class Job:
    """One generation handed to a worker; the worker calls emit/finish/fail, the request thread reads stream()."""

    def __init__(self, request: GenerationRequest, number: int):
        self.request = request
        self.number = number  # submission order
        # The session whose KV the job may keep: None once that session was reset before the job started.
        self.session = request.session_id
        # False once that session was reset before the job started: its KV must then outlive it nowhere.
        self.savable = True
        self.cached_tokens = 0  # set by an engine that reuses KV, when the job starts
        self.ended = False  # True once `finish` or `fail` was called (set by whoever ends it)
        self._out: queue.SimpleQueue[Chunk | BaseException] = queue.SimpleQueue()

    def emit(self, text: str, completion_tokens: int, logprobs: list[TokenLogprob] | None = None) -> None:
        """Send generated text and its tokens' logprobs (nothing when both are empty)."""
        if text or logprobs:
            n = len(self.request.prompt_ids)
            self._out.put(Chunk(text, None, n, completion_tokens, self.cached_tokens, logprobs=logprobs or None))

    def finish(self, reason: str, completion_tokens: int) -> None:
        """End the stream with a finish reason."""
        self.ended = True
        self._out.put(Chunk("", reason, len(self.request.prompt_ids), completion_tokens, self.cached_tokens))

    def fail(self, exc: BaseException) -> None:
        """End the stream with an error, raised to its reader."""
        self.ended = True
        self._out.put(exc)

    def stream(self) -> Iterator[Chunk]:
        """The job's chunks up to the last; closing it early cancels the generation."""
        try:
            while True:
                item = self._out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self.request.cancel.set()


class JobQueue:
    """The bounded queue of jobs waiting for an engine's worker."""

    def __init__(self, max_queue: int):
        # Bounded so that overload is answered with 503 at once instead of an ever-growing wait.
        self._max = max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._submitted = 0
        self._taken = 0
        self._last_taken: dict[str, int] = {}  # per tenant, the number of the take that last served it
        self._closed = False
        # Guards the waiting jobs, the numbering and `closed` (invariant 1); wakes a waiting `take`.
        self._cond = threading.Condition()

    def __len__(self) -> int:
        """How many jobs wait to be taken."""
        return len(self._waiting)

    @property
    def closed(self) -> bool:
        """True once `close` was called: every later `submit` is refused."""
        return self._closed

    def submit(self, request: GenerationRequest) -> Job:
        """Queue a request; raises NotReady once closed and Overloaded when the queue is full."""
        with self._cond:
            if self._closed:
                raise NotReady("the model is not loaded")
            if len(self._waiting) >= self._max:
                raise Overloaded("server busy: the generation queue is full, retry later")
            self._submitted += 1
            job = Job(request, self._submitted)
            self._waiting.append(job)
            self._cond.notify()
        return job

    def take(self, timeout: float | None = None) -> Job | None:
        """The next waiting job (invariant 2); None once closed, or after `timeout` seconds with none (0: no wait)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._waiting or self._closed, timeout) or self._closed:
                return None
            # min keeps the first of equals: the oldest job of the tenant served longest ago (or never).
            job = min(self._waiting, key=lambda j: self._last_taken.get(j.request.tenant, 0))
            self._served(job)
            return job

    def _served(self, job: Job) -> None:
        """Take a waiting job off the queue and count the turn for its tenant (under the lock)."""
        self._waiting.remove(job)
        self._taken += 1
        self._last_taken[job.request.tenant] = self._taken

    def claim(self, running: Sequence[Job], slots: int) -> tuple[Job, Job] | None:
        """A waiting job owed a slot that `running` holds, and the running job to preempt for it (invariant 5).

        The claimant is a job of the tenant furthest below its share (served least recently among
        equals, its oldest job); the victim the newest job of the tenant running the most. None when
        every tenant with waiting work runs its share, or nobody runs more than theirs.
        """
        with self._cond:
            waiting = [j for j in self._waiting if not j.request.cancel.is_set()]
            if self._closed or not waiting:
                return None
            live = [j for j in running if not j.request.cancel.is_set()]
            counts = collections.Counter(j.request.tenant for j in live)
            share = slots // len(set(counts) | {j.request.tenant for j in waiting})
            owed = [j for j in waiting if counts[j.request.tenant] < share]
            if not owed or not counts:
                return None
            heavy, most = counts.most_common(1)[0]
            if most <= share:
                return None
            # min keeps the first of equals: the oldest job of that tenant.
            job = min(owed, key=lambda j: (counts[j.request.tenant], self._last_taken.get(j.request.tenant, 0)))
            victim = max((j for j in live if j.request.tenant == heavy), key=lambda j: j.number)
            return job, victim

    def take_claimed(self, job: Job) -> bool:
        """Take a job `claim` chose (a preemption made room for it); False if it no longer waits (closed)."""
        with self._cond:
            if self._closed or job not in self._waiting:
                return False
            self._served(job)
            return True

    def requeue(self, job: Job) -> bool:
        """Put a preempted job back, as its tenant's oldest waiting job (beyond the bound: it was admitted
        once); False once closed, when the caller must end it."""
        with self._cond:
            if self._closed:
                return False
            at = next((i for i, j in enumerate(self._waiting) if j.number > job.number), len(self._waiting))
            self._waiting.insert(at, job)
            self._cond.notify()
            return True

    def unclaim(self, session_id: str) -> int:
        """Waiting jobs of the session stop being its, and their KV is kept nowhere (a reset).

        Returns the last job number submitted, for a job already taken off the queue.
        """
        with self._cond:
            for job in self._waiting:
                if job.session == session_id:
                    job.session, job.savable = None, False
            return self._submitted

    def fail_all(self, reason: str) -> None:
        """Cancel and fail every waiting job."""
        with self._cond:
            jobs = list(self._waiting)
            self._waiting.clear()
        for job in jobs:
            job.request.cancel.set()
            job.fail(Cancelled(reason))

    def close(self, reason: str = SHUTTING_DOWN) -> bool:
        """Refuse new jobs, fail the waiting ones and wake the worker; False if it was already closed."""
        with self._cond:
            if self._closed:
                return False
            self._closed = True
            self._cond.notify_all()
        self.fail_all(reason)
        return True
