"""The shared KV pool (llamacpp/pool.py): when it runs out of cells, evict idle KV, park, resume; compaction.
No weights: a scripted pool of N cells stands in for llama.cpp's unified KV cache."""

from __future__ import annotations

from collections import Counter

import pytest

from pureapi.engines.jobs import Job, JobQueue
from pureapi.engines.llamacpp.pool import COMPACT_MIN_TOKENS, COMPACT_SHARE, KVPool
from pureapi.engines.llamacpp.prompt_cache import PromptCache
from pureapi.engines.llamacpp.reuse import KVReuse
from pureapi.engines.llamacpp.slots import Slot
from pureapi.errors import EngineError
from pureapi.types import GenerationRequest, SamplingParams


class ScriptedKV:
    """A pool of `cells` cells: a slot's sequence takes one per cached token; a state is its tokens."""

    def __init__(self, cells: int, slots: list[Slot]):
        self.cells = cells
        self.slots = slots
        self.copy_fails = False
        self.load_fails: set[int] = set()  # sequence ids whose states do not load back
        self.loads: list[int] = []  # sequence ids, in the order their states were loaded
        self.reshared: list[tuple[int, int, int]] = []  # (src, dst, n)

    def used(self) -> int:
        return sum(len(s.cached) for s in self.slots)

    def state(self, seq: int) -> tuple[int, ...] | None:
        slot = next(s for s in self.slots if s.id == seq)
        return None if self.copy_fails else tuple(slot.cached)

    def load(self, slot: Slot, tokens: list[int], buf: tuple[int, ...]) -> bool:
        self.wipe(slot)
        if self.used() + len(buf) > self.cells or slot.id in self.load_fails:
            return False
        assert list(buf) == tokens
        slot.cached = tokens
        self.loads.append(slot.id)
        return True

    def reshare(self, src: Slot, dst: Slot, n: int) -> bool:
        assert src.cached[:n] == dst.cached[:n]
        self.reshared.append((src.id, dst.id, n))
        return True

    def wipe(self, slot: Slot) -> None:
        slot.cached = []
        slot.opening = []


def setup(cells: int, n: int, cache_bytes: int = 0) -> tuple[ScriptedKV, KVPool, list[Slot], Counter[str]]:
    slots = [Slot(i) for i in range(n)]
    kv = ScriptedKV(cells, slots)
    stats: Counter[str] = Counter()
    reuse = KVReuse(kv, PromptCache(cache_bytes), slots, JobQueue(4), stats)  # type: ignore[arg-type]
    return kv, KVPool(kv, reuse, slots, stats), slots, stats  # type: ignore[arg-type]


def run(slot: Slot, cached: int, admitted: int) -> Slot:
    slot.job = Job(GenerationRequest([1], SamplingParams()), admitted)
    slot.cached, slot.admitted, slot.next_token = list(range(cached)), admitted, 7
    return slot


def stepper(kv: ScriptedKV, pool: KVPool, slots: list[Slot]):  # type: ignore[no-untyped-def]
    """A decode of one token per running slot: 1 (no cells) while the pool cannot hold them."""

    def running() -> list[Slot]:
        return [s for s in slots if s.job is not None and not pool.is_parked(s)]

    def decode() -> int:
        batch = running()
        if kv.used() + len(batch) > kv.cells:
            return 1
        for s in batch:
            s.cached.append(7)
        return 0

    return decode, running


def test_idle_kv_goes_first_least_recently_used() -> None:
    kv, pool, slots, stats = setup(cells=100, n=4)
    run(slots[0], 40, 1)
    run(slots[1], 30, 2)
    slots[2].cached, slots[2].last_used = list(range(20)), 5
    slots[3].cached, slots[3].last_used = list(range(10)), 3
    decode, running = stepper(kv, pool, slots)
    assert pool.fit(decode, running) == 0
    # 100 cells held 100 tokens; two decode tokens needed one eviction: the older idle slot's.
    assert slots[3].cached == [] and len(slots[2].cached) == 20
    assert stats["evicted_slots"] == 1 and stats["parked_jobs"] == 0
    assert len(slots[0].cached) == 41 and len(slots[1].cached) == 31


