"""Sampling inside transformers' continuous batch: fast per-request processors, and the per-request
steps the manager lacks (a seed, min_p, repeat/presence/frequency penalties, logprobs).

The manager's own per-request processors are temperature, top-k and top-p; transformers' top-k and
top-p sort the whole vocabulary for every row at every step, which on a CPU costs more than the
model's forward pass for a small model. `TopK` and `TopP` sort only when some row asks for it,
top-k uses `topk`, and the draw is done only for the rows that sample (greedy rows are the runner's
argmax).

The other steps run per row, for the requests that ask for them, in `generate`'s order: raw
logprobs, then penalties (`_Steps`, first in the list), temperature, top-k, top-p, min_p, then the
draw (`TopP`, last), a seeded request drawing from its own generator. A processor sees only a
step's logits; which request each row belongs to comes from `prepare_tensor_args`, which the
manager calls once per step before the forward, with the requests that get a token, in row order
(`Rows` keeps that list). That holds only while steps run one after another: the Batcher checks
the manager runs without async batching or CUDA graphs before it sends such requests to the batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from transformers import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingTopKLogitsWarper,
    ContinuousBatchingTopPLogitsWarper,
)

from ..types import SamplingParams, TokenLogprob
from .hf_sampling import OpenAIPenalties, token_logprob


class RowSteps:
    """What one request asks beyond temperature, top-k and top-p, and its logprob rows not yet read."""

    def __init__(self, params: SamplingParams, prompt_len: int, device: Any):
        sampling = params.temperature > 0
        # Its own generator: every other sampling row draws from the global one, so a seed set there would not repeat.
        self.generator = None
        if sampling and params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.min_p: Any = MinPLogitsWarper(float(params.min_p)) if sampling and params.min_p > 0 else None
        penalties: list[Any] = []
        if params.repeat_penalty != 1.0:
            penalties.append(RepetitionPenaltyLogitsProcessor(float(params.repeat_penalty)))
        if params.presence_penalty or params.frequency_penalty:
            penalties.append(OpenAIPenalties(prompt_len, params.presence_penalty, params.frequency_penalty))
        self.penalties = penalties
        self.top_logprobs = params.logprobs
        # One log-softmax row per generated token, taken by the reader in order (deque: two threads, no lock).
        self.logprob_rows: deque[torch.Tensor] = deque()

    @staticmethod
    def wanted(params: SamplingParams) -> bool:
        """True when the request asks for any step the manager's own processors do not do."""
        return (
            (params.temperature > 0 and (params.seed is not None or params.min_p > 0))
            or params.repeat_penalty != 1.0
            or bool(params.presence_penalty or params.frequency_penalty)
            or params.logprobs is not None
        )

    def before_warpers(self, state: Any, row: torch.Tensor) -> torch.Tensor:
        """Keep the raw logprobs, then apply the penalties over the request's tokens so far."""
        if self.top_logprobs is not None:
            self.logprob_rows.append(torch.log_softmax(row.float(), dim=-1))
        if not self.penalties:
            return row
        # A soft reset moves generated tokens into initial_tokens; together they are always the whole sequence.
        history = torch.tensor([state.initial_tokens + state.generated_tokens], device=row.device)
        scores = row.unsqueeze(0)
        for penalty in self.penalties:
            scores = penalty(history, scores)
        return scores[0]

    def logprob_of(self, piece: Callable[[int], bytes]) -> Callable[[int], TokenLogprob] | None:
        """The streamer's hook: the next generated token's entry (None if the request asked for no logprobs)."""
        top = self.top_logprobs
        if top is None:
            return None
        return lambda token: token_logprob(self.logprob_rows.popleft(), token, top, piece)


class Rows:
    """Which request each row of a step's logits belongs to, for the requests with RowSteps."""

    def __init__(self) -> None:
        self.steps: dict[str, RowSteps] = {}  # request id -> its steps; set before the request is added
        self.special: list[tuple[int, Any, RowSteps]] = []  # this step's (row, request state, steps)

    def track(self, requests_with_new_token: list[Any]) -> None:
        if not self.steps:
            self.special = []
            return
        found = ((i, f.state, self.steps.get(f.state.request_id)) for i, f in enumerate(requests_with_new_token))
        self.special = [(i, state, steps) for i, state, steps in found if steps is not None]


class Steps:
    """First in the list: each special row's raw logprobs and penalties, before temperature (generate's order)."""

    def __init__(self, rows: Rows):
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for i, state, steps in self.rows.special:
            scores[i] = steps.before_warpers(state, scores[i])
        return scores


class TopK(ContinuousBatchingTopKLogitsWarper):
    """Per-row top-k that does nothing for rows keeping the whole vocabulary and uses topk(max k) for the others."""

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        rows, vocab = scores.shape
        k = tensor_arg[:rows].to(torch.int64).clamp(1, vocab)
        active = k < vocab
        if not bool(active.any()):
            return scores
        kmax = int(k[active].max())
        top = torch.topk(scores, kmax, dim=-1).values
        thresholds = top.gather(-1, (k.clamp(max=kmax) - 1).unsqueeze(-1))
        thresholds[~active] = float("-inf")
        return scores.masked_fill(scores < thresholds, self.filter_value)


class TopP(ContinuousBatchingTopPLogitsWarper):
    """Per-row top-p, min_p, then the draw for the rows that sample, leaving only the drawn token's logit finite.

    The manager's runner then takes the argmax of every row (the Batcher turns its `do_sample` off):
    greedy rows (top-p 0) cost nothing here, and a batch of greedy requests never computes a softmax
    over the vocabulary. The sort is skipped when no sampling row filters. Last in the list, it also
    records each step's rows for `Steps` (see the module's docstring).
    """

    def __init__(self, processor: TopPLogitsWarper, rows: Rows):
        super().__init__(processor)
        self.rows = rows

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        self.rows.track(requests_with_new_token)
        return super().prepare_tensor_args(requests_with_new_token)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        top_p = tensor_arg[: scores.size(0)].view(dtype=torch.float32)
        sampling = top_p > 0
        if not bool(sampling.any()):
            return scores
        filters = bool((top_p[sampling] < 1.0).any())
        # Top-p 0 keeps a greedy row's best token only; either way the rows below are written to a new tensor.
        scores = super().__call__(scores, tensor_arg) if filters else scores.clone()
        special = {i: steps for i, _state, steps in self.rows.special}
        picked = sampling.nonzero().flatten()
        for i, steps in special.items():
            if steps.min_p is not None:
                scores[i] = steps.min_p(picked, scores[i : i + 1])[0]  # input_ids: unused by min_p
        probs = torch.softmax(scores[picked].float(), dim=-1)
        drawn = torch.multinomial(probs, num_samples=1)
        for j, i in enumerate(picked.tolist()):
            generator = special[i].generator if i in special else None
            if generator is not None:
                drawn[j] = torch.multinomial(probs[j], num_samples=1, generator=generator)
        scores[picked] = torch.full_like(probs, float("-inf")).scatter_(1, drawn, 0.0).to(scores.dtype)
        return scores


def fast(processor: Any, rows: Rows) -> Any:
    """The fast-path version of one of the manager's per-request processors (others as they are)."""
    if type(processor) is ContinuousBatchingTopKLogitsWarper:
        return TopK(TopKLogitsWarper(processor.top_k, processor.filter_value, processor.min_tokens_to_keep))
    if type(processor) is ContinuousBatchingTopPLogitsWarper:
        return TopP(TopPLogitsWarper(processor.top_p, processor.filter_value, processor.min_tokens_to_keep), rows)
    return processor
