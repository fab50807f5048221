"""The vLLM engine's shell backend without vLLM: a scripted AsyncLLM (its generate/abort, outputs in the shape
of vLLM's RequestOutput) on a real event loop, under the engine shell. tests/engines/test_vllm_adapter.py
checks the same against vLLM's own types where vLLM is installed; tests/vllm/ runs the real one."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from pureapi.engines.shell import EngineShell
from pureapi.engines.vllm import Forwarded
from pureapi.errors import Cancelled, EngineError, Overloaded
from pureapi.types import Chunk, GenerationRequest, SamplingParams


class ScriptedLLM:
    """One word per `step` seconds until aborted or done; a prompt starting with 0 fails after its first word."""

    def __init__(self, words: int, step: float = 0.005):
        self.words, self.step = words, step
        self.started: list[str] = []  # request ids, in the order vLLM got them
        self.aborted: list[str] = []
        self.shut = False

    async def generate(self, prompt: dict[str, Any], params: Any, request_id: str) -> AsyncIterator[Any]:
        self.started.append(request_id)
        for i in range(self.words):
            await asyncio.sleep(self.step)
            if request_id in self.aborted:
                return
            if i == 1 and prompt["prompt_token_ids"][0] == 0:
                raise RuntimeError("the engine core died")
            last = i == self.words - 1
            piece = SimpleNamespace(text=f"w{i} ", token_ids=[100 + i], logprobs=None, finish_reason="length")
            yield SimpleNamespace(outputs=[piece], finished=last, num_cached_tokens=2)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self) -> None:
        self.shut = True


def shell_on(llm: ScriptedLLM, slots: int = 2, max_queue: int = 8) -> EngineShell:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    return EngineShell(Forwarded(llm, loop, thread, slots, params=lambda p: p), max_queue, "vllm", slots).start()


def request(first: int = 1) -> GenerationRequest:
    return GenerationRequest([first, 2, 3, 4], SamplingParams(max_tokens=100))


def text(stream: Iterator[Chunk]) -> str:
    return "".join(c.text for c in stream)


def test_outputs_become_chunks_with_vllms_counts() -> None:
    shell = shell_on(ScriptedLLM(3))
    try:
        chunks = list(shell.submit(request()))
        assert [c.text for c in chunks] == ["w0 ", "w1 ", "w2 ", ""]
        last = chunks[-1]
        assert (last.finish_reason, last.prompt_tokens, last.completion_tokens, last.cached_tokens) == (
            "length",
            4,
            3,
            2,
        )
    finally:
        shell.close()


def test_a_failed_request_fails_alone_and_others_go_on() -> None:
    shell = shell_on(ScriptedLLM(20))
    try:
        broken, fine = shell.submit(request(first=0)), shell.submit(request())
        with pytest.raises(EngineError, match="the engine core died"):
            text(broken)
        assert text(fine) == "".join(f"w{i} " for i in range(20))
    finally:
        shell.close()


def test_at_most_slots_requests_are_in_vllm_and_a_cancel_before_admission_never_reaches_it() -> None:
    llm = ScriptedLLM(2000)
    shell = shell_on(llm, slots=1, max_queue=1)
    try:
        running = shell.submit(request())
        next(running)
        waiting_requests = [request(), request()]
        waiting = [shell.submit(r) for r in waiting_requests]
        with pytest.raises(Overloaded):
            shell.submit(request())  # one in vLLM, max_queue + slots waiting: the shell's bound holds
        for r in waiting_requests:
            r.cancel.set()
        running.close()  # type: ignore[attr-defined]
        for stream in waiting:
            with pytest.raises(Cancelled, match="before it started"):
                text(stream)
        deadline = time.monotonic() + 5
        while not llm.aborted and time.monotonic() < deadline:
            time.sleep(0.01)
        assert llm.started == ["pureapi-1"] and llm.aborted == ["pureapi-1"]  # the closed stream was aborted
    finally:
        shell.close()


def test_close_ends_every_stream_and_shuts_vllm_down() -> None:
    llm = ScriptedLLM(2000)
    shell = shell_on(llm, slots=1)
    running, queued = shell.submit(request()), shell.submit(request())
    next(running)
    assert shell.close()
    for stream in (running, queued):
        with pytest.raises(Cancelled, match="server shutting down"):
            text(stream)
    assert llm.started == ["pureapi-1"] and llm.shut
