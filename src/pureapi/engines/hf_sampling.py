"""Logits processors of the transformers engine: a JSON-schema grammar (llguidance) and raw logprobs.

transformers runs the processors passed to `generate` after its own penalties and before its
temperature and truncation warpers, in the order given. The engine puts `RawLogprobs` first (so it
sees the model's own distribution) and the grammar before the warpers (so top_p never keeps only
tokens the grammar forbids).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ..errors import BadRequest, ModelLoadError
from ..types import TokenLogprob, TopLogprob

SCHEMA_PARAM = "response_format.json_schema.schema"


def grammar_tokenizer(tokenizer: Any, end_ids: list[int]) -> Any:
    """llguidance's view of a fast HF tokenizer, ending at any of end_ids (about a second: built once)."""
    try:
        import llguidance.hf
    except ImportError:
        raise ModelLoadError("structured output on transformers needs llguidance: pip install llguidance") from None
    try:
        return llguidance.hf.from_tokenizer(tokenizer, eos_token=end_ids)
    except ValueError as exc:
        raise BadRequest(f"{SCHEMA_PARAM}: this model's tokenizer cannot enforce a grammar ({exc})") from None


def compile_schema(schema: dict[str, Any], tokenizer: Any) -> str:
    """llguidance's grammar of a JSON schema; BadRequest if llguidance cannot build it."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
    except ValueError as exc:
        raise BadRequest(f"{SCHEMA_PARAM}: {exc}", param=SCHEMA_PARAM) from None
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if failed:
        raise BadRequest(f"{SCHEMA_PARAM}: {messages[0]}", param=SCHEMA_PARAM)
    return str(grammar)


class JsonGrammar:
    """Masks every token that would leave the grammar; once the value is complete only an end token is left."""

    def __init__(self, tokenizer: Any, grammar: str, prompt_len: int):
        import llguidance

        self.matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        self.n_vocab = int(tokenizer.vocab_size)
        self.prompt_len = prompt_len

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if input_ids.shape[1] > self.prompt_len:  # the token sampled last step
            self.matcher.consume_token(int(input_ids[0, -1]))
        if self.matcher.is_error():
            raise BadRequest(f"{SCHEMA_PARAM}: the grammar failed ({self.matcher.get_error()})", param=SCHEMA_PARAM)
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = torch.zeros(scores.shape[-1], dtype=torch.bool)
        n = min(self.n_vocab, scores.shape[-1])
        allowed[:n] = torch.from_numpy(bits[:n].astype(bool))
        return scores.masked_fill(~allowed.to(scores.device), float("-inf"))


class RawLogprobs:
    """Keeps the log-softmax of the model's logits at each step, before any penalty, mask or temperature."""

    def __init__(self) -> None:
        self.last: Any = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        self.last = torch.log_softmax(scores[0].float(), dim=-1).cpu()
        return scores

    def of(self, token: int, top: int, piece: Any) -> TokenLogprob:
        """The token's logprob and the `top` likeliest tokens at the step that chose it, best first."""
        return token_logprob(self.last, token, top, piece)


def token_logprob(row: Any, token: int, top: int, piece: Any) -> TokenLogprob:
    """A token's entry from one step's log-softmax row: its logprob and the `top` likeliest tokens, best first."""
    import torch

    def entry(t: int) -> TopLogprob:
        data: bytes = piece(t)
        return TopLogprob(data.decode("utf-8", errors="replace"), float(row[t]), data)

    best = [entry(int(t)) for t in torch.topk(row, top).indices] if top > 0 else []
    own = entry(token)
    return TokenLogprob(own.token, own.logprob, own.bytes, best)


class OpenAIPenalties:
    """OpenAI's presence and frequency penalties over the tokens generated so far (input_ids past prompt_len)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        generated = input_ids[:, self.prompt_len :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


class SeededSampler:
    """Samples from the warped distribution with the request's own torch.Generator and leaves only that token.

    `generate` samples from torch's global generator, which a batch running beside it draws from too,
    so a seed set there would not repeat. With this last in the list, `generate` runs greedy and takes
    the one token left; the warpers are generate's own, in its order.
    """

    def __init__(self, seed: int, temperature: float, top_k: int, top_p: float, min_p: float, device: Any):
        import torch
        from transformers import (
            LogitsProcessorList,
            MinPLogitsWarper,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.generator = torch.Generator(device=device).manual_seed(seed)
        warpers: list[Any] = []
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k > 0:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        if min_p > 0:
            warpers.append(MinPLogitsWarper(min_p))
        self.warpers = LogitsProcessorList(warpers)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        probs = torch.softmax(self.warpers(input_ids, scores).float(), dim=-1)
        choice = torch.multinomial(probs, num_samples=1, generator=self.generator)
        return torch.full_like(scores, float("-inf")).scatter_(1, choice, 0.0)
