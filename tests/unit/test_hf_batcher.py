"""The transformers batcher as the engine shell's backend, without downloaded weights: transformers' own
ContinuousBatchingManager drives a tiny randomly initialised Llama, and a word-level tokenizer built in memory
decodes for the real streamer.

What is checked is the backend's part under the shell: tokens reach their own job, a closed stream cancels its
request and frees its place in the batch, a job still waiting for a place can be cancelled and never reaches
the batch, a job the batch cannot sample runs alone with the batch paused (and its failure is its own), and
closing ends every running stream and stops the manager.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pureapi.engines.hf_batching import Batcher
from pureapi.engines.hf_stream import Streamer
from pureapi.engines.jobs import Job
from pureapi.engines.shell import EngineShell
from pureapi.errors import Cancelled, EngineError
from pureapi.types import Chunk, GenerationRequest, SamplingParams

VOCAB = 64
CONTEXT = 4096
LONG = 3000  # tokens a generation would run to unless cancelled
NO_END = VOCAB  # an end id the model cannot produce: replies run to max_tokens


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=CONTEXT,
    )
    model = LlamaForCausalLM(config).eval()
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return model, PreTrainedTokenizerFast(tokenizer_object=words)


class Run:
    """A Batcher over the tiny model under an engine shell, with the token count of each generation that ended."""

    def __init__(self, tiny: tuple[Any, Any], max_batch: int, end_id: int = NO_END):
        model, tokenizer = tiny
        self.generated: list[int] = []
        self.alone: list[tuple[int, bool]] = []  # (job number, whether the batch was paused) per run alone
        self.batcher = Batcher(
            model,
            [end_id],
            VOCAB,
            lambda job, logprob_of: Streamer(tokenizer, job, {end_id}, logprob_of),
            lambda token: tokenizer.decode([token]).encode(),
            max_batch,
            CONTEXT,
            self.generated.append,
            self.run_alone,
            reuse_mb=1,
        )
        self.shell = EngineShell(self.batcher, max_queue=16).start()

    def run_alone(self, job: Job) -> None:
        """A stand-in for `generate`: fails for a prompt starting with 0, else one token per prompt token."""
        self.alone.append((job.number, bool(self.batcher.manager.background_thread_status.is_pause_requested())))
        if job.request.prompt_ids[0] == 0:
            raise RuntimeError("the grammar broke")
        job.emit("alone ", 1)
        job.finish("stop", 1)

    def start(self, prompt: list[int], max_tokens: int, **params: Any) -> tuple[GenerationRequest, Iterator[Chunk]]:
        """Submit a greedy request; its request (to cancel) and its stream."""
        request = GenerationRequest(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, **params))
        return request, self.shell.submit(request)


@pytest.fixture
def run(tiny: tuple[Any, Any]) -> Iterator[Any]:
    runs: list[Run] = []

    def make(max_batch: int, end_id: int = NO_END) -> Run:
        runs.append(Run(tiny, max_batch, end_id))
        return runs[-1]

    yield make
    for r in runs:
        r.shell.close()


def wait_for(condition: Any, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def words(chunks: list[Chunk]) -> list[str]:
    return "".join(c.text for c in chunks).split()


def test_each_job_gets_its_own_tokens_and_the_batch_stays_within_its_size(run: Any) -> None:
    batched = run(2)
    streams = [batched.start([1, 2, 3, 4 + i], 20)[1] for i in range(3)]
    replies = [list(stream) for stream in streams]
    assert [r[-1].finish_reason for r in replies] == ["length"] * 3
    assert [r[-1].completion_tokens for r in replies] == [20] * 3
    assert sorted(batched.generated) == [20, 20, 20]
    assert batched.batcher.peak == 2  # the third waited for a place
    alone = run(1)
    for i, reply in enumerate(replies):  # the same greedy tokens as each prompt run by itself
        assert words(reply) == words(list(alone.start([1, 2, 3, 4 + i], 20)[1]))


def test_an_end_id_stops_a_reply_at_that_token(run: Any) -> None:
    free = run(1)
    reply = words(list(free.start([5, 6, 7], 12)[1]))
    end = int(reply[4][1:])  # the fifth token: the reply must stop before its first occurrence
    ended = run(1, end_id=end)
    chunks = list(ended.start([5, 6, 7], 12)[1])
    first = reply.index(f"w{end}")
    assert chunks[-1].finish_reason == "stop" and chunks[-1].completion_tokens == first
    assert words(chunks) == reply[:first]


def test_a_closed_stream_cancels_its_request_and_frees_its_place(run: Any) -> None:
    one = run(1)
    _, stream = one.start([1, 2, 3], LONG)
    next(stream), next(stream)  # under way
    _, waiting = one.start([4, 5, 6], 5)  # no place until the long one leaves
    stream.close()  # the reader went away
    reply = list(waiting)
    assert reply[-1].finish_reason == "length" and reply[-1].completion_tokens == 5
    wait_for(lambda: len(one.generated) == 2)
    assert one.generated[0] < LONG // 2, one.generated  # it stopped soon after, not at its end
    assert one.batcher.peak == 1


def test_a_job_cancelled_while_waiting_for_a_place_never_reaches_the_batch(run: Any) -> None:
    one = run(1)
    _, stream = one.start([1, 2, 3], LONG)
    next(stream)
    request, waiting = one.start([4, 5, 6], 5)
    request.cancel.set()
    with pytest.raises(Cancelled, match="before it started"):
        list(waiting)
    stream.close()
    wait_for(lambda: len(one.generated) == 1)  # only the long one ever ran
    assert one.batcher.peak == 1


def test_a_job_the_batch_cannot_sample_runs_alone_and_fails_alone(run: Any) -> None:
    two = run(2)
    schema = {"type": "object"}  # a JSON-schema grammar: `generate` runs it, not the batch
    _, batch = two.start([1, 2, 3], 40)
    next(batch)
    _, broken = two.start([0, 1], 5, json_schema=schema)
    _, fine = two.start([1, 1], 5, json_schema=schema)
    with pytest.raises(EngineError, match="the grammar broke"):
        list(broken)
    assert words(list(fine)) == ["alone"]
    reply = list(batch)  # the batch job went on after both
    assert reply[-1].finish_reason == "length" and reply[-1].completion_tokens == 40
    assert [number for number, _ in two.alone] == [2, 3]
    assert all(paused for _, paused in two.alone)  # the batch was held while each ran


def test_a_stopped_manager_fails_the_steps_jobs_and_refuses_new_ones(run: Any) -> None:
    two = run(2)
    streams = [two.start([1, 2, 3 + i], LONG)[1] for i in range(2)]
    for stream in streams:
        next(stream)
    two.batcher.manager.stop(block=True, timeout=10, hard_stop=True)  # as when its thread dies
    for stream in streams:
        with pytest.raises(EngineError):  # the manager's own failure of the request, or the shell's for the step
            list(stream)
    with pytest.raises(EngineError, match="the batch generation loop has stopped"):
        list(two.start([1, 2, 3], 5)[1])
    assert two.shell.ready() and not two.batcher.alive()  # the shell's worker survived; the engine reads not ready


def test_close_ends_every_running_stream_and_stops_the_manager(run: Any) -> None:
    two = run(2)
    streams = [two.start([1, 2, 3 + i], LONG)[1] for i in range(2)]
    for stream in streams:
        next(stream)
    assert two.shell.close()
    for stream in streams:
        with pytest.raises(Cancelled, match="server shutting down"):
            list(stream)
    assert not two.batcher.alive()
    assert len(two.generated) == 2 and max(two.generated) < LONG