def test_the_newest_generation_is_parked_and_resumed_after_one_ends() -> None:
    kv, pool, slots, stats = setup(cells=100, n=3)
    old, mid, new = run(slots[0], 40, 1), run(slots[2], 30, 2), run(slots[1], 30, 3)
    decode, running = stepper(kv, pool, slots)
    assert pool.fit(decode, running) == 0
    assert pool.is_parked(new) and new.cached == [] and new.next_token == 7  # its job, sampler, token stay
    assert len(old.cached) == 41 and len(mid.cached) == 31
    assert stats["parked_jobs"] == 1 and pool.any_parked()
    pool.resume()  # nothing ended yet: no attempt
    assert pool.is_parked(new)
    old.job = None  # the oldest ends; its KV stays as cache until the pool needs it
    pool.released(old)
    pool.resume()
    assert not pool.any_parked() and new.cached == list(range(30))
    assert old.cached == [] and stats["evicted_slots"] == 1 and stats["resumed_jobs"] == 1


def test_a_parked_generation_waits_while_the_pool_is_still_full() -> None:
    kv, pool, slots, stats = setup(cells=100, n=3)
    a, b, c = run(slots[0], 45, 1), run(slots[1], 45, 2), run(slots[2], 9, 3)
    decode, running = stepper(kv, pool, slots)
    assert pool.fit(decode, running) == 0 and pool.is_parked(c)
    a.cached += list(range(8))  # a grew meanwhile: 54 + 46 = 100 cells, no room for c's 9
    pool.released(Slot(9))  # some other generation ended
    pool.resume()
    assert pool.is_parked(c) and stats["resumed_jobs"] == 0
    b.job, b.cached = None, []  # b ends, and its KV was taken (a reset)
    pool.released(b)
    pool.resume()
    assert not pool.any_parked() and c.cached == list(range(9))


def test_a_lone_generation_is_never_parked() -> None:
    kv, pool, slots, _ = setup(cells=10, n=2)
    run(slots[0], 10, 1)
    decode, running = stepper(kv, pool, slots)
    assert pool.fit(decode, running) == 1  # only when a conversation outgrows the pool: the engine raises
    assert not pool.any_parked()


def test_a_cancelled_parked_generation_leaves_nothing_behind() -> None:
    kv, pool, slots, _ = setup(cells=60, n=2)
    run(slots[0], 30, 1)
    late = run(slots[1], 30, 2)
    decode, running = stepper(kv, pool, slots)
    assert pool.fit(decode, running) == 0 and pool.is_parked(late)
    late.job = None
    pool.released(late)
    assert not pool.any_parked()


def test_a_state_that_cannot_be_copied_out_fails_the_step() -> None:
    kv, pool, slots, _ = setup(cells=60, n=2)
    run(slots[0], 30, 1)
    run(slots[1], 30, 2)
    kv.copy_fails = True
    decode, running = stepper(kv, pool, slots)
    with pytest.raises(EngineError, match="KV pool is full"):
        pool.fit(decode, running)


def test_default_slots_follow_the_pool() -> None:
    from pureapi.engines.llamacpp.loader import default_slots

    assert default_slots(4 * 8192, 8192) == 16  # default flags: the models' window capped at 8192 on a CPU
    assert default_slots(4 * 4096, 4096) == 8
    assert default_slots(4 * 2048, 2048) == 4  # a model trained on 2048 tokens
    assert default_slots(4 * 512, 512) == 4  # --ctx-size 512: four such conversations fill the pool
    assert default_slots(1000, 8192) == 1
    assert default_slots(1 << 20, 8192) == 16


def test_admission_moves_idle_kv_out_of_the_pool_into_the_prompt_cache() -> None:
    slots = [Slot(i) for i in range(4)]
    kv = ScriptedKV(1000, slots)
    stats: Counter[str] = Counter()
    cache = PromptCache(1 << 20)
    reuse = KVReuse(kv, cache, slots, JobQueue(4), stats)  # type: ignore[arg-type]
    admitted, running, idle, reset = slots
    admitted.cached, idle.cached, reset.cached = list(range(40)), list(range(100, 150)), list(range(200, 230))
    run(running, 30, 1)
    reset.savable = False  # its session was reset: its KV is nobody's
    reuse.clear_idle(keep=admitted)
    assert len(admitted.cached) == 40 and len(running.cached) == 30  # the admitted and the running keep theirs
    assert idle.cached == [] and reset.cached == []
    found = cache.find([*range(100, 150), 7], "")
    assert found is not None and found.common == 50  # the idle slot's KV waits in the cache
    assert cache.find(list(range(200, 230)), "") is None  # the reset one's is kept nowhere
    assert stats["evicted_slots"] == 2


