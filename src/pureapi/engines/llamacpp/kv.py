"""The slots' KV sequences in one llama context: copy out, load in, trim, wipe and share (ctypes calls only).

Each method keeps the engine's invariant 2 for the slots it touches: `slot.cached` lists exactly the
tokens whose KV sequence `slot.id` holds. Called only from the scheduler thread.
"""

from __future__ import annotations

import ctypes
import logging
from typing import TYPE_CHECKING, Any

from .batch import Batch
from .slots import Slot

if TYPE_CHECKING:
    from .prompt_cache import State

log = logging.getLogger(__name__)


class SequenceKV:
    """The KV operations on a context's sequences, behind one small interface the scheduler can be tested with."""

    def __init__(self, llc: Any, ctx: Any):
        self._llc = llc
        self._ctx = ctx
        self._mem = llc.llama_get_memory(ctx)
        self.cells = int(llc.llama_n_ctx(ctx))  # of the pool all sequences share

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
            # Expected when the shared pool is full: the caller frees cells and retries, or prefills.
            log.info("llama.cpp could not restore a sequence state into sequence %d", slot.id)
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

    def share(self, src: Slot, dst: Slot, n: int) -> None:
        """Make dst's sequence the first n tokens of src's: the pool's cells are shared by both, not copied,
        and either may then go on (or be trimmed) on its own."""
        self.wipe(dst)
        self._llc.llama_memory_seq_cp(self._mem, src.id, dst.id, 0, n)
        dst.cached = list(src.cached[:n])

    def reshare(self, src: Slot, dst: Slot, n: int) -> bool:
        """dst holds the first n tokens of src in cells of its own: share src's cells instead, freeing dst's.
        False (nothing changed) when llama.cpp cannot cut a sequence's prefix."""
        if not self._llc.llama_memory_seq_rm(self._mem, dst.id, 0, n):
            return False
        self._llc.llama_memory_seq_cp(self._mem, src.id, dst.id, 0, n)
        return True

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
            if rc == 1:  # no cells free in the pool: nothing was decoded, the slots keep their KV
                slot.opening = []
                continue
            if rc != 0:
                self.wipe(slot)  # a failed decode leaves no partial sequence behind
                continue
            slot.cached.extend(slot.opening)
            decoded += len(slot.opening)
            slot.opening = []
        return decoded
