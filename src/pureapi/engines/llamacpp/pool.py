"""The slots' shared KV pool: when it runs out of cells, evict idle slots' KV, park running ones, resume
them; when generating side by side has scattered the slots' cells, lay each slot's KV out in one run again.

All slots draw KV cells from one pool (llama.cpp's unified KV cache), so more slots cost no memory
until their conversations together outgrow it. Then, in this order:
1. An idle slot's KV (kept as cache for its conversation's next turn) is saved to the prompt cache
   and wiped, least recently used first, as llama-server does with idle slots.
2. A running generation is parked: its sequence state is copied out to RAM and its cells freed; it
   keeps its slot, sampler and stream, and no new job is admitted while any is parked. The most
   recently admitted one goes first (vLLM preempts in the same order), so the oldest finish first.
3. Once a generation has ended, parked ones are put back, oldest first, and go on where they were.

llama-server instead fails every running request with "Context size has been exceeded" when its
unified pool is full; a parked generation here only waits. One conversation always fits alone: its
window is never larger than the pool.

llama.cpp gives a step's tokens the next free cells in batch order, so slots that generate together
interleave their KV cell by cell, and each token's attention then finds its own conversation's keys
one cell in N. `KVPool.compact` copies every slot's KV out and back into the emptied pool, which puts
each in one run of cells. Called only from the scheduler thread (engine invariant 1).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import EngineError
from .kv import SequenceKV
from .reuse import KVReuse
from .slots import MIN_COPIED_TOKENS, Slot, common_prefix

if TYPE_CHECKING:
    from .prompt_cache import State

log = logging.getLogger(__name__)

# The pool is compacted once the tokens decoded side by side since the last compaction reach this share
# of the tokens the slots hold, and at least COMPACT_MIN_TOKENS. A compaction copies every held token
# out and back (about 16 us a token of SmolLM2), so a smaller share costs more copies but leaves less
# KV interleaved; 0.15 beat 0.5 in every paired round on 512-token replies, 1.03-1.08x (docs/design.md).
COMPACT_SHARE = 0.15
COMPACT_MIN_TOKENS = 128


@dataclass
class Parked:
    """A running generation's KV, copied out of the pool while it waits for cells."""

    tokens: list[int]  # what slot.cached was
    state: State | None  # None when it held no KV yet (still prefilling its first chunk)


@dataclass
class Preempted:
    """A generation set aside to free its slot for another tenant (shell invariant 5): its KV, copied out
    of the pool, and what its slot held of its progress, put back into whichever slot it gets next."""

    parked: Parked
    admitted: int  # its first admission's order (the pool parks the newest first)
    pending: list[int]  # prompt tokens not yet prefilled
    next_token: int | None  # sampled and emitted, not yet decoded
    generated: int
    sampler: Any  # its chain, with its state (seeded RNG, penalties, grammar) as it was
    decoder: Any  # holds back an incomplete UTF-8 character

    def free(self) -> None:
        """It will not come back: free its sampler (llama.cpp memory)."""
        if self.sampler is not None:
            self.sampler.free()
            self.sampler = None