def test_without_a_prompt_cache_idle_kv_stays_in_its_slot() -> None:
    _, pool, slots, stats = setup(cells=1000, n=2)
    slots[1].cached = list(range(50))
    pool.reuse.clear_idle(keep=slots[0])
    assert len(slots[1].cached) == 50 and stats["evicted_slots"] == 0


def scattered(n: int, cache_bytes: int = 0) -> tuple[ScriptedKV, KVPool, list[Slot], Counter[str]]:
    """Three generations of 40 tokens each and an idle slot of 20 (its turn opening waiting), in 200 cells."""
    kv, pool, slots, stats = setup(cells=200, n=4, cache_bytes=cache_bytes)
    for i in range(3):
        run(slots[i], 40, i + 1)
        slots[i].cached = [100 * i + t for t in range(40)]
    slots[3].cached, slots[3].opening = list(range(300, 320)), [5, 6]
    pool.decoded_side_by_side(n)
    return kv, pool, slots, stats


def test_the_pool_is_compacted_once_enough_tokens_were_decoded_side_by_side() -> None:
    kv, pool, slots, stats = scattered(100)
    before = [list(s.cached) for s in slots]
    assert not pool.compact()  # fewer than COMPACT_MIN_TOKENS
    assert kv.loads == [] and stats["compactions"] == 0
    pool.decoded_side_by_side(40)  # 140: at least COMPACT_MIN_TOKENS, and more than the share of 140 held
    assert pool.compact()
    assert kv.loads == [0, 1, 2, 3]  # every sequence copied out, then loaded back one after another
    assert [s.cached for s in slots] == before and slots[3].opening == [5, 6]
    assert all(s.job is not None and s.next_token == 7 for s in slots[:3]) and not pool.any_parked()
    assert stats["compactions"] == 1 and stats["compacted_tokens"] == 140
    assert not pool.compact()  # counted afresh from here


def test_in_a_fuller_pool_the_share_of_the_tokens_held_sets_when_it_is_compacted() -> None:
    _, pool, slots, stats = setup(cells=4000, n=4)
    for i, slot in enumerate(slots):
        run(slot, 1000, i + 1)
    threshold = int(COMPACT_SHARE * 4000)
    assert threshold > COMPACT_MIN_TOKENS
    pool.decoded_side_by_side(threshold - 1)
    assert not pool.compact() and stats["compactions"] == 0
    pool.decoded_side_by_side(1)
    assert pool.compact() and stats["compacted_tokens"] == 4000


def test_a_prefix_two_slots_of_one_scope_hold_is_shared_again() -> None:
    kv, pool, slots, _ = scattered(200)
    system = list(range(1000, 1030))
    for slot, scope in zip(slots, ["a", "a", "b", "a"], strict=True):
        slot.cached, slot.scope = system + slot.cached[:10], scope
    slots[3].cached = system[:12] + [9] * 20  # shares fewer than MIN_COPIED_TOKENS
    assert pool.compact()
    assert kv.reshared == [(0, 1, 30)]  # not with slot 2 (another scope), nor slot 3 (too short)


def test_compaction_changes_nothing_when_a_state_cannot_be_copied_out() -> None:
    kv, pool, slots, stats = scattered(500)
    before = [list(s.cached) for s in slots]
    kv.copy_fails = True
    assert not pool.compact()
    assert [s.cached for s in slots] == before and kv.loads == [] and stats["compactions"] == 0


def test_a_state_that_does_not_load_back_waits_parked_or_in_the_prompt_cache() -> None:
    kv, pool, slots, stats = scattered(500, cache_bytes=10_000)
    kept, idle = list(slots[1].cached), list(slots[3].cached)
    kv.load_fails = {1, 3}
    assert pool.compact()
    assert kv.loads == [0, 2] and slots[1].cached == slots[3].cached == []
    assert pool.is_parked(slots[1]) and slots[1].job is not None  # the generation waits for cells
    assert pool.reuse.cache.find([*idle, 1], slots[3].scope) is not None  # the idle conversation's KV is kept
    assert stats["saved_states"] == 1
    kv.load_fails.clear()
    pool.resume()
    assert not pool.any_parked() and slots[1].cached == kept


def test_no_compaction_while_a_generation_is_parked_or_when_the_slots_would_not_fit() -> None:
    kv, pool, slots, _ = scattered(500)
    pool.hold(slots[2], pool.copy_out(slots[2]))  # type: ignore[arg-type]
    assert not pool.compact() and kv.loads == []
    kv, pool, slots, _ = scattered(500)
    kv.cells = 139  # a prefix the slots share counts once in the pool but once per slot here
    assert not pool.compact() and kv.loads == []
