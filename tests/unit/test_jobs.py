"""The job queue every engine uses, and `generate` racing `close` on the scripted engine."""

from __future__ import annotations

import threading

import pytest

from pureapi.engines.fake import FakeEngine
from pureapi.engines.jobs import Job, JobQueue
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


def tenant_job(jobs: JobQueue, tenant: str) -> Job:
    return jobs.submit(GenerationRequest([1], SamplingParams(), tenant=tenant))


def taken(jobs: JobQueue, tenant: str, n: int) -> list[Job]:
    """n jobs of the tenant, submitted and taken: running."""
    running = [tenant_job(jobs, tenant) for _ in range(n)]
    assert [jobs.take(timeout=0) for _ in running] == running
    return running


def test_a_tenant_below_its_share_claims_the_newest_job_of_the_tenant_running_the_most() -> None:
    jobs = JobQueue(max_queue=16)
    running = taken(jobs, "bulk", 4)
    waiting_bulk = tenant_job(jobs, "bulk")
    chat = tenant_job(jobs, "chat")
    assert jobs.claim(running, slots=4) == (chat, running[-1])  # bulk runs 4, its share is 2
    assert jobs.claim(running, slots=1) is None  # a share of 0: nothing to claim
    assert jobs.take_claimed(chat) and not jobs.take_claimed(chat)
    # Bulk back at 3 with chat at 1: still above its share, and chat still below with another request.
    again = tenant_job(jobs, "chat")
    assert jobs.claim([*running[:3], chat], slots=4) == (again, running[2])
    # At its share (2 and 2), nobody claims: a claim never takes a tenant below its share.
    assert jobs.claim([*running[:2], chat, again], slots=4) is None
    # With only bulk waiting, bulk alone is owed every slot: no claims, first come first served.
    assert jobs.take_claimed(again)
    assert jobs.claim(running, slots=4) is None and jobs.take(timeout=0) is waiting_bulk


def test_a_cancelled_job_claims_nothing_and_is_never_preempted() -> None:
    jobs = JobQueue(max_queue=16)
    running = taken(jobs, "bulk", 2)
    chat = tenant_job(jobs, "chat")
    chat.request.cancel.set()
    assert jobs.claim(running, slots=2) is None
    late = tenant_job(jobs, "chat")
    running[1].request.cancel.set()  # on its way out: bulk runs one live job, its share
    assert jobs.claim(running, slots=2) is None
    running[1].request.cancel.clear()
    assert jobs.claim(running, slots=2) == (late, running[1])


def test_a_preempted_job_goes_back_as_its_tenants_oldest() -> None:
    jobs = JobQueue(max_queue=1)
    first = tenant_job(jobs, "bulk")
    assert jobs.take(timeout=0) is first
    second = tenant_job(jobs, "bulk")
    assert jobs.requeue(first)  # beyond the bound: it was admitted once
    assert jobs.take(timeout=0) is first and jobs.take(timeout=0) is second
    jobs.close()
    assert not jobs.requeue(first)


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
