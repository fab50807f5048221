"""KV reuse decisions of the llama.cpp scheduler: save a slot's state before another prompt takes it,
restore a saved one or copy another slot's prefix into a slot, forget a reset session's, and write
everything to disk at shutdown. The engine's invariants 2 and 7 hold here too (see engine.py)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..jobs import JobQueue
from .kv import SequenceKV
from .prompt_cache import Found, PromptCache
from .slots import MIN_COPIED_TOKENS, Slot, common_prefix

if TYPE_CHECKING:
    from .prompt_cache import State

# A slot losing fewer tokens than this is not saved: re-prefilling so few is cheap, the RAM better spent.
MIN_SAVED_TOKENS = 16


class KVReuse:
    """Where a slot's KV comes from besides its own cache, and where it goes when the slot is taken."""

    def __init__(self, kv: SequenceKV, cache: PromptCache, slots: list[Slot], jobs: JobQueue, stats: Counter[str]):
        self.kv = kv
        self.cache = cache
        self.slots = slots  # the engine's list, kept ordered by id
        self._jobs = jobs
        self.stats = stats
        # Sessions reset since the scheduler's last admission -> the last job number submitted before.
        self._forgotten: dict[str, int] = {}
        # Guards _forgotten: forget() runs on request threads, apply_forgets on the scheduler.
        self._forget_lock = threading.Lock()

    def save(self, slot: Slot, lost: int) -> bool:
        """Keep the slot's sequence state, found later by its tokens: in RAM, spilling the oldest to disk.
        True when the cache holds the slot's tokens afterwards (saved now, or before)."""
        if lost < MIN_SAVED_TOKENS or not slot.savable or not self.cache.enabled:
            return False
        if self.cache.covers(slot.cached, slot.scope):  # held already: no copy of the KV at admission
            self.stats["saves_skipped"] += 1
            return True
        buf = self.kv.state(slot.id)
        if buf is None:
            return False
        # A copy of cached: the slot's list changes with the next trim and decode.
        self.keep(slot, list(slot.cached), buf)
        return True

    def keep(self, slot: Slot, tokens: list[int], buf: State) -> None:
        """Keep a state copied out of the slot in the prompt cache, under the slot's scope and session (its
        cells may be wiped already, as after a compaction whose reload failed)."""
        if len(tokens) < MIN_SAVED_TOKENS or not slot.savable or not self.cache.enabled:
            return
        if self.cache.put(tokens, buf, slot.scope, slot.session_id):
            self.stats["saved_states"] += 1

    def clear_idle(self, keep: Slot) -> None:
        """Admission: move the other idle slots' KV out of the shared pool, into the prompt cache.

        Every cell in use costs every decoded token a pass of the attention mask over it (llama.cpp
        attends over the pool's whole used range and masks other sequences out): measured on SmolLM2,
        15 idle conversations of ~1500 tokens took single-stream decode from 119 to 67 tokens/s, while a
        state is restored at ~17 us a token. So, as llama-server does with its unified pool, an idle
        slot keeps its KV only while no other prompt is admitted (a lone conversation's next turn finds
        it in place). KV the cache cannot take (--kv-cache-mb 0) stays in its slot; KV that is
        nobody's (a reset session's) or too short to save is dropped.
        """
        for slot in self.slots:
            if slot is keep or slot.job is not None or not slot.cached:
                continue
            if slot.savable and len(slot.cached) >= MIN_SAVED_TOKENS and not self.save(slot, len(slot.cached)):
                continue
            self.kv.wipe(slot)
            self.stats["evicted_slots"] += 1

    def evict_idle(self, keep: Slot | None = None) -> bool:
        """Free cells of the shared pool: save and wipe the least recently used idle slot that holds KV
        (other than `keep`); False when none does."""
        idle = [s for s in self.slots if s.job is None and s is not keep and s.cached]
        if not idle:
            return False
        slot = min(idle, key=lambda s: s.last_used)
        self.save(slot, len(slot.cached))
        self.kv.wipe(slot)
        self.stats["evicted_slots"] += 1
        return True

    def load(self, slot: Slot, tokens: list[int], buf: State) -> bool:
        """Put a saved state into the slot, giving up other idle slots' KV while the pool is too full for it."""
        while not (loaded := self.kv.load(slot, tokens, buf)) and self.evict_idle(keep=slot):
            pass
        return loaded

    def forget(self, session_id: str) -> None:
        """A reset: drop the states only the session reached now, and its slot's claim at the next step.

        A turn of the session that is still waiting (queued before the reset) runs for its client, but
        as no session's: its KV, the forgotten conversation, must not be kept under the session.
        """
        with self._forget_lock:
            # The scheduler reads a job's session only after taking it off the queue.
            self._forgotten[session_id] = self._jobs.unclaim(session_id)
        self.cache.forget(session_id)

    def apply_forgets(self) -> dict[str, int]:
        """Scheduler thread: slots of forgotten sessions stop being theirs (so their KV is never saved).

        Returns the sessions forgotten since the last call, each with the last job number submitted
        before its reset, for the job being admitted (taken off the queue before `forget` looked).
        """
        with self._forget_lock:
            forgotten, self._forgotten = self._forgotten, {}
        for session in forgotten:
            self.cache.forget(session)  # again: a spill racing the reset may have written it since
        for slot in self.slots:
            if slot.session_id in forgotten:
                slot.session_id, slot.savable, slot.opening = None, False, []
        return forgotten

    def persist(self) -> None:
        """Shutdown: write every state, RAM cache and slots alike, to disk (oldest first)."""
        cache = self.cache
        if cache.disk is None:
            return
        self.apply_forgets()
        entries = cache.drain()
        for slot in sorted(self.slots, key=lambda s: s.last_used):
            if slot.savable and len(slot.cached) >= MIN_SAVED_TOKENS:
                buf = self.kv.state(slot.id)
                if buf is not None:
                    entries.append(cache.entry(list(slot.cached), buf, slot.scope, slot.session_id))
        cache.persist(entries)

    def restore(self, slot: Slot, found: Found | None, prompt: Sequence[int], keep: int) -> bool:
        """Put the saved state sharing the longest prefix with the prompt into the slot, if it beats `keep`.

        A state the prompt uses whole leaves the cache (the slot holds it now, and saves it again,
        longer, when it is next taken); one the prompt shares only part of stays for its own
        conversation, and the slot keeps a trimmed copy.
        """
        # Found before save ran: the slot's own state shares at most `keep` tokens, so it cannot beat
        # the found one, and an entry that moved to disk since is read from there by its key.
        if found is None or min(found.common, len(prompt) - 1) <= keep:
            return False
        buf = self.cache.read(found, take=found.common >= len(found.tokens))
        if buf is None:
            return False
        loaded = self.load(slot, list(found.tokens), buf)  # a copy of the tokens: the entry may stay cached
        if loaded:
            self.stats[f"restored_bytes_{self.cache.taken_from}"] += len(buf)
        return loaded

    def copy_prefix(self, slot: Slot, prompt: Sequence[int], scope: str, keep: int) -> bool:
        """Share another slot's KV with this one when it holds at least MIN_COPIED_TOKENS more of the prompt.

        The other slot keeps its cache (a conversation sharing only a system prompt evicts nobody),
        and this one starts from the shared prefix instead of prefilling it. In the unified pool the
        prefix's cells are shared by both sequences (llama_memory_seq_cp), not copied. The source may
        be mid-generation: between steps its `cached` matches its KV exactly (invariant 2).
        """
        best, common = None, keep
        for other in self.slots:
            if other is not slot and other.scope == scope:
                c = min(common_prefix(other.cached, prompt), len(prompt) - 1)
                if c > common:
                    best, common = other, c
        if best is None or common - keep < MIN_COPIED_TOKENS:
            return False
        self.kv.share(best, slot, common)
        return True
