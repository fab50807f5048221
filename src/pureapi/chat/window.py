"""The history window: the newest rounds that fit the model's context with room left for the reply."""

from __future__ import annotations

from collections.abc import Callable, Sequence, Sized
from typing import TypeVar

from ..errors import ContextOverflow
from ..types import Message, Prompt

_Sized = TypeVar("_Sized", bound=Sized)  # a prompt: token ids or a ChatPrompt, both sized in tokens


def rounds_of(history: Sequence[Message]) -> list[list[Message]]:
    """Group a stored history into rounds, each opened by a user message and running to the next one, so
    that a tool call, its results and the answer after them are one round."""
    rounds: list[list[Message]] = []
    for message in history:
        if message.role == "user" or not rounds:
            rounds.append([])
        rounds[-1].append(message)
    return rounds


def open_round(
    rounds: Sequence[Sequence[Message]], tail: Sequence[Message]
) -> tuple[list[list[Message]], list[Message]]:
    """The rounds and the new messages, with the rounds the new messages continue (tool results answering
    their calls) moved into them: the window drops whole rounds, never a call apart from its result."""
    kept, rest = [list(r) for r in rounds], list(tail)
    while kept and (not rest or rest[0].role != "user"):
        rest = [*kept.pop(), *rest]
    return kept, rest


def fit_window(
    encode: Callable[[Sequence[Message]], Prompt],
    context_length: int,
    rounds: Sequence[Sequence[Message]],
    tail: Sequence[Message],
    max_tokens: int,
    prompt_param: str = "message",
    head: Sequence[Message] = (),
) -> Prompt:
    """Tokenize the newest rounds that fit the context with max_tokens left for the reply.

    prompt_param names the request field that holds the prompt, for the error of a prompt too long;
    head (a session's system prompt) always stays in front.
    """
    for start in range(len(rounds) + 1):
        messages = list(head) + [m for pair in rounds[start:] for m in pair] + list(tail)
        ids = encode(messages)
        if len(ids) + max_tokens <= context_length:
            return ids
    return fit_prompt(ids, context_length, max_tokens, prompt_param)


def fit_prompt(ids: _Sized, context_length: int, max_tokens: int, prompt_param: str = "prompt") -> _Sized:
    """The prompt's ids if they fit the context with max_tokens left for the reply; else ContextOverflow."""
    if len(ids) + max_tokens <= context_length:
        return ids
    if len(ids) >= context_length:
        raise ContextOverflow(
            f"the prompt is {len(ids)} tokens but the model's context is {context_length} tokens", param=prompt_param
        )
    raise ContextOverflow(
        f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's context "
        f"({context_length} tokens); lower max_tokens to at most {context_length - len(ids)}",
        param="max_tokens",
    )
