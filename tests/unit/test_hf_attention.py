"""The continuous batch's per-sequence attention against transformers' own: one masked SDPA over the packed batch."""

import torch
from torch import nn
from transformers.generation.continuous_batching.utils import build_attention_mask
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from pureapi.engines import hf_attention

HEADS, KV_HEADS, DIM = 6, 2, 16


class _Attention(nn.Module):
    num_key_value_groups = HEADS // KV_HEADS
    is_causal = True


def _packed(q_lens: list[int], k_lens: list[int]) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(1, HEADS, sum(q_lens), DIM, generator=gen)
    key = torch.randn(1, KV_HEADS, sum(k_lens), DIM, generator=gen)
    value = torch.randn(1, KV_HEADS, sum(k_lens), DIM, generator=gen)
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32)
    return query, key, value, cu_q, cu_k


def test_each_sequence_attends_as_the_block_mask_says() -> None:
    # a whole prompt, a chunk after 7 cached tokens, two decoding rows, and a padding row
    q_lens, k_lens = [5, 3, 1, 1, 0], [5, 10, 7, 12, 0]
    query, key, value, cu_q, cu_k = _packed(q_lens, k_lens)
    mask = torch.full((1, 1, sum(q_lens), sum(k_lens)), torch.finfo(torch.float32).min)  # as the batch resets it
    build_attention_mask(mask, cu_q.tolist(), cu_k.tolist())
    module = _Attention()
    kwargs = {"cu_seq_lens_q": cu_q, "cu_seq_lens_k": cu_k, "max_length_q": 5, "max_length_k": 12}

    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25, **kwargs)
    got, weights = hf_attention.varlen_sdpa(module, query, key, value, mask, scaling=0.25, **kwargs)

    assert weights is None
    assert got.shape == expected.shape == (1, sum(q_lens), HEADS, DIM)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_calls_without_sequence_offsets_go_to_transformers_sdpa() -> None:
    query, key, value, _, _ = _packed([4], [4])
    module = _Attention()
    expected, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.25, is_causal=True)
    got, _ = hf_attention.varlen_sdpa(module, query, key, value, None, scaling=0.25, is_causal=True)
    assert torch.equal(got, expected)


def test_a_sliding_window_layer_goes_to_transformers_sdpa() -> None:
    query, key, value, cu_q, cu_k = _packed([2, 1], [6, 4])
    mask = torch.full((1, 1, 3, 10), torch.finfo(torch.float32).min)
    build_attention_mask(mask, cu_q.tolist(), cu_k.tolist(), sliding_window=3)
    kwargs = {"cu_seq_lens_q": cu_q, "cu_seq_lens_k": cu_k, "sliding_window": 3}
    module = _Attention()
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25, **kwargs)
    got, _ = hf_attention.varlen_sdpa(module, query, key, value, mask, scaling=0.25, **kwargs)
    assert torch.equal(got, expected)


def test_install_replaces_sdpa_once() -> None:
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    try:
        hf_attention.install()
        hf_attention.install()
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is hf_attention.varlen_sdpa
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = original
