"""The transformers engine's continuous batching on real weights: SmolLM2 (Llama) and Qwen2.5-Coder (Qwen2).

A batched engine (transformers' ContinuousBatchingManager, paged KV cache with prefix sharing) is
checked against the same weights run one generation at a time with `generate`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pureapi.engines.hf_batching import PAGE_SIZE, batchable
from pureapi.engines.transformers import TransformersEngine
from pureapi.errors import Overloaded, PureAPIError
from pureapi.models.resolve import ResolvedModel
from pureapi.settings import Settings
from pureapi.types import Chunk, GenerationRequest, Message, SamplingParams
from tests.races import race_generate_with_close

pytestmark = pytest.mark.real

# Where batched and solo greedy replies part, the float32 logits of the two tokens must be this close:
# a batch changes the order of float sums (the llama.cpp tests declare the same for their batches).
NEAR_TIE = 0.5


def load(gguf: Path, max_batch_size: int, max_queue: int = 64) -> TransformersEngine:
    return TransformersEngine.load(
        ResolvedModel(gguf.stem, gguf),
        device="cpu",
        cache_dir=Settings().weights_cache_dir(),
        max_queue=max_queue,
        max_batch_size=max_batch_size,
    )


@pytest.fixture(scope="module", params=["smollm2", "qwen"])
def gguf(request: pytest.FixtureRequest) -> Path:
    path: Path = request.getfixturevalue("smollm2_gguf" if request.param == "smollm2" else "qwen_gguf")
    return path


@pytest.fixture(scope="module")
def batched(gguf: Path) -> Iterator[TransformersEngine]:
    engine = load(gguf, max_batch_size=4)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def solo(gguf: Path) -> Iterator[TransformersEngine]:
    engine = load(gguf, max_batch_size=1)
    yield engine
    engine.close()


def collect(chunks: Iterator[Chunk]) -> tuple[str, Chunk]:
    parts = list(chunks)
    return "".join(c.text for c in parts), parts[-1]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


def tokens_of(engine: TransformersEngine, text: str) -> list[int]:
    return list(engine.tokenizer(text, add_special_tokens=False)["input_ids"])


def assert_same_or_near_tie(solo: TransformersEngine, ids: list[int], got: str, want: str) -> None:
    """Equal greedy replies, or a first divergence between two tokens the float32 model nearly ties."""
    if got == want:
        return
    import torch

    a, b = tokens_of(solo, got), tokens_of(solo, want)
    k = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    with torch.no_grad():
        logits = solo.model(torch.tensor([ids + b[:k]])).logits[0, -1]
    assert abs(float(logits[a[k]] - logits[b[k]])) < NEAR_TIE, (got, want)


def run_together(engine: TransformersEngine, requests: list[GenerationRequest]) -> list[tuple[str, Chunk]]:
    """Queue every request before reading any, then read them all at once."""
    streams = [engine.generate(r) for r in requests]
    results: list[Any] = [None] * len(streams)

    def read(i: int) -> None:
        results[i] = collect(streams[i])

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


def test_which_requests_the_batch_samples() -> None:
    assert batchable(SamplingParams(temperature=0.0))
    assert batchable(SamplingParams(temperature=0.8, top_p=0.9, top_k=40))
    for unbatchable in (
        {"seed": 1},
        {"min_p": 0.1},
        {"repeat_penalty": 1.2},
        {"presence_penalty": 0.5},
        {"frequency_penalty": 0.5},
        {"json_schema": {"type": "object"}},
        {"logprobs": 0},
    ):
        assert not batchable(SamplingParams(**unbatchable)), unbatchable  # type: ignore[arg-type]


def test_concurrent_greedy_replies_match_one_at_a_time(batched: TransformersEngine, solo: TransformersEngine) -> None:
    prompts = ["Write a story about a dragon.", "Explain how rain forms.", "List five fruits.", "Describe Rome."]
    prompt_ids = [batched.encode_chat([Message("user", p)]) for p in prompts]
    want = [collect(solo.generate(GenerationRequest(ids, greedy(40))))[0] for ids in prompt_ids]
    before = batched._batcher.peak
    got = run_together(batched, [GenerationRequest(ids, greedy(40)) for ids in prompt_ids])
    assert batched._batcher.peak >= 2 or before >= 2  # they ran in one batch, not one after another
    for ids, (text, last), expected in zip(prompt_ids, got, want, strict=True):
        assert text.strip() and last.finish_reason in ("stop", "length")
        assert_same_or_near_tie(solo, ids, text, expected)


def test_next_turn_computes_only_its_new_tokens(batched: TransformersEngine, solo: TransformersEngine) -> None:
    """A stateless client resends the history: its earlier turns' KV pages are found by content and shared."""
    history = [Message("user", "Name three rivers in Europe.")]
    first_ids = batched.encode_chat(history)
    first, last = collect(batched.generate(GenerationRequest(first_ids, greedy(24))))
    history += [Message("assistant", first), Message("user", "Which of them is the longest?")]
    ids = batched.encode_chat(history)
    text, last = collect(batched.generate(GenerationRequest(ids, greedy(24))))
    assert last.prompt_tokens == len(ids)
    # Whole pages of the first prompt and reply are reused; at most the last partial page is computed.
    assert last.cached_tokens >= (len(first_ids) // PAGE_SIZE) * PAGE_SIZE > 0
    assert last.cached_tokens < len(ids)
    assert_same_or_near_tie(solo, ids, text, collect(solo.generate(GenerationRequest(ids, greedy(24))))[0])
    # The one-at-a-time engine keeps nothing between requests.
    assert collect(solo.generate(GenerationRequest(ids, greedy(4))))[1].cached_tokens == 0


def test_sampled_and_greedy_requests_share_a_batch(batched: TransformersEngine) -> None:
    ids = batched.encode_chat([Message("user", "Tell me a word.")])
    sampled = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=40)
    one_token = SamplingParams(max_tokens=12, temperature=1.5, top_k=1)  # top-k 1 leaves only the argmax
    results = run_together(batched, [GenerationRequest(ids, p) for p in (sampled, greedy(12), one_token)])
    assert all(r[0].strip() for r in results)
    assert results[1][0] == results[2][0]


