"""What one llama_decode holds: the plan (which tokens of which slots) and the llama_batch it fills."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .slots import Slot


@dataclass
class Row:
    """One slot's tokens in a step: a decode token, or a chunk of its prompt."""

    slot: Slot
    tokens: list[int]
    prefill: bool
    logits: bool  # logits for the last token (a decode token, or the prompt's last one)


def plan_step(active: Sequence[Slot], n_batch: int) -> list[Row]:
    """A token per generating slot, then prompt chunks in admission order, at most n_batch tokens in all.

    In sequence order: llama.cpp splits a batch into one ubatch per run of consecutive sequence ids,
    taken in batch order. Each slot gets at most one output (invariant 4 of the scheduler).
    """
    work: dict[int, Row] = {}
    for slot in active:
        if slot.next_token is not None:
            work[slot.id] = Row(slot, [slot.next_token], prefill=False, logits=True)
    budget = n_batch - len(work)
    for slot in sorted((s for s in active if s.pending), key=lambda s: s.admitted):
        if budget <= 0:
            break
        tokens = slot.pending[:budget]
        work[slot.id] = Row(slot, tokens, prefill=True, logits=len(tokens) == len(slot.pending))
        budget -= len(tokens)
    return [work[seq] for seq in sorted(work)]


class Batch:
    """A llama_batch of n_batch rows (one sequence id each), filled afresh for every decode."""

    def __init__(self, llc: Any, n_batch: int):
        self._llc = llc
        self.capacity = n_batch
        self.ptr = llc.llama_batch_init(n_batch, 0, 1)
        self.n_tokens = 0

    def clear(self) -> None:
        """Start filling from row 0."""
        self.n_tokens = 0

    def add(self, slot: Slot, tokens: Sequence[int], logits_last: bool) -> int:
        """Put tokens of the slot's sequence after its cached ones; returns the row of the last one."""
        batch, base, n = self.ptr, len(slot.cached), self.n_tokens
        for j, tok in enumerate(tokens):
            batch.token[n] = tok
            batch.pos[n] = base + j
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = slot.id
            batch.logits[n] = logits_last and j == len(tokens) - 1
            n += 1
        self.n_tokens = n
        return n - 1

    def decode(self, ctx: Any) -> int:
        """llama_decode the rows filled so far; llama.cpp's return code (0: done)."""
        self.ptr.n_tokens = self.n_tokens
        return int(self._llc.llama_decode(ctx, self.ptr))

    def free(self) -> None:
        """Release the batch's buffers."""
        self._llc.llama_batch_free(self.ptr)
