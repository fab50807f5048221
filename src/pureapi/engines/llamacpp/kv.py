"""The slots' KV sequences in one llama context: copy out, load in, trim, wipe and move (ctypes calls only).

Each method keeps the engine's invariant 2 for the slots it touches: `slot.cached` lists exactly the
tokens whose KV sequence `slot.id` holds. Called only from the scheduler thread.
"""

from __future__ import annotations

import ctypes
import logging
from typing import TYPE_CHECKING, Any

from .batch import Batch
from .slots import Slot, compaction_swap

if TYPE_CHECKING:
    from .prompt_cache import State

log = logging.getLogger(__name__)


class SequenceKV:
    """The KV operations on a context's sequences, behind one small interface the scheduler can be tested with."""

    def __init__(self, llc: Any, ctx: Any):
        self._llc = llc
        self._ctx = ctx
        self._mem = llc.llama_get_memory(ctx)

    def state(self, seq: int) -> State | None:
        """A copy of one sequence's KV state (its used cells only), or None if llama.cpp cannot give it."""
        llc = self._llc
        size = int(llc.llama_state_seq_get_size(self._ctx, seq))
        if size <= 0:
            return None
        buf = (ctypes.c_uint8 * size)()
        if llc.llama_state_seq_get_data(self._ctx, buf, size, seq) != size:
            log.warning("llama.cpp could not copy sequence %d's state", seq)
            return None
        return buf

    def load(self, slot: Slot, tokens: list[int], buf: State) -> bool:
        """Replace the slot's sequence with a saved state of `tokens`; on failure the slot is left empty."""
        self.wipe(slot)  # a state is restored into an empty sequence
        if self._llc.llama_state_seq_set_data(self._ctx, buf, len(buf), slot.id) == 0:
            log.warning("llama.cpp could not restore a sequence state into sequence %d; prefilling", slot.id)
            self.wipe(slot)  # a failed restore may leave part of the state behind
            return False
        slot.cached = tokens  # exactly the tokens whose KV was saved
        return True

    def trim(self, slot: Slot, keep: int) -> int:
        """Keep the slot's first `keep` tokens of KV; how many it keeps (0 if llama.cpp could not cut there)."""
        if keep < len(slot.cached) and not self._llc.llama_memory_seq_rm(self._mem, slot.id, keep, -1):
            self.wipe(slot)  # a partial removal can fail (recurrent models); a whole one cannot
            keep = 0
        del slot.cached[keep:]
        return keep

    def wipe(self, slot: Slot) -> None:
        """Empty the slot's sequence."""
        self._llc.llama_memory_seq_rm(self._mem, slot.id, -1, -1)
        slot.cached.clear()
        slot.opening = []

    def swap(self, x: Slot, y: Slot, slots: list[Slot]) -> list[Slot] | None:
        """Exchange two slots' sequences: each KV state is copied to the other's id, and the ids swapped
        (`slots` is re-sorted by id). None if nothing moved; else the slots whose state could not be
        moved back in, wiped.

        Everything else a slot holds (its job, tokens, sampler, session) stays with its object, so
        neither slot loses its cache and a generation goes on unchanged.
        """
        states = [self.state(s.id) if s.cached else None for s in (x, y)]
        if any(s.cached and state is None for s, state in zip((x, y), states, strict=True)):
            return None
        for s in (x, y):
            self._llc.llama_memory_seq_rm(self._mem, s.id, -1, -1)
        x.id, y.id = y.id, x.id
        slots.sort(key=lambda s: s.id)
        lost = []
        for s, state in zip((x, y), states, strict=True):
            if state is not None and self._llc.llama_state_seq_set_data(self._ctx, state, len(state), s.id) == 0:
                log.warning("llama.cpp could not move a sequence state into sequence %d", s.id)
                self.wipe(s)
                lost.append(s)
        return lost

    def compact(self, slots: list[Slot]) -> tuple[int, list[Slot]]:
        """Move active slots into the free ones between them: with one KV stream per sequence, llama.cpp
        splits a batch into one ubatch per run of consecutive sequence ids, and each ubatch is a pass over
        all the weights. How many swaps were made, and the slots whose KV was lost on the way (wiped)."""
        moved, lost = 0, []
        while (pair := compaction_swap(slots)) is not None:
            failed = self.swap(*pair, slots)
            if failed is None:
                break
            moved += 1
            lost += failed
        return moved, lost

    def decode_openings(self, batch: Batch, slots: list[Slot]) -> int:
        """Decode the free slots' waiting turn openings in one batch, without logits; the tokens decoded."""
        batch.clear()
        taken: list[Slot] = []
        for slot in slots:
            if slot.opening and slot.job is None and batch.n_tokens + len(slot.opening) <= batch.capacity:
                batch.add(slot, slot.opening, logits_last=False)
                taken.append(slot)
        if not taken:
            return 0
        try:
            rc = batch.decode(self._ctx)
        except Exception:  # the scheduler must survive it: the slots are wiped below
            log.exception("llama_decode of turn openings failed")
            rc = -1
        else:
            if rc != 0:
                log.warning("llama_decode of turn openings failed (code %d)", rc)
        decoded = 0
        for slot in taken:
            if rc != 0:
                self.wipe(slot)  # a failed decode leaves no partial sequence behind
                continue
            slot.cached.extend(slot.opening)
            decoded += len(slot.opening)
            slot.opening = []
        return decoded
