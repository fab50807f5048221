"""Chat templates from GGUF metadata, rendered in a Jinja2 sandbox the way transformers renders them.

A GGUF's `tokenizer.chat_template` is code from whoever made the file, so it runs in an
ImmutableSandboxedEnvironment with the same options, helpers and filters as transformers'
`apply_chat_template` (and llama-cpp-python's Jinja2ChatFormatter): identical prompts, identical tokens.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..tools import template_tool_calls
from ..types import Message


class _GenerationTag(jinja2.ext.Extension):
    """Accepts HF's `{% generation %}...{% endgeneration %}` (assistant-mask markers) as a no-op."""

    tags = {"generation"}  # noqa: RUF012 (jinja reads this class attribute)

    def parse(self, parser: Any) -> Any:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """A compiled chat template; `render(messages)` returns the prompt text with the generation prompt."""

    def __init__(self, source: str, bos_token: str, eos_token: str):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self._template = env.from_string(source)
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """Render the conversation (with the tools the model may call) and the assistant's generation prompt."""
        return self._template.render(
            messages=messages,
            tools=tools,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            add_generation_prompt=add_generation_prompt,
        )


def _as_dict(message: Message, holder: str) -> dict[str, Any]:
    """A message as a template reads it, its content replaced by a placeholder (empty content stays empty:
    templates test `if message.content` on an assistant's tool calls)."""
    out: dict[str, Any] = {"role": message.role, "content": holder if message.content else ""}
    if message.tool_calls:
        out["tool_calls"] = template_tool_calls(message.tool_calls)
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        out["name"] = message.name
    return out


_PLACEHOLDER = "\u27e6pureapi-{nonce}-{i}\u27e7"


def continues(messages: Sequence[Message]) -> bool:
    """Whether the prompt continues the final message (an assistant's prefill) rather than starting a reply."""
    return bool(messages) and messages[-1].role == "assistant" and bool(messages[-1].content)


def render_segments(
    render: Callable[[list[dict[str, Any]], bool], str], messages: Sequence[Message]
) -> list[tuple[bool, str]]:
    """Render a chat template with placeholders for the content, then split the result.

    render(messages, add_generation_prompt) is the template. Returns (is_user_text, text) pieces in
    order, so that an engine can tokenize the template's own text with special tokens parsed and the
    messages' text with special tokens as plain text: a user who types `<|im_start|>` gets those
    characters, not a control token. A final assistant message with text is continued (transformers'
    continue_final_message): rendered without a generation prompt and cut right after its text.
    """
    nonce = secrets.token_hex(6)
    holders = [_PLACEHOLDER.format(nonce=nonce, i=i) for i in range(len(messages))]
    continuing = continues(messages)
    rendered = render([_as_dict(m, h) for m, h in zip(messages, holders, strict=True)], not continuing)
    if continuing:
        rendered = rendered[: rendered.rindex(holders[-1]) + len(holders[-1])]
    pattern = re.compile("\u27e6pureapi-" + nonce + r"-(\d+)\u27e7")
    pieces: list[tuple[bool, str]] = []
    pos = 0
    for match in pattern.finditer(rendered):
        if match.start() > pos:
            pieces.append((False, rendered[pos : match.start()]))
        content = messages[int(match.group(1))].content
        if content:
            pieces.append((True, content))
        pos = match.end()
    if pos < len(rendered):
        pieces.append((False, rendered[pos:]))
    return pieces


class HFTokenized:
    """encode_chat and encode_text through an HF tokenizer's own chat template (the transformers and vLLM
    engines): the template's text with special tokens parsed, the messages' text with special tokens as
    plain text, then the prefix. The engine sets self.tokenizer and self._tok_lock."""

    tokenizer: Any
    _tok_lock: threading.Lock  # HF tokenizers keep truncation state: one thread at a time

    def encode_chat(
        self, messages: Sequence[Message], tools: list[dict[str, Any]] | None = None, prefix: str = ""
    ) -> list[int]:
        def render(msgs: list[dict[str, Any]], generation_prompt: bool) -> str:
            return str(
                self.tokenizer.apply_chat_template(
                    msgs, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
                )
            )

        ids: list[int] = []
        with self._tok_lock:
            for is_user_text, text in [*render_segments(render, messages), (False, prefix)]:
                enc = self.tokenizer(text, add_special_tokens=False, split_special_tokens=is_user_text)
                ids.extend(enc["input_ids"])
        return ids

    def encode_text(self, text: str) -> list[int]:
        with self._tok_lock:
            return list(self.tokenizer(text, add_special_tokens=True, split_special_tokens=False)["input_ids"])
