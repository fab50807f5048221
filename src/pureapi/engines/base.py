"""The engine interface: `generate(request) -> Iterator[Chunk]` plus tokenization and info.

An engine owns its model and the worker thread(s) that touch it; request threads only enqueue
work and read chunks back. Cancelling is closing the iterator: the worker sees the request's
`cancel` event at its next token and stops.
"""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import NotReady
from ..tools import ToolFormat
from ..types import Chunk, GenerationRequest, Message, Prompt
from .jobs import Job
from .shell import Backend, EngineShell, OneAtATime

log = logging.getLogger(__name__)


def model_fingerprint(model_path: Path, *extra: object) -> str:
    """A folder name for one model file (name, size, mtime) and the settings that shape what is cached."""
    st = model_path.stat()
    key = repr((model_path.name, st.st_size, st.st_mtime_ns, *extra))
    return f"{model_path.stem[:40]}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def system_fingerprint(*parts: object) -> str:
    """OpenAI's system_fingerprint: a short, stable id of the model file and the build that serves it."""
    return "fp_" + hashlib.sha256(repr(parts).encode()).hexdigest()[:10]


class Engine(ABC):
    """What the API layer needs from a model backend."""

    name: str = "engine"
    model_name: str = ""
    # Changes when the model file or the backend's version does (sent as system_fingerprint); None: unknown.
    system_fingerprint: str | None = None
    device: str = "cpu"
    context_length: int = 2048
    slots: int = 1  # generations that run at the same time
    # Raw prompts (text without the chat template, or token ids) for /v1/completions; an engine that
    # only forwards chat messages (the remote one) cannot take them.
    raw_prompts: bool = True
    vocab_size: int | None = None  # token ids at or above it are refused; None: not checked
    # The tool-call format the chat template speaks; None: it cannot render tools.
    tool_format: ToolFormat | None = None

    @abstractmethod
    def encode_chat(
        self, messages: Sequence[Message], tools: list[dict[str, Any]] | None = None, prefix: str = ""
    ) -> Prompt:
        """Render the chat template (with the tools the model may call) and tokenize; message content is
        never parsed for special tokens. prefix is template text put after the generation prompt, as the
        start of the reply (a forced tool call's opening tag). An engine that renders its own template
        (remote, vLLM) returns a ChatPrompt instead: the messages and their token count."""

    def tools_refusal(self) -> str:
        """Why this engine cannot take tools (asked only when tool_format is None)."""
        return f"the model {self.model_name} has a chat template without tool support (it never renders `tools`)"

    def encode_text(self, text: str) -> list[int]:
        """Tokenize a raw prompt as the model's tokenizer does by default (BOS where it adds one, special
        tokens parsed: the caller writes the whole prompt, template included); engines with raw_prompts."""
        raise NotImplementedError(f"the {self.name} engine takes chat messages only")

    @abstractmethod
    def generate(self, request: GenerationRequest) -> Iterator[Chunk]:
        """Start generating; raises Overloaded at once when the queue is full."""

    @abstractmethod
    def memory_allocated(self) -> int:
        """Bytes the model occupies (CUDA: torch.cuda.memory_allocated)."""

    def ready(self) -> bool:
        """True once the model answers."""
        return True

    def info(self) -> dict[str, Any]:
        """Static facts about the loaded model."""
        return {
            "engine": self.name,
            "model": self.model_name,
            "device": self.device,
            "context_length": self.context_length,
        }

    def metrics(self) -> dict[str, float]:
        """Counters and gauges for /metrics (pureapi_engine_<key>; a key ending in _total is a counter)."""
        return {}

    def forget(self, session_id: str) -> None:
        """Drop whatever the engine keeps for a session (a reset); engines that keep nothing do nothing."""

    def close(self) -> None:
        """Stop workers and free the model."""


class QueuedEngine(Engine):
    """An engine whose model is driven by the engine shell's worker (shell.py), which owns the job lifecycle.

    By default the backend runs one whole generation at a time (`OneAtATime` over `_run`); an engine that
    batches starts the shell with a backend of its own.
    """

    def __init__(self, max_queue: int = 64):
        self._max_queue = max_queue
        self._shell: EngineShell | None = None

    def start(self, backend: Backend | None = None) -> None:
        """Start the shell's worker over `backend` (default: `_run`, one job at a time), once the model is loaded."""
        self._shell = EngineShell(backend or OneAtATime(self._run), self._max_queue, self.name, self.slots).start()

    def ready(self) -> bool:
        return self._shell is not None and self._shell.ready()

    def generate(self, request: GenerationRequest) -> Iterator[Chunk]:
        if self._shell is None or not self.ready():  # an engine's own readiness too (the batch's manager alive)
            raise NotReady("the model is not loaded")
        return self._shell.submit(request)

    def queued(self) -> int:
        """Jobs waiting for the worker to take them."""
        return len(self._shell.jobs) if self._shell is not None else 0

    @abstractmethod
    def _run(self, job: Job) -> None:
        """Generate for one job on the worker thread, calling job.emit/finish; return early once it is cancelled."""

    def close(self) -> None:
        if self._shell is not None and not self._shell.close(timeout=10):
            log.warning("the %s engine's worker did not stop in time", self.name)
