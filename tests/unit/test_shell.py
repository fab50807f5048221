"""The engine shell against scripted backends, without weights: the one job lifecycle every engine gets
(a stepping backend like llama.cpp's, and `OneAtATime` over a scripted whole-job run)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from pureapi.engines.jobs import Job
from pureapi.engines.shell import Backend, EngineShell, OneAtATime
from pureapi.errors import Cancelled, EngineError, NotReady, Overloaded
from pureapi.types import Chunk, GenerationRequest, SamplingParams


class Scripted(Backend):
    """A backend with `room` places that emits one token a step per job, and fails where told."""

    def __init__(self, room: int = 2, step_delay: float = 0.0):
        self.room = room
        self.step_delay = step_delay
        self.jobs: list[Job] = []
        self.admitted: list[int] = []  # job numbers, in admission order
        self.dropped: list[tuple[int, bool]] = []  # (job number, failed)
        self.crash_on_step: int | None = None  # the step number that raises
        self.refuse: set[int] = set()  # job numbers whose admission raises
        self.steps = 0
        self.done: dict[int, int] = {}  # tokens each job has had
        self.idles = 0
        self.shut = False

    def has_room(self) -> bool:
        return len(self.jobs) < self.room

    def admit(self, job: Job) -> None:
        if job.number in self.refuse:
            raise ValueError("refused by the backend")
        self.admitted.append(job.number)
        self.jobs.append(job)

    def running(self) -> list[Job]:
        return list(self.jobs)

    def step(self) -> None:
        self.steps += 1
        time.sleep(self.step_delay)
        if self.crash_on_step == self.steps:
            raise RuntimeError("the device fell over")
        for job in list(self.jobs):
            done = self.done[job.number] = self.done.get(job.number, 0) + 1
            job.emit("x", done)
            if done >= job.request.params.max_tokens:
                job.finish("length", done)
                self.jobs.remove(job)

    def drop(self, job: Job, failed: bool = False) -> None:
        self.dropped.append((job.number, failed))
        self.jobs.remove(job)

    def shutdown(self) -> None:
        self.shut = True


class Preempting(Scripted):
    """A Scripted backend that can set a job aside: its progress (`done`) is kept, and it goes on from there."""

    def __init__(self, room: int = 2, step_delay: float = 0.0):
        super().__init__(room, step_delay)
        self.preempted: list[int] = []
        self.kept: set[int] = set()  # what preempt keeps until the job is admitted again or discarded
        self.discarded: list[int] = []

    def can_preempt(self) -> bool:
        return True

    def preempt(self, job: Job) -> bool:
        self.jobs.remove(job)
        self.preempted.append(job.number)
        self.kept.add(job.number)
        return True

    def admit(self, job: Job) -> None:
        self.kept.discard(job.number)
        super().admit(job)

    def discard(self, job: Job) -> None:
        if job.number in self.kept:
            self.kept.discard(job.number)
            self.discarded.append(job.number)


def request(tokens: int = 3, tenant: str = "") -> GenerationRequest:
    return GenerationRequest([1, 2, 3], SamplingParams(max_tokens=tokens, temperature=0), tenant=tenant)


def read_on_thread(stream: Iterator[Chunk]) -> list[str]:
    """Read a stream on a thread; the list gets its text when it ends."""
    out: list[str] = []
    threading.Thread(target=lambda: out.append(text(stream)), daemon=True).start()
    return out


def wait_for(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert predicate()


def text(stream: Iterator[Chunk]) -> str:
    return "".join(c.text for c in stream)


def test_jobs_run_to_their_end_and_share_steps() -> None:
    backend = Scripted(room=2)
    shell = EngineShell(backend, max_queue=8).start()
    try:
        streams = [shell.submit(request(3)) for _ in range(3)]
        assert [text(s) for s in streams] == ["xxx"] * 3
        assert backend.admitted == [1, 2, 3] and backend.steps < 9  # two ran together
    finally:
        shell.close()
    assert backend.shut


def test_a_crash_mid_step_fails_only_that_steps_jobs() -> None:
    backend = Scripted(room=1)
    backend.crash_on_step = 2
    shell = EngineShell(backend, max_queue=8).start()
    try:
        first = shell.submit(request(5))
        second = shell.submit(request(2))
        with pytest.raises(EngineError, match="the device fell over"):
            text(first)
        assert text(second) == "xx"  # the worker survived and went on
        assert backend.dropped == [(1, True)]  # dropped as failed: what it built may be broken
    finally:
        shell.close()


def cancel_one_waiting(shell: EngineShell) -> None:
    """Submit a long job, then one that waits behind it and is cancelled: it fails as never started, the long
    one finishes (the caller checks its backend saw only the first)."""
    try:
        busy = shell.submit(request(20))
        waiting_request = request(3)
        waiting = shell.submit(waiting_request)
        waiting_request.cancel.set()
        with pytest.raises(Cancelled, match="before it started"):
            text(waiting)
        assert text(busy) == "x" * 20
    finally:
        shell.close()


def test_a_cancel_before_admission_never_reaches_the_backend() -> None:
    backend = Scripted(room=1, step_delay=0.01)
    cancel_one_waiting(EngineShell(backend, max_queue=8).start())
    assert backend.admitted == [1]


def test_a_cancel_while_running_drops_the_job() -> None:
    backend = Scripted(room=1, step_delay=0.01)
    shell = EngineShell(backend, max_queue=8).start()
    try:
        stream = shell.submit(request(1000))
        next(stream)
        stream.close()  # the reader went away: its cancel is set
        deadline = time.monotonic() + 10
        while not backend.dropped and time.monotonic() < deadline:
            time.sleep(0.01)
        assert backend.dropped == [(1, False)] and backend.steps < 1000
    finally:
        shell.close()


def test_a_refused_admission_fails_that_job_only() -> None:
    backend = Scripted(room=1)
    backend.refuse = {1}
    shell = EngineShell(backend, max_queue=8).start()
    try:
        with pytest.raises(EngineError, match="refused by the backend"):
            text(shell.submit(request(2)))
        assert text(shell.submit(request(2))) == "xx"
    finally:
        shell.close()


def test_close_ends_every_stream_and_refuses_new_ones() -> None:
    backend = Scripted(room=1, step_delay=0.01)
    shell = EngineShell(backend, max_queue=8).start()
    running = shell.submit(request(10_000))
    queued = shell.submit(request(3))
    next(running)
    errors: list[BaseException] = []

    def read(stream: Iterator[Chunk]) -> None:
        try:
            text(stream)
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=read, args=(s,)) for s in (running, queued)]
    for reader in readers:
        reader.start()
    assert shell.close()
    for reader in readers:
        reader.join(timeout=10)
    assert len(errors) == 2 and all(isinstance(e, Cancelled) for e in errors)
    assert backend.shut and not shell.ready()
    with pytest.raises(NotReady):
        shell.submit(request())


def test_a_full_queue_is_refused_at_once() -> None:
    """max_queue jobs wait beyond the slots; one more is refused without waiting."""
    backend = Scripted(room=1, step_delay=0.05)
    shell = EngineShell(backend, max_queue=1, slots=1).start()
    try:
        first = shell.submit(request(100))
        next(first)  # admitted: the queue is empty again
        shell.submit(request(1))
        shell.submit(request(1))
        with pytest.raises(Overloaded):
            shell.submit(request(1))
    finally:
        shell.close()


def test_requests_bound_for_slots_that_free_at_once_are_not_refused() -> None:
    """A whole batch ends in one step and its clients ask again at once: while the worker is still in
    that step, the new requests wait for the freed slots, and only max_queue more are taken beyond them."""
    backend = Scripted(room=4, step_delay=0.3)
    shell = EngineShell(backend, max_queue=2, slots=4).start()
    try:
        batch = [shell.submit(request(1)) for _ in range(4)]
        time.sleep(0.1)  # admitted, all four in the step that ends them
        again = [shell.submit(request(1)) for _ in range(4 + 2)]
        with pytest.raises(Overloaded):
            shell.submit(request(1))
        assert [text(s) for s in batch + again] == ["x"] * 10
    finally:
        shell.close()


def test_idle_work_runs_only_when_nothing_waits() -> None:
    class Ahead(Scripted):
        idle_seconds = 0.01

        def wants_idle(self) -> bool:
            return self.idles < 3

        def idle(self) -> None:
            self.idles += 1

    backend = Ahead(room=1)
    shell = EngineShell(backend, max_queue=8).start()
    try:
        deadline = time.monotonic() + 10
        while backend.idles < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert backend.idles == 3 and backend.admitted == []
        assert text(shell.submit(request(2))) == "xx"
    finally:
        shell.close()


class Whole:
    """A `run` for OneAtATime: emits one token per `delay` up to max_tokens, raising or stopping where told."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.ran: list[int] = []  # job numbers, in order
        self.returned: list[int] = []  # job numbers whose run returned (finished, cancelled or not)
        self.crash: set[int] = set()  # job numbers that raise after their first token
        self.unfinished: set[int] = set()  # job numbers that return without finishing

    def __call__(self, job: Job) -> None:
        self.ran.append(job.number)
        try:
            limit = job.request.params.max_tokens
            for done in range(1, limit + 1):
                if job.request.cancel.is_set():
                    return
                time.sleep(self.delay)
                job.emit("x", done)
                if job.number in self.crash:
                    raise RuntimeError("the device fell over")
            if job.number not in self.unfinished:
                job.finish("length", limit)
        finally:
            self.returned.append(job.number)


