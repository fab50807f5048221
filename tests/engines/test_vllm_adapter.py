"""The vLLM engine's bridge with vLLM's own types: sampling parameters, output mapping and cancellation.

vLLM is not installed in the project's venv (it pins its own torch), so these skip there; `make test-vllm`
runs them in vLLM's venv. The AsyncLLM here is scripted (vLLM's RequestOutput objects on a real event
loop); tests/vllm/test_engine.py runs the real one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pureapi.errors import Cancelled
from pureapi.structured import JSON_OBJECT
from pureapi.types import GenerationRequest, SamplingParams

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here (its own venv: make test-vllm)")

from vllm.outputs import CompletionOutput, RequestOutput  # noqa: E402
from vllm.sampling_params import RequestOutputKind  # noqa: E402

from pureapi.engines.vllm import VLLMEngine, sampling_params  # noqa: E402


def test_sampling_parameters_map_onto_vllms() -> None:
    ours = SamplingParams(
        max_tokens=7, temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, repeat_penalty=1.1,
        presence_penalty=0.3, frequency_penalty=0.2, seed=11, logprobs=3,
        json_schema={"type": "object", "properties": {"a": {"type": "integer"}}},
    )  # fmt: skip
    theirs = sampling_params(ours)
    assert (theirs.max_tokens, theirs.temperature, theirs.top_p, theirs.top_k, theirs.min_p) == (7, 0.5, 0.9, 40, 0.05)
    assert (theirs.repetition_penalty, theirs.presence_penalty, theirs.frequency_penalty) == (1.1, 0.3, 0.2)
    assert (theirs.seed, theirs.logprobs, theirs.output_kind) == (11, 3, RequestOutputKind.DELTA)
    assert theirs.structured_outputs.json == ours.json_schema
    assert not theirs.stop  # stop strings are cut by the session service, the same for every engine
    assert sampling_params(SamplingParams(json_schema=JSON_OBJECT)).structured_outputs.json_object is True
    assert sampling_params(SamplingParams(temperature=0)).temperature == 0  # greedy


class ScriptedLLM:
    """AsyncLLM's generate/abort on vLLM's output types: one token per step until aborted or done."""

    def __init__(self, words: list[str], step: float = 0.01):
        self.words, self.step = words, step
        self.aborted: list[str] = []
        self.running: set[str] = set()
        self.output_processor = self  # AsyncLLM's, asked for the requests it still holds

    def get_num_unfinished_requests(self) -> int:
        return len(self.running)

    async def generate(self, prompt: Any, params: Any, request_id: str) -> AsyncIterator[RequestOutput]:
        self.running.add(request_id)
        try:
            for i, word in enumerate(self.words):
                await asyncio.sleep(self.step)
                if request_id in self.aborted:
                    return
                last = i == len(self.words) - 1
                piece = CompletionOutput(0, word, [100 + i], None, None, finish_reason="length" if last else None)
                yield RequestOutput(
                    request_id, None, prompt["prompt_token_ids"], None, [piece], last, num_cached_tokens=2
                )
        finally:
            self.running.discard(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self) -> None:
        pass


class Tokenizer:
    chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

    def __len__(self) -> int:
        return 1000


def engine_on(llm: ScriptedLLM) -> VLLMEngine:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    return VLLMEngine(llm, Tokenizer(), loop, thread, model_name="m", context_length=64, slots=2, device="cpu")


def test_outputs_become_chunks_with_vllms_counts() -> None:
    engine = engine_on(ScriptedLLM(["a", "b", "c"]))
    chunks = list(engine.generate(GenerationRequest([1, 2, 3, 4], SamplingParams(max_tokens=3))))
    assert [c.text for c in chunks] == ["a", "b", "c", ""]
    last = chunks[-1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens, last.cached_tokens) == ("length", 4, 3, 2)
    engine.close()


def test_closing_the_stream_or_cancelling_aborts_the_request_in_vllm() -> None:
    llm = ScriptedLLM([f"w{i} " for i in range(2000)])  # 20 s at 10 ms a token
    engine = engine_on(llm)
    stream = engine.generate(GenerationRequest([1], SamplingParams(max_tokens=2000)))
    assert next(stream).text == "w0 "
    stream.close()  # type: ignore[attr-defined]
    request = GenerationRequest([1], SamplingParams(max_tokens=2000))
    other = engine.generate(request)
    next(other)
    request.cancel.set()  # a reset or shutdown, with the reader still there
    with pytest.raises(Cancelled):
        list(other)
    deadline = time.monotonic() + 5
    while llm.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert llm.aborted == ["pureapi-1", "pureapi-2"] and not llm.running
    assert engine.metrics() == {"running": 0.0, "aborts_total": 2}
    engine.close()
