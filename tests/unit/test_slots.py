"""The llama.cpp engine's slot choice and step plan: pure functions, no model weights."""

from __future__ import annotations

import random

from pureapi.engines.jobs import Job
from pureapi.engines.llamacpp.batch import plan_step
from pureapi.engines.llamacpp.slots import MIN_COPIED_TOKENS, Slot, choose_slot, common_prefix
from pureapi.types import GenerationRequest, SamplingParams

PROMPT = list(range(100, 140))  # 40 tokens


def busy(slot: Slot) -> Slot:
    slot.job = Job(GenerationRequest([1], SamplingParams()), 1)
    return slot


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2]) == 2
    assert common_prefix((1, 2, 3), [1, 2, 3, 4]) == 3  # any sequences


def test_common_prefix_matches_a_plain_loop() -> None:
    rng = random.Random(7)
    for _ in range(500):
        a = [rng.randrange(3) for _ in range(rng.randrange(60))]
        b = a[: rng.randrange(len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(60))]
        expected = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        assert common_prefix(a, b) == expected == common_prefix(b, a)


def test_the_sessions_own_slot_wins() -> None:
    slots = [Slot(0, cached=PROMPT[:30]), Slot(1, cached=[9, 9], session_id="s")]
    assert choose_slot(slots, slots, PROMPT, "s", "", 0) is slots[1]
    assert choose_slot(slots, slots, PROMPT, None, "", 0) is slots[0]  # without it: the longest prefix


def test_a_longer_saved_state_takes_the_cheapest_slot() -> None:
    slots = [Slot(0, cached=PROMPT[:10], last_used=1), Slot(1, cached=[7] * 20, last_used=2), Slot(2)]
    assert choose_slot(slots, slots, PROMPT, "s", "", 35) is slots[2]  # the empty one
    # A saved state no longer than a free slot's prefix is not worth a restore.
    assert choose_slot(slots, slots, PROMPT, "s", "", 5) is slots[0]


def test_a_slot_of_another_scope_shares_nothing() -> None:
    """Another API key's KV is never reused: the slot counts as holding no prefix of the prompt."""
    theirs = Slot(0, cached=PROMPT[:30], scope="other-key", last_used=1)
    empty = Slot(1, last_used=2)
    assert choose_slot([theirs, empty], [theirs, empty], PROMPT, None, "my-key", 0) is empty
    assert choose_slot([theirs, empty], [theirs, empty], PROMPT, None, "other-key", 0) is theirs
    mine = Slot(0, cached=[9, 9], session_id="s", scope="other-key")
    assert choose_slot([mine, empty], [mine, empty], PROMPT, "s", "my-key", 0) is not mine


def test_a_slot_holding_the_whole_prompt_is_reused_despite_its_reply() -> None:
    repeat = Slot(0, cached=[*PROMPT, 1, 2, 3, 4, 5, 6, 7, 8], last_used=5)
    other = Slot(1, cached=PROMPT[:20] + [9] * 30, last_used=1)
    assert choose_slot([repeat, other], [repeat, other], PROMPT, None, "", 0) is repeat


def test_a_prefix_worth_copying_from_a_busy_slot_goes_into_the_cheapest_free_one() -> None:
    holder = busy(Slot(0, cached=PROMPT[: MIN_COPIED_TOKENS + 4] + [5] * 10))
    lru = Slot(1, cached=[8] * 50, last_used=1)
    short = Slot(2, cached=PROMPT[:4] + [6] * 2, last_used=2)  # would win on its own 4-token prefix
    assert choose_slot([lru, short], [holder, lru, short], PROMPT, None, "", 0) is lru
    assert choose_slot([lru, short], [lru, short], PROMPT, None, "", 0) is short


def test_a_slot_is_taken_over_only_when_it_saves_more_than_it_loses() -> None:
    worth = Slot(0, cached=PROMPT[:12] + [3] * 4, last_used=2)  # keeps 12, loses 4
    empty = Slot(1, last_used=1)
    assert choose_slot([worth, empty], [worth, empty], PROMPT, None, "", 0) is worth
    costly = Slot(0, cached=PROMPT[:12] + [3] * 40, last_used=2)  # keeps 12, loses 40
    assert choose_slot([costly, empty], [costly, empty], PROMPT, None, "", 0) is empty
    # With no empty slot, the least recently used one.
    old, recent = Slot(0, cached=[4] * 9, last_used=1), Slot(1, cached=[5] * 9, last_used=2)
    assert choose_slot([old, recent], [old, recent], PROMPT, None, "", 0) is old


def test_plan_decodes_first_then_prefills_in_admission_order_within_the_budget() -> None:
    generating = busy(Slot(2, cached=[1] * 4, next_token=7))
    late = busy(Slot(0, pending=list(range(10)), admitted=3))
    early = busy(Slot(1, pending=list(range(6)), admitted=2))
    rows = plan_step([late, early, generating], n_batch=10)
    assert [r.slot.id for r in rows] == [0, 1, 2]  # in sequence order
    by_id = {r.slot.id: r for r in rows}
    assert by_id[2].tokens == [7] and by_id[2].logits and not by_id[2].prefill
    assert by_id[1].tokens == list(range(6)) and by_id[1].logits  # its whole prompt: logits for the last
    assert by_id[0].tokens == list(range(3)) and not by_id[0].logits  # what the budget leaves
    assert sum(len(r.tokens) for r in rows) == 10
