"""A request's llama.cpp sampler chain, in the order of llama.cpp's own common sampler."""

from __future__ import annotations

from typing import Any

from ...types import SamplingParams

PENALTY_LAST_N = 64  # tokens the repeat/presence/frequency penalties look back over (llama.cpp's default)


def make_sampler(llc: Any, vocab: Any, p: SamplingParams) -> Any:
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
