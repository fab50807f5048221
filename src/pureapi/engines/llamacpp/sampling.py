"""A request's llama.cpp sampler chain, in the order of llama.cpp's own common sampler, and its logprobs."""

from __future__ import annotations

import ctypes
import functools
import json
from collections.abc import Callable
from typing import Any

import numpy as np

from ...errors import BadRequest
from ...types import SamplingParams, TokenLogprob, TopLogprob

PENALTY_LAST_N = 64  # tokens the repeat/presence/frequency penalties look back over (llama.cpp's default)
SCHEMA_PARAM = "response_format.json_schema.schema"


def grammar_of(schema: dict[str, Any]) -> str:
    """The GBNF grammar of a JSON schema (llama-cpp-python's port of llama.cpp's converter); cached."""
    return _gbnf(json.dumps(schema))  # key order kept: it is the order of the properties


@functools.lru_cache(maxsize=64)
def _gbnf(schema: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return str(json_schema_to_gbnf(schema))
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        # check_schema let it through, but the converter cannot build it (an unsupported regex, a bad $ref).
        raise BadRequest(f"{SCHEMA_PARAM}: cannot be turned into a grammar ({exc})", param=SCHEMA_PARAM) from None


_CANDIDATE = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data


class Sampler:
    """A request's sampler chain, and its grammar kept apart from the chain.

    llama.cpp's common sampler's shortcut: the chain picks a token from the raw candidates and only
    that token is checked against the grammar; the grammar filters the whole vocabulary (a pass over
    every token's text) only when it rejects the pick. Greedy, that is the token masking first would
    give; sampled with temperature alone, it is rejection sampling from the masked distribution; with
    top_k/top_p/min_p the truncation sees the unmasked candidates first (as in llama.cpp). A finished
    JSON value admits only end-of-generation.
    """

    def __init__(self, llc: Any, vocab: Any, p: SamplingParams):
        self.llc = llc
        self.chain = _chain(llc, vocab, p)
        self.grammar = None
        if p.json_schema is not None:
            self.grammar = llc.llama_sampler_init_grammar(vocab, grammar_of(p.json_schema).encode(), b"root")
            if not self.grammar:
                llc.llama_sampler_free(self.chain)
                raise BadRequest(f"{SCHEMA_PARAM}: llama.cpp cannot parse its grammar", param=SCHEMA_PARAM)
            self.n_vocab = int(llc.llama_vocab_n_tokens(vocab))
            self._ids = np.arange(self.n_vocab, dtype=np.int32)
            self._candidates = np.zeros(self.n_vocab, dtype=_CANDIDATE)

    def sample(self, ctx: Any, out: int) -> int:
        """Sample (and accept) the next token from the logits of batch output `out`."""
        llc = self.llc
        if self.grammar is None:
            return int(llc.llama_sampler_sample(self.chain, ctx, out))
        logits = np.ctypeslib.as_array(llc.llama_get_logits_ith(ctx, out), shape=(self.n_vocab,))
        token = self._pick(logits, masked=False)
        if not self._allowed(token):
            token = self._pick(logits, masked=True)
        llc.llama_sampler_accept(self.grammar, token)
        llc.llama_sampler_accept(self.chain, token)
        return token

    def _pick(self, logits: Any, masked: bool) -> int:
        llc, c = self.llc, self._candidates
        c["id"], c["logit"], c["p"] = self._ids, logits, 0.0
        data = c.ctypes.data_as(ctypes.POINTER(llc.llama_token_data))
        candidates = llc.llama_token_data_array(data, self.n_vocab, -1, False)
        if masked:
            llc.llama_sampler_apply(self.grammar, ctypes.byref(candidates))
        llc.llama_sampler_apply(self.chain, ctypes.byref(candidates))
        return int(candidates.data[candidates.selected].id)

    def _allowed(self, token: int) -> bool:
        llc = self.llc
        one = llc.llama_token_data(token, 1.0, 0.0)
        candidates = llc.llama_token_data_array(ctypes.pointer(one), 1, -1, False)
        llc.llama_sampler_apply(self.grammar, ctypes.byref(candidates))
        return bool(np.isfinite(candidates.data[0].logit))

    def free(self) -> None:
        """Release the llama.cpp samplers."""
        self.llc.llama_sampler_free(self.chain)
        if self.grammar:
            self.llc.llama_sampler_free(self.grammar)


def make_sampler(llc: Any, vocab: Any, p: SamplingParams) -> Sampler:
    """The request's sampler: its grammar (if it has a schema) and its chain."""
    return Sampler(llc, vocab, p)


def _chain(llc: Any, vocab: Any, p: SamplingParams) -> Any:
    """Penalties, then the truncations, then temperature and a seeded draw (or greedy at temperature 0)."""
    chain = llc.llama_sampler_chain_init(llc.llama_sampler_chain_default_params())
    if p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
        n_vocab = llc.llama_vocab_n_tokens(vocab)
        penalties = llc.llama_sampler_init_penalties(
            n_vocab, PENALTY_LAST_N, p.repeat_penalty, p.frequency_penalty, p.presence_penalty
        )
        llc.llama_sampler_chain_add(chain, penalties)
    if p.temperature <= 0:
        llc.llama_sampler_chain_add(chain, llc.llama_sampler_init_greedy())
        return chain
    if p.top_k > 0:
        llc.llama_sampler_chain_add(chain, llc.llama_sampler_init_top_k(p.top_k))
    if p.top_p < 1.0:
        llc.llama_sampler_chain_add(chain, llc.llama_sampler_init_top_p(p.top_p, 1))
    if p.min_p > 0:
        llc.llama_sampler_chain_add(chain, llc.llama_sampler_init_min_p(p.min_p, 1))
    llc.llama_sampler_chain_add(chain, llc.llama_sampler_init_temp(p.temperature))
    seed = llc.LLAMA_DEFAULT_SEED if p.seed is None else p.seed & 0xFFFFFFFF
    llc.llama_sampler_chain_add(chain, llc.llama_sampler_init_dist(seed))
    return chain


def log_softmax(logits: Any, n_vocab: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The raw model's log-probabilities (before penalties, grammar and temperature) from a logits row."""
    row = np.ctypeslib.as_array(logits, shape=(n_vocab,))
    top = float(row.max())
    out: np.ndarray[Any, np.dtype[np.float32]] = row - np.float32(top + np.log(np.exp(row - top).sum()))
    return out


def token_logprob(
    logprobs: np.ndarray[Any, np.dtype[np.float32]], token: int, top: int, piece: Callable[[int], bytes]
) -> TokenLogprob:
    """The token's logprob with the `top` likeliest tokens, best first (OpenAI's top_logprobs)."""

    def entry(t: int) -> TopLogprob:
        data = piece(t)
        return TopLogprob(data.decode("utf-8", errors="replace"), float(logprobs[t]), data)

    best: list[TopLogprob] = []
    if top > 0:
        ids = np.argpartition(-logprobs, top - 1)[:top]
        best = [entry(int(t)) for t in ids[np.argsort(-logprobs[ids], kind="stable")]]
    own = entry(token)
    return TokenLogprob(own.token, own.logprob, own.bytes, best)
