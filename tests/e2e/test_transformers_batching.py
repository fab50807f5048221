"""The transformers engine's continuous batching on real weights: SmolLM2 (Llama) and Qwen2.5-Coder (Qwen2).

A batched engine (transformers' ContinuousBatchingManager, paged KV cache with prefix sharing) is
checked against the same weights run one generation at a time with `generate`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from pureapi.engines.hf_batching import PAGE_SIZE
from pureapi.engines.transformers import TransformersEngine
from pureapi.errors import Overloaded, PureAPIError
from pureapi.models.resolve import ResolvedModel
from pureapi.settings import Settings
from pureapi.types import Chunk, GenerationRequest, Message, SamplingParams
from tests.races import race_generate_with_close
from tests.streams import read_together

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


def assert_same_or_near_tie(
    solo: TransformersEngine, ids: list[int], got: str, want: str, params: SamplingParams | None = None
) -> None:
    """Equal greedy replies, or a first divergence between two tokens the float32 model nearly ties
    (after the penalties `params` asks for, applied as `generate` applies them)."""
    if got == want:
        return
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    from pureapi.engines.hf_sampling import OpenAIPenalties

    a, b = tokens_of(solo, got), tokens_of(solo, want)
    k = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    history = torch.tensor([ids + b[:k]])
    with torch.no_grad():
        logits = solo.model(history).logits[:, -1]
    if params is not None and params.repeat_penalty != 1.0:
        logits = RepetitionPenaltyLogitsProcessor(params.repeat_penalty)(history, logits)
    if params is not None:
        logits = OpenAIPenalties(len(ids), params.presence_penalty, params.frequency_penalty)(history, logits)
    assert abs(float(logits[0, a[k]] - logits[0, b[k]])) < NEAR_TIE, (got, want)


@contextlib.contextmanager
def inside_the_batch(engine: TransformersEngine) -> Iterator[None]:
    """The requests run in the block neither paused the batch nor ran alone in it."""
    paused = engine.stats["paused_runs"]
    engine._batcher.peak = 0
    yield
    assert engine.stats["paused_runs"] == paused
    assert engine._batcher.peak >= 2


def run_together(engine: TransformersEngine, requests: list[GenerationRequest]) -> list[tuple[str, Chunk]]:
    """Queue every request before reading any, then read them all at once."""
    return [collect(iter(chunks)) for chunks in read_together([engine.generate(r) for r in requests])]


def test_which_requests_the_batch_samples(batched: TransformersEngine) -> None:
    takes = batched._batcher.takes
    assert takes(SamplingParams(temperature=0.0))
    assert takes(SamplingParams(temperature=0.8, top_p=0.9, top_k=40))
    for per_request in (
        {"seed": 1},
        {"min_p": 0.1},
        {"repeat_penalty": 1.2},
        {"presence_penalty": 0.5},
        {"frequency_penalty": 0.5},
        {"logprobs": 0},
    ):
        assert takes(SamplingParams(**per_request)), per_request  # type: ignore[arg-type]
    assert not takes(SamplingParams(json_schema={"type": "object"}))  # llguidance's matcher runs in generate


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


def test_seeded_requests_repeat_while_other_streams_run(batched: TransformersEngine) -> None:
    ids = batched.encode_chat([Message("user", "Tell me a short story about a cat.")])
    other = batched.encode_chat([Message("user", "Write a long story about a dragon.")])
    seeded = SamplingParams(max_tokens=16, temperature=1.0, seed=1234)
    sampled = SamplingParams(max_tokens=30, temperature=1.0)  # draws from torch's global generator meanwhile
    with inside_the_batch(batched):
        beside_greedy = run_together(batched, [GenerationRequest(ids, seeded), GenerationRequest(other, greedy(40))])
        trio = [GenerationRequest(other, sampled), GenerationRequest(ids, seeded), GenerationRequest(other, sampled)]
        beside_sampled = run_together(batched, trio)
    first = beside_greedy[0][0]
    assert first.strip() and first == beside_sampled[1][0]
    # The seed is what repeats it: other seeds give other stories.
    texts = {collect(batched.generate(GenerationRequest(ids, replace(seeded, seed=s))))[0] for s in (1, 2, 3)}
    assert len(texts | {first}) >= 2


def test_seeded_min_p_in_the_batch_draws_what_generate_draws(
    batched: TransformersEngine, solo: TransformersEngine
) -> None:
    ids = batched.encode_chat([Message("user", "Invent a name for a new colour.")])
    other = batched.encode_chat([Message("user", "Write a long story about a dragon.")])
    params = SamplingParams(max_tokens=16, temperature=1.5, top_p=0.95, top_k=50, min_p=0.2, seed=7)
    want = collect(solo.generate(GenerationRequest(ids, params)))[0]
    with inside_the_batch(batched):
        got = run_together(batched, [GenerationRequest(ids, params), GenerationRequest(other, greedy(40))])[0][0]
    assert got == want


@pytest.mark.parametrize(
    "penalties",
    [{"repeat_penalty": 1.5}, {"presence_penalty": 1.5, "frequency_penalty": 1.5}],
    ids=["repeat", "presence+frequency"],
)
def test_penalised_greedy_in_the_batch_matches_generate(
    batched: TransformersEngine, solo: TransformersEngine, penalties: dict[str, float]
) -> None:
    ids = batched.encode_chat([Message("user", "Count from 1 to 20, separated by commas.")])
    other = batched.encode_chat([Message("user", "Write a long story about a dragon.")])
    params = replace(greedy(32), **penalties)
    want = collect(solo.generate(GenerationRequest(ids, params)))[0]
    with inside_the_batch(batched):
        got = run_together(batched, [GenerationRequest(ids, params), GenerationRequest(other, greedy(60))])[0][0]
    assert_same_or_near_tie(solo, ids, got, want, params)
    assert got != collect(batched.generate(GenerationRequest(ids, greedy(32))))[0]  # the penalty changed the reply


def test_logprobs_in_the_batch_are_generates(batched: TransformersEngine, solo: TransformersEngine) -> None:
    ids = batched.encode_chat([Message("user", "Name a famous painter.")])
    other = batched.encode_chat([Message("user", "Write a long story about a dragon.")])
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=3)
    want = [e for c in solo.generate(GenerationRequest(ids, params)) for e in c.logprobs or []]
    long = batched.generate(GenerationRequest(other, greedy(200)))
    with inside_the_batch(batched):
        next(long)  # the batch is running
        parts = list(batched.generate(GenerationRequest(ids, params)))
    long.close()  # type: ignore[attr-defined]
    got = [e for c in parts for e in c.logprobs or []]
    assert len(got) == parts[-1].completion_tokens == 8
    compared = 0
    for g, w in zip(got, want, strict=True):
        if g.bytes != w.bytes:  # a near-tie parted the replies: later steps see different histories
            break
        assert g.logprob == pytest.approx(w.logprob, abs=2e-3)
        wanted_top = {t.bytes: t.logprob for t in w.top}
        assert len(g.top) == 3 and all(t.logprob == pytest.approx(wanted_top.get(t.bytes), abs=2e-3) for t in g.top)
        compared += 1
    assert compared >= 4


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
        # Two in the batch, one held by the admitting thread, max_queue + slots (4) waiting.
        assert len(accepted) <= 7 and refused >= 5
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
