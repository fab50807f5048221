"""The job queue every engine uses, and `generate` racing `close` on the scripted engine."""

from __future__ import annotations

import threading

import pytest

from pureapi.engines.fake import FakeEngine
from pureapi.engines.jobs import JobQueue
from pureapi.errors import Cancelled, NotReady, Overloaded
from pureapi.types import GenerationRequest, SamplingParams

from ..races import race_generate_with_close


def request(session: str | None = None) -> GenerationRequest:
    return GenerationRequest([1, 2, 3], SamplingParams(max_tokens=4), session_id=session)


def test_jobs_are_numbered_and_taken_in_order() -> None:
    jobs = JobQueue(max_queue=4)
    first, second = jobs.submit(request()), jobs.submit(request())
    assert (first.number, second.number) == (1, 2)
    assert jobs.take(timeout=0) is first
    assert jobs.take(timeout=0) is second
    assert jobs.take(timeout=0) is None
    assert jobs.take(timeout=0.01) is None


def test_one_tenants_backlog_never_holds_another_tenants_request_behind_it() -> None:
    """Taken tenant by tenant, each tenant's own jobs oldest first; a tenant that comes later is next."""
    jobs = JobQueue(max_queue=8)
    bulk = [jobs.submit(GenerationRequest([1], SamplingParams(), tenant="bulk")) for _ in range(4)]
    chat = jobs.submit(GenerationRequest([1], SamplingParams(), tenant="chat"))
    assert jobs.take(timeout=0) is bulk[0]
    assert jobs.take(timeout=0) is chat  # not behind bulk's three older ones
    assert jobs.take(timeout=0) is bulk[1]
    late = jobs.submit(GenerationRequest([1], SamplingParams(), tenant="late"))
    assert jobs.take(timeout=0) is late  # never served: before bulk, served last
    assert [jobs.take(timeout=0), jobs.take(timeout=0), jobs.take(timeout=0)] == [bulk[2], bulk[3], None]


def test_a_full_queue_refuses_at_once_and_a_closed_one_always() -> None:
    jobs = JobQueue(max_queue=1)
    jobs.submit(request())
    with pytest.raises(Overloaded):
        jobs.submit(request())
    assert jobs.close()
    assert not jobs.close()
    with pytest.raises(NotReady):
        jobs.submit(request())
    assert jobs.take() is None  # a closed queue never blocks its worker


def test_close_cancels_and_fails_every_waiting_job() -> None:
    jobs = JobQueue(max_queue=4)
    waiting = [jobs.submit(request()) for _ in range(3)]
    jobs.close("going away")
    for job in waiting:
        assert job.request.cancel.is_set()
        with pytest.raises(Cancelled, match="going away"):
            list(job.stream())


def test_close_wakes_a_waiting_worker() -> None:
    jobs = JobQueue(max_queue=4)
    taken: list[object] = []
    worker = threading.Thread(target=lambda: taken.append(jobs.take()))
    worker.start()
    jobs.close()
    worker.join(timeout=5)
    assert not worker.is_alive() and taken == [None]


def test_unclaim_drops_a_sessions_claim_on_waiting_jobs_only() -> None:
    jobs = JobQueue(max_queue=4)
    taken = jobs.submit(request("a"))
    assert jobs.take(timeout=0) is taken
    mine, other = jobs.submit(request("a")), jobs.submit(request("b"))
    assert jobs.unclaim("a") == 3  # the last number submitted before the reset
    assert (taken.session, mine.session, other.session) == ("a", None, "b")


def test_stream_ends_at_finish_and_closing_it_cancels() -> None:
    jobs = JobQueue(max_queue=4)
    job = jobs.submit(request())
    job.emit("hi", 1)
    job.emit("", 1)  # empty text sends nothing
    job.finish("stop", 1)
    chunks = list(job.stream())
    assert [(c.text, c.finish_reason, c.prompt_tokens) for c in chunks] == [("hi", None, 3), ("", "stop", 3)]
    other = jobs.submit(request())
    other.emit("a", 1)
    stream = other.stream()
    next(stream)
    stream.close()
    assert other.request.cancel.is_set()


def test_generate_racing_close_always_ends_on_a_queued_engine() -> None:
    race_generate_with_close(lambda: FakeEngine(max_queue=2), rounds=200)
