"""Continuous batching for the transformers engine, on transformers' own `ContinuousBatchingManager`.

The manager owns a paged KV cache and a generation thread: requests join and leave the running
batch between steps, and with block sharing a prompt's complete pages that are already cached
(a conversation's earlier turns, a shared system prompt) are reused, not computed again. Pages
stay cached after their request ends, until the memory is needed.

This module adds what a server needs around it:
- a dispatcher thread that turns the manager's per-step outputs into a job's text deltas, and
  cancels a request whose reader went away (or that a reset or shutdown cancelled);
- an admission limit (`max_batch`): jobs beyond it wait in the engine's bounded queue, so an
  overload is still a 503 at once;
- sampling processors with fast paths, and the per-request steps the manager lacks (a seed,
  min_p, penalties, logprobs: `hf_batch_sampling`), so such a request runs in the batch too;
- on a CPU, attention one sequence at a time (`hf_attention`) instead of one masked pass over the
  whole batch.

`Batcher.takes` says which requests the batch serves: all but those with a JSON-schema grammar
(and, where the manager runs steps asynchronously or with CUDA graphs, those needing the
per-request steps); a step runs each of the others alone with `generate` (`run_alone`), the batch paused.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingTemperatureLogitsWarper
from transformers.generation.continuous_batching.requests import RequestStatus

from ..errors import EngineError
from ..types import SamplingParams
from . import hf_attention
from .hf_batch_sampling import Rows, RowSteps, Steps, TopK, TopP, fast
from .jobs import Job
from .shell import Backend, arrived, run_whole

log = logging.getLogger(__name__)

PAGE_SIZE = 16  # tokens per KV page: the unit of prefix reuse, so a turn recomputes at most 15 cached tokens
POLL_SECONDS = 0.05  # how long a step waits for the manager's next output (new jobs wait at most this long)


def sampling_kwargs(params: SamplingParams, vocab_size: int) -> dict[str, Any]:
    """The manager's per-request processor arguments. A greedy row is top-p 0 with nothing else to do: `TopP`
    draws only for rows with top-p above 0 and the runner takes the argmax of every row."""
    if params.temperature <= 0:
        return {"temperature": 1.0, "top_k": vocab_size, "top_p": 0.0}
    top_k = params.top_k if 0 < params.top_k < vocab_size else vocab_size
    return {"temperature": float(params.temperature), "top_k": int(top_k), "top_p": max(float(params.top_p), 1e-6)}


def cpu_pages(model: Any, max_batch: int, context_length: int, reuse_mb: int) -> int:
    """Pages of the paged KV cache on a CPU: 1024 tokens for each running sequence plus reuse_mb of pages
    kept for reuse, and at least one whole context window (a sequence that outgrows its share waits or
    takes pages from the reusable ones; the manager schedules that)."""
    config = model.config.get_text_config()
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    page_bytes = 2 * config.num_hidden_layers * heads * head_dim * PAGE_SIZE * model.dtype.itemsize
    running = max_batch * 1024 // PAGE_SIZE
    return int(max(running + reuse_mb * 2**20 // page_bytes, -(-context_length // PAGE_SIZE) + 1))


class _Running:
    """A job in the batch: its streamer and how far the manager's outputs have been read."""

    def __init__(self, job: Job, streamer: Any):
        self.job = job
        self.streamer = streamer
        self.seen = 0  # generated tokens already fed to the streamer
        self.started = False


