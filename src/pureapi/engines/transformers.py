"""The transformers engine: HF weights or a GGUF file, on CUDA (accelerate device maps) or CPU."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from ..models.resolve import CPU_CONTEXT_CAP, ResolvedModel
from ..tools import detect_format
from ..types import Chunk, GenerationRequest
from ._template import HFTokenized
from .base import QueuedEngine, model_fingerprint, system_fingerprint
from .hf_convert import convert_gguf
from .hf_stream import Streamer
from .hf_version import check_transformers
from .jobs import Job

log = logging.getLogger(__name__)

# Tokens that end an assistant turn in the Qwen (ChatML) and Llama 3 families, besides the EOS.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>")


def pick_device(device: str) -> str:
    """Resolve --device: auto means CUDA when torch sees one, else CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device}: torch sees no CUDA device")
    if device != "cpu" and not device.startswith("cuda"):
        raise ModelLoadError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    return device


class TransformersEngine(HFTokenized, QueuedEngine):
    """Runs a transformers causal LM: continuously batched (max_batch_size > 1) or one generation at a time.

    Either way the engine shell owns the jobs. Batched, its backend is the `Batcher`: the jobs
    transformers' ContinuousBatchingManager can sample (Batcher.takes: seeds, penalties, min_p and
    logprobs included) join its running batch; the others (JSON schemas) run alone with `generate`, the
    batch held meanwhile. Unbatched, the backend runs one job at a time with `generate` (`_run`).
    """

    name = "transformers"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        model_name: str,
        device: str,
        context_length: int,
        max_queue: int,
        max_batch_size: int = 1,
        kv_cache_mb: int = 256,
    ):
        super().__init__(max_queue=max_queue)
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.device = device
        self.context_length = context_length
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        # Fast tokenizers toggle shared state for split_special_tokens; encode one caller at a time.
        self._tok_lock = threading.Lock()
        template = getattr(tokenizer, "chat_template", None)
        self.tool_format = detect_format(template if isinstance(template, str) else json.dumps(template))
        vocab = tokenizer.get_vocab()
        ends = {tokenizer.eos_token_id} | {vocab[t] for t in END_OF_TURN if t in vocab}
        gen_eos = model.generation_config.eos_token_id
        ends |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.end_ids = sorted(i for i in ends if i is not None)
        # For tests: tokens generated, and requests served with the batch paused.
        self.stats: dict[str, int] = {"generated_tokens": 0, "paused_runs": 0}
        self._stats_lock = threading.Lock()
        # Structured output: llguidance's tokenizer (built on first use) and compiled grammars by schema.
        # Guards both: request threads compile (a bad schema is a 400 before queueing), the worker reads.
        self._grammar_lock = threading.Lock()
        self._grammar_tokenizer: Any = None
        self._grammars: OrderedDict[str, str] = OrderedDict()
        self._token_bytes: dict[int, bytes] = {}  # token -> its bytes, for logprobs; a benign race fills it
        self._byte_decoder = _byte_decoder(tokenizer)
        self.slots = max_batch_size
        self._batcher: Any = None
        if max_batch_size > 1:
            from .hf_batching import Batcher

            self._batcher = Batcher(
                model,
                self.end_ids,
                self.vocab_size,
                lambda job, logprob_of: Streamer(self.tokenizer, job, set(self.end_ids), logprob_of),
                self.piece,
                max_batch_size,
                context_length,
                self._count_generated,
                self._run_alone,
                kv_cache_mb,
            )
        self.start(self._batcher)

    @classmethod
    def load(
        cls,
        resolved: ResolvedModel,
        device: str = "auto",
        ctx_size: int | None = None,
        max_queue: int = 64,
        cache_dir: Path | None = None,
        max_batch_size: int = 1,
        kv_cache_mb: int = 256,
    ) -> TransformersEngine:
        """Load weights (converting a GGUF once into a cached safetensors folder) onto the device."""
        check_transformers()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = pick_device(device)
        folder, gguf_file = resolved.path, None
        if resolved.is_gguf:
            folder, gguf_file = resolved.path.parent, resolved.path.name
            if cache_dir is not None:
                import transformers

                cached = cache_dir / model_fingerprint(resolved.path, transformers.__version__)
                if not (cached / "config.json").is_file():
                    convert_gguf(resolved.path, cached)
                folder, gguf_file = cached, None
        if device == "cpu":
            dtype, device_map = torch.float32, None
        else:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            device_map = "auto" if device == "cuda" else {"": device}
        started = time.monotonic()
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=gguf_file, dtype=dtype, device_map=device_map
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model {resolved.path}: cannot load it ({str(exc).splitlines()[0]})") from None
        model.eval()  # type: ignore[no-untyped-call]
        log.info("loaded %s on %s in %.1fs", resolved.name, device, time.monotonic() - started)
        if not getattr(tokenizer, "chat_template", None):
            raise ModelLoadError(f"model {resolved.path}: its tokenizer has no chat template")
        limit = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        if ctx_size is not None:
            limit = min(limit, ctx_size)
        elif device == "cpu":
            limit = min(limit, CPU_CONTEXT_CAP)
        engine = cls(model, tokenizer, resolved.name, device, limit, max_queue, max_batch_size, kv_cache_mb)
        import transformers

        size = resolved.path.stat().st_size if resolved.path.is_file() else None
        engine.system_fingerprint = system_fingerprint(
            resolved.name, size, "transformers", transformers.__version__, torch.__version__, str(dtype)
        )
        return engine

    def generate(self, request: GenerationRequest) -> Iterator[Chunk]:
        if request.params.json_schema is not None:
            self._grammar(request.params.json_schema)  # compiled now, so a schema llguidance refuses is a 400
        return super().generate(request)

    def _grammar(self, schema: dict[str, Any]) -> tuple[Any, str]:
        """llguidance's tokenizer and the schema's compiled grammar (the last 64 are kept)."""
        from .hf_sampling import compile_schema, grammar_tokenizer

        key = json.dumps(schema)
        with self._grammar_lock:
            if self._grammar_tokenizer is None:
                self._grammar_tokenizer = grammar_tokenizer(self.tokenizer, self.end_ids)
            grammar = self._grammars.get(key)
            if grammar is None:
                grammar = self._grammars[key] = compile_schema(schema, self._grammar_tokenizer)
                while len(self._grammars) > 64:
                    self._grammars.popitem(last=False)
            self._grammars.move_to_end(key)
            return self._grammar_tokenizer, grammar

    def piece(self, token: int) -> bytes:
        """The bytes of one token (byte-level BPE pieces mapped back to their bytes)."""
        data = self._token_bytes.get(token)
        if data is None:
            text = str(self.tokenizer.convert_ids_to_tokens(token))
            decoder = self._byte_decoder
            if decoder and all(c in decoder for c in text):
                data = bytes(decoder[c] for c in text)
            else:
                data = str(self.tokenizer.decode([token])).encode()
            self._token_bytes[token] = data
        return data

    def _count_generated(self, tokens: int) -> None:
        with self._stats_lock:
            self.stats["generated_tokens"] += tokens

    def ready(self) -> bool:
        return super().ready() and (self._batcher is None or self._batcher.alive())

    def info(self) -> dict[str, Any]:
        return {**super().info(), "max_batch_size": self.slots}

    def _run_alone(self, job: Job) -> None:
        """A job the batch cannot sample, run with `generate` while the batch is paused (the Batcher's step)."""
        with self._stats_lock:
            self.stats["paused_runs"] += 1
        self._run(job)

    def memory_allocated(self) -> int:
        import torch

        if self.device.startswith("cuda"):
            return int(sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())))
        return int(self.model.get_memory_footprint())

    def _run(self, job: Job) -> None:
        import torch
        from transformers import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            StoppingCriteria,
            StoppingCriteriaList,
        )

        from .hf_sampling import JsonGrammar, OpenAIPenalties, RawLogprobs, SeededSampler

        req: GenerationRequest = job.request
        p = req.params
        input_ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.model.device)
        raw = RawLogprobs() if p.logprobs is not None else None
        logprob_of = None if raw is None else (lambda tok: raw.of(tok, p.logprobs or 0, self.piece))
        streamer = Streamer(self.tokenizer, job, set(self.end_ids), logprob_of)

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), req.cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        sampling: dict[str, Any] = {"do_sample": False}
        if p.temperature > 0:
            sampling = {"do_sample": True, "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k}
            if p.min_p > 0:
                sampling["min_p"] = p.min_p
        # In this order, after which generate applies temperature and truncation (hf_sampling's docstring).
        processors: list[Any] = [] if raw is None else [raw]
        if p.repeat_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(p.repeat_penalty))
        if p.presence_penalty or p.frequency_penalty:
            processors.append(OpenAIPenalties(len(req.prompt_ids), p.presence_penalty, p.frequency_penalty))
        if p.json_schema is not None:
            processors.append(JsonGrammar(*self._grammar(p.json_schema), prompt_len=len(req.prompt_ids)))
        if p.temperature > 0 and p.seed is not None:
            processors.append(SeededSampler(p.seed, p.temperature, p.top_k, p.top_p, p.min_p, self.model.device))
            sampling = {"do_sample": False}
        if processors:
            sampling["logits_processor"] = LogitsProcessorList(processors)
        try:
            with torch.inference_mode():
                self.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=p.max_tokens,
                    eos_token_id=self.end_ids,
                    pad_token_id=self.end_ids[0],
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Cancelled()]),
                    **sampling,
                )
        finally:
            self._count_generated(streamer.count)
        if req.cancel.is_set():
            return
        streamer.flush()
        job.finish("stop" if streamer.ended else "length", streamer.count)


def _byte_decoder(tokenizer: Any) -> dict[str, int]:
    """Byte-level BPE's map from piece characters back to bytes (GPT-2's), or {} for other tokenizers."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    pieces = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), 1000))))
    table = {c: b for b, c in bytes_to_unicode().items()}  # type: ignore[no-untyped-call]
    return table if any("Ġ" in str(p) for p in pieces) else {}
