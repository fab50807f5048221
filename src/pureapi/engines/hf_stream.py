"""Token ids to text deltas for the transformers engine: a streamer for `generate` and for the batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..types import TokenLogprob
from .jobs import Job


class Streamer:
    """Receives token ids from `generate` and emits text deltas as soon as they are whole characters."""

    def __init__(
        self, tokenizer: Any, job: Job, end_ids: set[int], logprob_of: Callable[[int], TokenLogprob] | None = None
    ):
        self.tokenizer = tokenizer
        self.job = job
        self.end_ids = end_ids
        self.logprob_of = logprob_of
        self.logprobs: list[TokenLogprob] = []  # of the tokens not yet emitted
        self.ids: list[int] = []
        self.prefix = 0  # decoding restarts here, so each step decodes a short window
        self.read = 0  # ids up to here have been emitted
        self.count = 0
        self.ended = False
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate first hands us the prompt
            self._prompt_seen = True
            return
        self.feed(value.reshape(-1).tolist())

    def feed(self, tokens: list[int]) -> None:
        """Take newly generated token ids (what the batch manager hands over)."""
        for tok in tokens:
            if self.ended:
                return
            if tok in self.end_ids:
                self.ended = True
                return
            self.count += 1
            self.ids.append(tok)
            if self.logprob_of is not None:
                self.logprobs.append(self.logprob_of(tok))
            self._emit_ready()

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _emit_ready(self) -> None:
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.job.emit(after[len(before) :], self.count, self._take_logprobs())
            self.prefix, self.read = self.read, len(self.ids)

    def _take_logprobs(self) -> list[TokenLogprob] | None:
        taken, self.logprobs = self.logprobs, []
        return taken or None

    def flush(self) -> None:
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.job.emit(after[len(before) :] if len(after) > len(before) else "", self.count, self._take_logprobs())
        self.read = len(self.ids)

    def end(self) -> None:
        """Called by generate when it stops."""
