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
per-request steps); the engine runs the others one at a time with `generate`, the batch paused.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingTemperatureLogitsWarper
from transformers.generation.continuous_batching.requests import RequestStatus

from ..errors import Cancelled, EngineError
from ..types import SamplingParams
from . import hf_attention
from .hf_batch_sampling import Rows, RowSteps, Steps, TopK, TopP, fast
from .jobs import Job

log = logging.getLogger(__name__)

PAGE_SIZE = 16  # tokens per KV page: the unit of prefix reuse, so a turn recomputes at most 15 cached tokens


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


class Batcher:
    """Drives a ContinuousBatchingManager for an engine: submit jobs, stream their tokens, cancel, close."""

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
        reuse_mb: int = 256,
    ):
        self.end_ids = end_ids
        self.vocab_size = vocab_size
        self.max_batch = max_batch
        self._make_streamer = make_streamer  # (job, logprob_of or None) -> the job's streamer
        self._piece = piece  # token -> its bytes, for logprobs
        self._device = model.device
        self._on_generated = on_generated  # called with a finished job's token count (the engine's stats)
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
        self._running: dict[str, _Running] = {}  # only the dispatcher thread touches it after submit
        self.peak = 0  # the most jobs that ran at once (tests and benchmarks read it)
        # Not bounded: when the manager dies, a refused job may be released twice; capacity no longer matters then.
        self._slots = threading.Semaphore(max_batch)
        self._closed = threading.Event()
        # Jobs handed to the manager, for the dispatcher (None: the manager refused it, forget the id).
        self._new: queue.SimpleQueue[tuple[str, _Running | None]] = queue.SimpleQueue()
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
        self._dispatcher = threading.Thread(target=self._dispatch, name="transformers-batch", daemon=True)
        self._dispatcher.start()

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
        return self.manager.is_running() and not self._closed.is_set()

    def takes(self, params: SamplingParams) -> bool:
        """True when the batch can sample this request as asked: all but a JSON-schema grammar, whose
        matcher runs in `generate` (and the per-request steps where the manager cannot run them)."""
        return params.json_schema is None and (self.steps_in_batch or not RowSteps.wanted(params))

    def submit(self, job: Job) -> None:
        """Add a job to the batch, waiting while `max_batch` jobs run (the caller is the engine's admitting thread)."""
        while not self._slots.acquire(timeout=0.1):
            if self._closed.is_set():
                job.fail(Cancelled("server shutting down"))
                return
            if job.request.cancel.is_set():
                job.fail(Cancelled("cancelled before it started"))
                return
        if self._closed.is_set():
            self._slots.release()
            job.fail(Cancelled("server shutting down"))
            return
        req = job.request
        request_id = f"job-{job.number}"
        steps = RowSteps(req.params, len(req.prompt_ids), self._device) if RowSteps.wanted(req.params) else None
        logprob_of = None if steps is None else steps.logprob_of(self._piece)
        running = _Running(job, self._make_streamer(job, logprob_of))
        if steps is not None:
            self._rows.steps[request_id] = steps  # before the manager can schedule it
        self._new.put((request_id, running))
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
            self._new.put((request_id, None))
            self._slots.release()
            job.fail(EngineError("the batch generation loop has stopped"))

    def _dispatch(self) -> None:
        """Route the manager's outputs to their jobs, and cancel jobs whose stream was closed."""
        outputs = self.manager.output_router.output_queue
        while not self._closed.is_set():
            try:
                out = outputs.get(timeout=0.05)
            except queue.Empty:
                out = None
            self._take_new()
            running = None if out is None else self._running.get(out.request_id)
            if running is not None:
                try:
                    self._deliver(out, running)
                except Exception as exc:  # one job's broken stream must not stop this thread, which serves all
                    log.exception("delivering %s failed", out.request_id)
                    self._fail(out.request_id, running, EngineError(f"generation failed: {exc}"))
            for request_id, running in list(self._running.items()):
                if running.job.request.cancel.is_set():
                    self._fail(request_id, running, Cancelled("generation cancelled"))
            if not self.manager.is_running() and self._running:
                error = self.manager.background_thread_status.fatal_error
                for request_id, running in list(self._running.items()):
                    self._end(request_id)
                    running.job.fail(EngineError(f"the batch generation loop stopped: {error}"))

    def _take_new(self) -> None:
        """Track the jobs submitted since the last pass."""
        while True:
            try:
                request_id, running = self._new.get_nowait()
            except queue.Empty:
                return
            if running is None:
                self._running.pop(request_id, None)  # refused: its slot and its stream are already done with
            else:
                self._running[request_id] = running
                self.peak = max(self.peak, len(self._running))

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

    def _fail(self, request_id: str, running: _Running, error: Exception) -> None:
        """End a job with an error, and stop its request in the manager."""
        if request_id in self._running:
            self.manager.cancel_request(request_id)
            self._end(request_id)
        running.job.fail(error)

    def _end(self, request_id: str) -> None:
        running = self._running.pop(request_id)
        self._matched.pop(request_id, None)
        self._rows.steps.pop(request_id, None)
        self._on_generated(running.streamer.count)
        self._slots.release()

    def close(self) -> None:
        """End every running stream and stop the manager's thread."""
        self._closed.set()
        self._dispatcher.join(timeout=10)
        self._take_new()
        for request_id, running in list(self._running.items()):
            self._end(request_id)
            running.job.request.cancel.set()
            running.job.fail(Cancelled("server shutting down"))
        if self.manager.is_running():
            self.manager.stop(block=True, timeout=10, hard_stop=True)
