"""The slots' shared KV pool when it runs out of cells: evict idle slots' KV, park running ones, resume them.

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
window is never larger than the pool. Called only from the scheduler thread (engine invariant 1).
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
from .slots import Slot

if TYPE_CHECKING:
    from .prompt_cache import State

log = logging.getLogger(__name__)


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

    def fit(self, decode: Callable[[], int], running: Callable[[], list[Slot]]) -> int:
        """Call `decode` (which plans from `running()`) until the pool has cells for it: evict idle KV,
        then park running generations. llama.cpp's return code of the last call."""
        while (rc := decode()) == 1:  # 1: no KV cells for the batch; nothing was decoded
            if not self.reuse.evict_idle() and not self.park(running()):
                return rc  # one generation alone does not fit: cannot happen while window <= pool
        return rc
