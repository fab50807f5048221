"""Slots (one KV sequence each) and the choice of a free slot for a prompt: pure, testable without weights."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..jobs import Job

# A prefix another slot holds is copied (a memcpy of its KV) when it spares at least this much prefill.
MIN_COPIED_TOKENS = 16


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two sequences share (list slices compare in C: a bisection, not a loop)."""
    a = a if isinstance(a, list) else list(a)
    b = b if isinstance(b, list) else list(b)
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class Slot:
    """One KV sequence and the job (if any) that is using it."""

    id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV this sequence holds
    session_id: str | None = None  # the session last served, for affinity
    scope: str = ""  # the cache scope of the prompts its KV came from (invariant 3 of prompt_cache)
    savable: bool = True  # False once its session was reset: its KV is then nobody's to keep
    last_used: int = 0  # scheduler tick of the last admission or release (LRU)
    job: Job | None = None
    admitted: int = 0  # admission order, for fair prefill
    pending: list[int] = field(default_factory=list)  # prompt tokens still to prefill
    next_token: int | None = None  # sampled, emitted, not yet decoded
    opening: list[int] = field(default_factory=list)  # the next turn's opening, to decode when idle
    generated: int = 0
    sampler: Any = None
    decoder: Any = None  # incremental UTF-8 decoder: holds back an incomplete character


def cheapest(free: Iterable[Slot]) -> Slot:
    """The free slot whose KV is cheapest to lose: an empty one, else the least recently used."""
    return min(free, key=lambda s: (len(s.cached) > 0, s.last_used))


def choose_slot(
    free: Sequence[Slot],
    slots: Sequence[Slot],
    prompt: Sequence[int],
    session: str | None,
    scope: str,
    saved: int,
) -> Slot:
    """Choose a free slot for a prompt, keeping as much useful KV cache as possible.

    The slot that last served this session wins. Else, when a saved state shares more of the prompt
    (`saved` tokens) than any free slot, the slot whose cache is cheapest to lose (the restore
    overwrites it; its own KV is saved first). Else the slot with the longest common prefix, if
    reusing it throws nothing away (it holds the whole prompt, so what follows is only an earlier
    reply to it, or its cache ends inside the prompt). Else, when some slot (busy ones too) shares
    a prefix worth copying, the cheapest slot (the prefix is copied into it, and the other slot
    keeps its history). Else the slot that saves more prefill than it throws away, else an empty
    slot, else the least recently used one. Only slots of the prompt's scope count as sharing.
    """
    cheapest_slot = cheapest(free)
    if session is not None:
        for slot in free:
            if slot.session_id == session and slot.scope == scope:
                return slot
    commons = {s.id: common_prefix(s.cached, prompt) if s.scope == scope else 0 for s in slots}
    if saved > 0 and all(commons[s.id] < saved for s in free):
        return cheapest_slot

    def lost(slot: Slot) -> int:
        if commons[slot.id] >= len(prompt) - 1:
            # The whole prompt is cached: what follows it is an earlier reply to this very
            # prompt (a regenerate or a repeat), which the new reply replaces, not a history.
            return 0
        return len(slot.cached) - commons[slot.id]

    keeping = [s for s in free if commons[s.id] > 0 and lost(s) == 0]
    if keeping:
        return max(keeping, key=lambda s: (commons[s.id], -s.last_used))
    if max(commons.values()) - commons[cheapest_slot.id] >= MIN_COPIED_TOKENS:
        return cheapest_slot
    best = max(free, key=lambda s: (commons[s.id] - lost(s), -s.last_used))
    return best if commons[best.id] > lost(best) else cheapest_slot