def test_one_at_a_time_runs_whole_jobs_in_order() -> None:
    run = Whole()
    shell = EngineShell(OneAtATime(run), max_queue=8).start()
    try:
        streams = [shell.submit(request(n)) for n in (2, 3, 1)]
        assert [text(s) for s in streams] == ["xx", "xxx", "x"]
        assert run.ran == [1, 2, 3]
    finally:
        shell.close()


def test_one_at_a_time_a_crashed_job_fails_alone() -> None:
    run = Whole()
    run.crash = {1}
    run.unfinished = {2}
    shell = EngineShell(OneAtATime(run), max_queue=8).start()
    try:
        crashed, unfinished, fine = (shell.submit(request(3)) for _ in range(3))
        with pytest.raises(EngineError, match="generation failed: RuntimeError: the device fell over"):
            text(crashed)
        with pytest.raises(EngineError, match="stopped without finishing"):
            text(unfinished)
        assert text(fine) == "xxx"  # the worker survived both
    finally:
        shell.close()


def test_one_at_a_time_a_cancel_before_admission_never_runs() -> None:
    run = Whole(delay=0.01)
    cancel_one_waiting(EngineShell(OneAtATime(run), max_queue=8).start())
    assert run.ran == [1]


def test_one_at_a_time_a_cancel_from_elsewhere_ends_the_running_stream() -> None:
    run = Whole(delay=0.01)
    shell = EngineShell(OneAtATime(run), max_queue=8).start()
    try:
        cancelled = request(100_000)
        stream = shell.submit(cancelled)
        next(stream)
        cancelled.cancel.set()  # a reset or a session's delete, not the reader
        with pytest.raises(Cancelled, match="generation cancelled"):
            text(stream)
        assert text(shell.submit(request(2))) == "xx"
    finally:
        shell.close()