def test_requests_the_batch_cannot_sample_run_between_its_steps(batched: TransformersEngine) -> None:
    ids = batched.encode_chat([Message("user", "Write a long story about a dragon.")])
    long = batched.generate(GenerationRequest(ids, greedy(200)))
    next(long)  # the batch is running
    seeded = SamplingParams(max_tokens=10, temperature=1.0, seed=1234)
    first = collect(batched.generate(GenerationRequest(ids, seeded)))[0]
    assert first == collect(batched.generate(GenerationRequest(ids, seeded)))[0]
    parts = list(batched.generate(GenerationRequest(ids, SamplingParams(max_tokens=4, temperature=0, logprobs=2))))
    assert parts[-1].finish_reason == "length"
    assert sum(len(c.logprobs or []) for c in parts) == 4
    long.close()  # type: ignore[attr-defined]


def test_closing_the_stream_frees_its_place(smollm2_gguf: Path) -> None:
    engine = load(smollm2_gguf, max_batch_size=2)
    try:
        ids = engine.encode_chat([Message("user", "Count from 1 to 1000, one number per line.")])
        stream = engine.generate(GenerationRequest(ids, greedy(900)))
        for _ in range(3):
            next(stream)
        stream.close()  # type: ignore[attr-defined]
        # Both places are free again: two more run to their end.
        results = run_together(engine, [GenerationRequest(ids, greedy(8)) for _ in range(2)])
        assert [r[1].completion_tokens for r in results] == [8, 8]
        deadline = time.monotonic() + 10
        while engine.stats["generated_tokens"] < 3 + 16 and time.monotonic() < deadline:
            time.sleep(0.05)  # the cancelled one's count lands when the dispatcher ends it
        # The cancelled one stopped within a few steps instead of running on to 900 tokens.
        assert engine.stats["generated_tokens"] < 3 + 16 + 10
    finally:
        engine.close()


def test_overload_is_refused_at_once(smollm2_gguf: Path) -> None:
    engine = load(smollm2_gguf, max_batch_size=2, max_queue=2)
    try:
        ids = engine.encode_chat([Message("user", "Write a long poem.")])
        accepted, refused = [], 0
        for _ in range(12):
            try:
                accepted.append(engine.generate(GenerationRequest(ids, greedy(16))))
            except Overloaded:
                refused += 1
            time.sleep(0.05)
        # Two in the batch, one held by the admitting thread, two waiting.
        assert len(accepted) <= 5 and refused >= 7
        for stream in accepted:
            assert collect(stream)[1].finish_reason == "length"
    finally:
        engine.close()


def test_close_ends_every_stream(smollm2_gguf: Path) -> None:
    engine = load(smollm2_gguf, max_batch_size=2)
    ids = engine.encode_chat([Message("user", "Write a long story about a dragon.")])
    streams = [engine.generate(GenerationRequest(ids, greedy(500))) for _ in range(3)]
    next(streams[0])
    engine.close()
    for stream in streams:
        with pytest.raises(PureAPIError):
            collect(stream)


def test_generate_racing_close_always_ends(smollm2_gguf: Path) -> None:
    race_generate_with_close(lambda: load(smollm2_gguf, max_batch_size=2, max_queue=2), rounds=2)
