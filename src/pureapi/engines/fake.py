"""A scripted engine for fast tests (simonw/llm's MockModel idea): replies are queued by the test."""

from __future__ import annotations

import collections
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..errors import EngineError
from ..tools import HERMES
from ..types import Message, SamplingParams, TokenLogprob, TopLogprob
from ._template import continues
from .base import QueuedEngine, system_fingerprint
from .jobs import Job

_WORD = re.compile(r"\S+\s*|\s+")


class FakeEngine(QueuedEngine):
    """Replies with queued texts, word by word; with none queued it echoes the last user message.

    One "token" is one word, so counts and context limits are easy to reason about in tests.
    """

    name = "fake"

    def __init__(self, context_length: int = 4096, token_delay: float = 0.0, max_queue: int = 64):
        super().__init__(max_queue=max_queue)
        self.model_name = "fake-model"
        self.system_fingerprint = system_fingerprint("fake-model", "fake")
        self.device = "cpu"
        self.context_length = context_length
        self.token_delay = token_delay
        # Guards the script, which tests fill from their own thread while the worker consumes it.
        self._script_lock = threading.Lock()
        self._script: collections.deque[str | BaseException] = collections.deque()
        self.prompts: list[list[Message]] = []
        self.texts: list[str] = []  # raw prompts encoded by encode_text, in order
        self.params: list[SamplingParams] = []  # each generation's sampling parameters, in order
        self.tools: list[list[dict[str, Any]] | None] = []  # the tools each encode_chat rendered, in order
        self.prefixes: list[str] = []  # the reply prefix each encode_chat added, in order
        self.generated: list[int] = []  # the tokens each generation emitted, appended as it ends (cancelled too)
        self.tool_format = HERMES  # tests of a model without tool support set None
        self._vocab: dict[str, int] = {}
        self._words: dict[int, str] = {}
        self.start()

    def enqueue(self, *replies: str | BaseException) -> None:
        """Queue replies (or an exception to raise mid-reply) for the next generations."""
        with self._script_lock:
            self._script.extend(replies)

    def _id(self, word: str) -> int:
        if word not in self._vocab:
            self._vocab[word] = len(self._vocab) + 1
            self._words[self._vocab[word]] = word
        return self._vocab[word]

    def encode_chat(
        self, messages: Sequence[Message], tools: list[dict[str, Any]] | None = None, prefix: str = ""
    ) -> list[int]:
        ids: list[int] = []
        for m in messages:
            ids.append(self._id(f"<{m.role}>"))
            ids.extend(self._id(w) for w in _WORD.findall(m.content))
        if not continues(messages):  # a final assistant message goes on; else a new reply starts
            ids.append(self._id("<assistant>"))
        ids.extend(self._id(w) for w in _WORD.findall(prefix))
        self.prompts.append(list(messages))
        self.tools.append(tools)
        self.prefixes.append(prefix)
        return ids

    def encode_text(self, text: str) -> list[int]:
        self.texts.append(text)
        return [self._id(w) for w in _WORD.findall(text)]

    def memory_allocated(self) -> int:
        return 0

    def _run(self, job: Job) -> None:
        self.params.append(job.request.params)
        with self._script_lock:
            item = self._script.popleft() if self._script else None
        if item is None:
            words = [self._words.get(i, "") for i in job.request.prompt_ids]
            if "<user>" in words:
                last_user = max(k for k, w in enumerate(words) if w == "<user>")
                words = words[last_user + 1 : -1]
            item = "You said: " + "".join(w for w in words if not w.startswith("<"))
        failure = item if isinstance(item, BaseException) else None
        text = "partial reply " if failure else str(item)
        count = 0
        try:
            for word in _WORD.findall(text):
                if job.request.cancel.is_set():
                    return
                if count >= job.request.params.max_tokens:
                    job.finish("length", count)
                    return
                if self.token_delay:
                    time.sleep(self.token_delay)
                count += 1
                job.emit(word, count, _logprobs(word, job.request.params.logprobs))
        finally:
            self.generated.append(count)
        if failure is not None:
            raise EngineError(f"scripted failure: {failure}")
        job.finish("stop", count)


def _logprobs(word: str, top: int | None) -> list[TokenLogprob] | None:
    """Made-up logprobs in the real shape: the word is the likeliest, then `top - 1` alternatives."""
    if top is None:
        return None
    data = word.encode()
    others = [TopLogprob(f"alt{i}", -1.0 - i, f"alt{i}".encode()) for i in range(1, top)]
    alternatives = [TopLogprob(word, -0.25, data), *others]
    return [TokenLogprob(word, -0.25, data, alternatives[:top])]