def test_close_stops_a_whole_job_at_its_next_token_and_ends_every_stream() -> None:
    run = Whole(delay=0.01)
    shell = EngineShell(OneAtATime(run), max_queue=8).start()
    running = shell.submit(request(100_000))
    queued = shell.submit(request(3))
    next(running)
    started = time.monotonic()
    assert shell.close(timeout=10)
    assert time.monotonic() - started < 5  # not the 1000 s the generation would take
    for stream in (running, queued):
        with pytest.raises(Cancelled, match="server shutting down"):
            text(stream)
    assert run.ran == [1] and run.returned == [1]


def test_a_tenant_below_its_share_preempts_the_newest_job_of_a_tenant_holding_every_slot() -> None:
    """Bulk holds both slots and has a third request waiting; chat's request takes the slot of bulk's newest
    running job, which goes back to the queue as bulk's oldest and later ends with all its tokens."""
    backend = Preempting(room=2, step_delay=0.005)
    shell = EngineShell(backend, max_queue=8, slots=2).start()
    try:
        bulk = [read_on_thread(shell.submit(request(200, "bulk"))) for _ in range(3)]
        wait_for(lambda: backend.done.get(2, 0) >= 5)
        chat = text(shell.submit(request(3, "chat")))
        assert chat == "xxx" and backend.preempted == [2]
        assert not any(bulk)  # chat ended before any of bulk's
        wait_for(lambda: all(bulk))
        assert [b[0] for b in bulk] == ["x" * 200] * 3  # the preempted one went on where it stopped
        assert backend.admitted == [1, 2, 4, 2, 3]  # job 2 back before bulk's waiting job 3
        assert backend.kept == set() and backend.discarded == [] and backend.dropped == []
    finally:
        shell.close()


@pytest.mark.parametrize(
    ("preempting", "slots", "chat_tenant"),
    [
        (True, 2, "bulk"),  # one tenant: first come, first served
        (True, 1, "chat"),  # a share of 0 slots
        (False, 2, "chat"),  # a backend that cannot preempt
    ],
)
def test_no_preemption_for_one_tenant_one_slot_or_a_backend_that_cannot(
    preempting: bool, slots: int, chat_tenant: str
) -> None:
    backend = (Preempting if preempting else Scripted)(room=slots, step_delay=0.005)
    shell = EngineShell(backend, max_queue=8, slots=slots).start()
    try:
        bulk = [read_on_thread(shell.submit(request(40, "bulk"))) for _ in range(slots)]
        wait_for(lambda: backend.steps >= 3)
        assert text(shell.submit(request(3, chat_tenant))) == "xxx"
        wait_for(lambda: all(bulk))
        assert getattr(backend, "preempted", []) == [] and backend.dropped == []
        assert bulk == [["x" * 40]] * slots  # every job ran whole, none set aside
    finally:
        shell.close()


def test_a_preempted_job_cancelled_while_it_waits_is_discarded() -> None:
    backend = Preempting(room=2, step_delay=0.005)
    shell = EngineShell(backend, max_queue=8, slots=2).start()
    try:
        first, second = request(1000, "bulk"), request(1000, "bulk")
        bulk = [shell.submit(first), shell.submit(second)]
        wait_for(lambda: backend.done.get(2, 0) >= 2)
        chat = shell.submit(request(1000, "chat"))
        next(chat)
        assert backend.preempted == [2] and backend.kept == {2}
        second.cancel.set()  # its reader left while it waited
        first.cancel.set()  # a slot frees: the waiting job 2 is taken, found cancelled, and discarded
        wait_for(lambda: backend.discarded == [2])
        with pytest.raises(Cancelled):
            text(bulk[1])
        assert backend.admitted == [1, 2, 3] and backend.kept == set()
    finally:
        shell.close()
