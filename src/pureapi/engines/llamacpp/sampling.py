"""A request's llama.cpp sampler chain, in the order of llama.cpp's own common sampler, and its logprobs."""

from __future__ import annotations

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


def make_sampler(llc: Any, vocab: Any, p: SamplingParams) -> Any:
    """The grammar (if any), penalties, then the truncations, then temperature and a seeded draw (or greedy).

    The grammar comes first so that every later stage sees only tokens that keep the reply valid (a
    truncation before it could leave nothing but invalid tokens). Its end state admits end-of-generation,
    so a finished JSON value ends the reply.
    """
    chain = llc.llama_sampler_chain_init(llc.llama_sampler_chain_default_params())
    if p.json_schema is not None:
        grammar = llc.llama_sampler_init_grammar(vocab, grammar_of(p.json_schema).encode(), b"root")
        if not grammar:
            llc.llama_sampler_free(chain)
            raise BadRequest(f"{SCHEMA_PARAM}: llama.cpp cannot parse its grammar", param=SCHEMA_PARAM)
        llc.llama_sampler_chain_add(chain, grammar)
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