class Batcher(Backend):
    """Drives a ContinuousBatchingManager as the engine shell's backend: admit jobs into the running batch,
    route each step's outputs to them, drop (cancel) them; jobs the batch cannot sample run alone."""

    def __init__(
        self,
        model: Any,
        end_ids: list[int],
        vocab_size: int,
        make_streamer: Any,
        piece: Any,
        max_batch: int,
        context_length: int,
        on_generated: Any,
        run_alone: Callable[[Job], None],
        reuse_mb: int = 256,
    ):
        self.end_ids = end_ids
        self.vocab_size = vocab_size
        self.max_batch = max_batch
        self._make_streamer = make_streamer  # (job, logprob_of or None) -> the job's streamer
        self._piece = piece  # token -> its bytes, for logprobs
        self._device = model.device
        self._on_generated = on_generated  # called with a finished job's token count (the engine's stats)
        self._run_alone = run_alone  # runs one whole job with `generate` (one the batch cannot sample)
        on_cpu = model.device.type == "cpu"
        if on_cpu:
            hf_attention.install()  # per-sequence attention instead of one masked pass over the whole batch
        # Processors exist per request only if the config turns them on (values not 1.0 / 0).
        generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
            do_sample=True, temperature=0.7, top_k=50, top_p=0.9, eos_token_id=end_ids
        )
        config = ContinuousBatchingConfig(
            page_size=PAGE_SIZE,
            per_request_processors=True,
            max_requests_per_batch=max_batch,
            allow_block_sharing=True,
            # On a GPU the manager sizes the cache and the step budget from free memory; a CPU has no such query.
            num_blocks=cpu_pages(model, max_batch, context_length, reuse_mb) if on_cpu else None,
            max_batch_tokens=512 if on_cpu else None,
            auto_switch_to_flash=True,
        )
        self.manager = model.init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=config
        )
        # Which request each step's rows belong to, for the per-request steps (hf_batch_sampling).
        self._rows = Rows()
        processors = self.manager.logit_processor.logits_processor
        processors[:] = [Steps(self._rows), *(fast(p, self._rows) for p in processors)]
        self._matched: dict[str, int] = {}  # request id -> prompt tokens whose KV came from cached pages
        self._running: dict[str, _Running] = {}  # request id -> its job in the batch; the shell's worker only
        self._alone: Job | None = None  # a job the batch cannot sample: the next step runs it, the batch paused
        self.peak = 0  # the most jobs that ran at once (tests and benchmarks read it)
        self.manager.warmup()  # creates the batch processor (and its cache) here, so the lookup can be counted
        # The draw happens in TopP; the runner only takes each row's argmax (see TopP).
        self.manager.batch_processor.model_runner.do_sample = False
        self._check_processor_order(processors)
        # The rows of a step are known only while steps run one after another (hf_batch_sampling's docstring).
        runner = self.manager.batch_processor.model_runner
        self.steps_in_batch = not (
            self.manager.batch_processor.use_async_batching
            or runner.use_cuda_graph_varlen
            or runner.use_cuda_graph_decode
        )
        self._count_prefix_matches()
        self.manager.start()

    @staticmethod
    def _check_processor_order(processors: list[Any]) -> None:
        """Penalties before temperature, the draw in TopP after temperature and top-k: transformers' order
        for the manager's own three, checked, not assumed."""
        kinds = [type(p) for p in processors]
        if kinds != [Steps, ContinuousBatchingTemperatureLogitsWarper, TopK, TopP]:
            raise RuntimeError(f"unexpected continuous batching processors: {kinds}")

    def _count_prefix_matches(self) -> None:
        """Record how many prompt tokens each request took from cached pages (OpenAI's cached_tokens)."""
        cache: Any = getattr(self.manager.batch_processor, "cache", None)
        search = getattr(cache, "search_prefix_match", None)
        if search is None:  # another transformers layout: batching works, cached_tokens reads 0
            log.warning("transformers' paged cache has no search_prefix_match; cached_tokens will read 0")
            return

        def counted(request_id: str, prompt_ids: list[int]) -> int:
            matched = int(search(request_id, prompt_ids))
            self._matched[request_id] = matched
            return matched

        cache.search_prefix_match = counted

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the batch between two steps while the caller runs the model.

        Not an optimisation but a need: while the manager's forward runs, a plain forward of the same
        model object on another thread gets different logits (measured on Qwen2: 2.3 apart at the
        last position), so the two never overlap.
        """
        if not self.manager.is_running():
            yield
            return
        with self.manager.pause():
            yield

    def alive(self) -> bool:
        """Whether the manager's generation thread still runs."""
        return bool(self.manager.is_running())

    def takes(self, params: SamplingParams) -> bool:
        """True when the batch can sample this request as asked: all but a JSON-schema grammar, whose
        matcher runs in `generate` (and the per-request steps where the manager cannot run them)."""
        return params.json_schema is None and (self.steps_in_batch or not RowSteps.wanted(params))

    # --- the shell's backend: called on the shell's worker thread only ---

    def has_room(self) -> bool:
        return self._alone is None and len(self._running) < self.max_batch

    def running(self) -> list[Job]:
        jobs = [r.job for r in self._running.values()]
        return jobs if self._alone is None else [*jobs, self._alone]

    def admit(self, job: Job) -> None:
        """Add a job to the running batch, or hold it for the next step to run alone."""
        req = job.request
        if not self.takes(req.params):
            self._alone = job
            return
        request_id = _request_id(job)
        steps = RowSteps(req.params, len(req.prompt_ids), self._device) if RowSteps.wanted(req.params) else None
        logprob_of = None if steps is None else steps.logprob_of(self._piece)
        running = _Running(job, self._make_streamer(job, logprob_of))
        if steps is not None:
            self._rows.steps[request_id] = steps  # before the manager can schedule it
        added = self.manager.add_request(
            list(req.prompt_ids),
            request_id=request_id,
            max_new_tokens=req.params.max_tokens,
            streaming=True,
            eos_token_id=self.end_ids,
            **sampling_kwargs(req.params, self.vocab_size),
        )
        if added is None:  # the manager refuses new requests: it has stopped
            self._rows.steps.pop(request_id, None)
            raise EngineError("the batch generation loop has stopped")
        self._running[request_id] = running
        self.peak = max(self.peak, len(self._running))

    def step(self) -> None:
        """Run the held job alone, or route the outputs the manager has produced since the last step."""
        if self._alone is not None:
            job = self._alone
            with self.paused():
                if run_whole(job, self._run_alone):  # its failure is its own: the batch goes on
                    self._alone = None
            return
        if not self.manager.is_running():  # the shell fails every job of this step
            raise EngineError(f"the batch generation loop stopped: {self.manager.background_thread_status.fatal_error}")
        for out in arrived(self.manager.output_router.output_queue, POLL_SECONDS):
            running = self._running.get(out.request_id)  # None: dropped since, its late outputs go nowhere
            if running is None:
                continue
            try:
                self._deliver(out, running)
            except Exception as exc:  # one job's broken stream fails that job alone
                log.exception("delivering %s failed", out.request_id)
                if out.request_id in self._running:
                    self._end(out.request_id, cancel=True)
                if not running.job.ended:
                    running.job.fail(EngineError(f"generation failed: {exc}"))

    def drop(self, job: Job, failed: bool = False) -> None:
        if job is self._alone:
            self._alone = None
        elif _request_id(job) in self._running:
            self._end(_request_id(job), cancel=True)

    def shutdown(self) -> None:
        """Every job has ended: stop the manager's generation thread."""
        if self.manager.is_running():
            self.manager.stop(block=True, timeout=10, hard_stop=True)

    def _deliver(self, out: Any, running: _Running) -> None:
        job, streamer = running.job, running.streamer
        if not running.started:
            running.started = True
            job.cached_tokens = self._matched.get(out.request_id, 0)
        if out.status == RequestStatus.FAILED:
            self._end(out.request_id)
            job.fail(EngineError(f"generation failed: {out.error}"))
            return
        fresh = out.generated_tokens[running.seen :]
        running.seen = len(out.generated_tokens)
        streamer.feed(fresh)
        if out.is_finished():
            self._end(out.request_id)
            streamer.flush()
            job.finish("stop" if streamer.ended else "length", streamer.count)

    def _end(self, request_id: str, cancel: bool = False) -> None:
        """Forget a request that leaves the batch (`cancel`: stop it in the manager first)."""
        if cancel and self.manager.is_running():
            self.manager.cancel_request(request_id)
        running = self._running.pop(request_id)
        self._matched.pop(request_id, None)
        self._rows.steps.pop(request_id, None)
        self._on_generated(running.streamer.count)


def _request_id(job: Job) -> str:
    return f"job-{job.number}"