class KVPool:
    """Makes room in the shared pool and keeps the generations it had to set aside."""

    def __init__(self, kv: SequenceKV, reuse: KVReuse, slots: list[Slot], stats: Counter[str]):
        self.kv = kv
        self.reuse = reuse
        self.slots = slots  # the engine's list
        self.stats = stats
        self.parked: dict[int, Parked] = {}  # id(slot) -> its KV (a slot's sequence id may be reused)
        self._ended = False  # a generation ended since the last resume attempt: cells may be free
        self._scattered = 0  # tokens decoded side by side since the last compaction

    def any_parked(self) -> bool:
        """Whether a running generation waits for cells (then nothing new is admitted)."""
        return bool(self.parked)

    def is_parked(self, slot: Slot) -> bool:
        """Whether the slot's generation is set aside, out of the step plan."""
        return id(slot) in self.parked

    def released(self, slot: Slot) -> None:
        """The slot's job ended (finished, failed or cancelled): drop what was parked for it."""
        self.parked.pop(id(slot), None)
        self._ended = True

    def park(self, running: list[Slot]) -> bool:
        """Set aside the most recently admitted of the running slots; False when only one runs."""
        if len(running) < 2:
            return False
        slot = max(running, key=lambda s: s.admitted)
        held = self.copy_out(slot)
        if held is None:
            raise EngineError("the KV pool is full and llama.cpp could not copy a generation's state out of it")
        log.info("KV pool full: parked slot %d (%d tokens) until a generation ends", slot.id, len(held.tokens))
        self.parked[id(slot)] = held
        self.stats["parked_jobs"] += 1
        return True

    def copy_out(self, slot: Slot) -> Parked | None:
        """Copy the slot's KV out of the pool and free its cells; None (nothing changed) if llama.cpp
        cannot give its state."""
        state = self.kv.state(slot.id) if slot.cached else None
        if slot.cached and state is None:
            return None
        held = Parked(list(slot.cached), state)
        self.kv.wipe(slot)
        return held

    def hold(self, slot: Slot, parked: Parked) -> None:
        """A generation admitted again (after a preemption) whose KV finds no room: it waits as a parked one."""
        self.parked[id(slot)] = parked
        self.stats["parked_jobs"] += 1

    def resume(self) -> None:
        """Put parked generations back, oldest first, while the pool has room (evicting idle slots for it)."""
        if not self.parked or not self._ended:
            return
        self._ended = False
        for slot in sorted((s for s in self.slots if id(s) in self.parked), key=lambda s: s.admitted):
            held = self.parked[id(slot)]
            if held.state is not None and not self.reuse.load(slot, list(held.tokens), held.state):
                return  # the rest wait for the next generation to end
            del self.parked[id(slot)]
            self.stats["resumed_jobs"] += 1

    def decoded_side_by_side(self, tokens: int) -> None:
        """A step decoded `tokens` generating slots' tokens beside other rows: each went into a cell next
        to another slot's, away from the rest of its own KV."""
        self._scattered += tokens

    def compact(self) -> bool:
        """Lay every slot's KV out in one run of cells, once enough of it is scattered; True if it did.

        Each sequence's state is copied out, then all are loaded back into the emptied pool, one after
        another: the same KV at the same positions, `cached` unchanged (invariant 2), turn openings
        kept. A prefix two slots of one scope hold is shared again, as `KVReuse.copy_prefix` shares it.
        Not while a generation is parked, nor when the slots' tokens, a shared prefix counted for each,
        could not all fit the pool; if a state cannot be copied out, nothing changes. A state that does
        not load back (not expected) waits as a parked generation, or in the prompt cache for an idle slot.
        """
        held = [s for s in self.slots if s.cached]
        total = sum(len(s.cached) for s in held)
        if self.parked or self._scattered < max(COMPACT_MIN_TOKENS, COMPACT_SHARE * total):
            return False
        self._scattered = 0
        if total > self.kv.cells:
            return False
        states = []
        for slot in held:
            state = self.kv.state(slot.id)
            if state is None:
                return False
            states.append((slot, list(slot.cached), slot.opening, state))
        for slot in held:
            self.kv.wipe(slot)
        loaded: list[Slot] = []
        for slot, tokens, opening, state in states:
            if not self.kv.load(slot, tokens, state):  # not expected: the pool has room for them all
                log.warning("compacting the KV pool: slot %d's state did not load back", slot.id)
                if slot.job is not None:
                    self.hold(slot, Parked(tokens, state))  # it waits for cells, as a parked generation
                    self._ended = True
                else:
                    self.reuse.keep(slot, tokens, state)  # its conversation's next turn restores it from there
                continue
            slot.opening = opening
            self._reshare(slot, loaded)
            loaded.append(slot)
        self.stats["compactions"] += 1
        self.stats["compacted_tokens"] += total
        return True

    def _reshare(self, slot: Slot, loaded: list[Slot]) -> None:
        """Share the longest prefix (of MIN_COPIED_TOKENS or more) the slot has with a loaded slot of its scope."""
        best, common = None, 0
        for other in loaded:
            if other.scope == slot.scope and (c := common_prefix(other.cached, slot.cached)) > common:
                best, common = other, c
        if best is not None and common >= MIN_COPIED_TOKENS:
            self.kv.reshare(best, slot, common)

    def fit(self, decode: Callable[[], int], running: Callable[[], list[Slot]]) -> int:
        """Call `decode` (which plans from `running()`) until the pool has cells for it: evict idle KV,
        then park running generations. llama.cpp's return code of the last call."""
        while (rc := decode()) == 1:  # 1: no KV cells for the batch; nothing was decoded
            if not self.reuse.evict_idle() and not self.park(running()):
                return rc  # one generation alone does not fit: cannot happen while window <= pool
        return rc
