"""Tool calling: which call format a chat template speaks, the grammar of a forced call, and the parser
that turns a reply (whole or streamed) into text and tool calls.

A template that mentions `<tool_call>` speaks the Hermes format Qwen2.5 uses (`<tool_call>\\n{"name": ...,
"arguments": {...}}\\n</tool_call>`, possibly several); one that renders `tools` otherwise is taken to
speak Llama 3.1's (a bare JSON object `{"name": ..., "parameters": {...}}`, the `<|python_tag|>` before it
being a control token that never reaches the text). A template that never mentions `tools` has no tool
support at all.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from .types import Message, ToolCall


@dataclass(frozen=True)
class ToolFormat:
    """How a model writes a call: inside opening/closing tags (Hermes) or as the whole reply (Llama 3.1)."""

    name: str
    opening: str  # "" : the reply itself is the call's JSON
    closing: str
    arguments_key: str  # the key a forced call's grammar uses for the arguments

    @property
    def forced_prefix(self) -> str:
        """Text put at the end of the prompt (as the start of the reply) when a call is forced."""
        return self.opening + "\n" if self.opening else ""


HERMES = ToolFormat("hermes", "<tool_call>", "</tool_call>", "arguments")
LLAMA3_JSON = ToolFormat("llama3-json", "", "", "parameters")
PYTHON_TAG = "<|python_tag|>"


def detect_format(template_source: str) -> ToolFormat | None:
    """The call format a chat template speaks, or None when it cannot render tools."""
    if "tools" not in template_source:
        return None
    if HERMES.opening in template_source:
        return HERMES
    return LLAMA3_JSON


def forced_schema(functions: Sequence[tuple[str, dict[str, Any]]], fmt: ToolFormat) -> dict[str, Any]:
    """The JSON schema of one call to one of (name, parameters schema): what a forced reply is held to."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, fmt.arguments_key: parameters},
            "required": ["name", fmt.arguments_key],
            "additionalProperties": False,
        }
        for name, parameters in functions
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def new_call_id() -> str:
    """An id for a tool call, in OpenAI's shape."""
    return f"call_{uuid.uuid4().hex[:24]}"


def _calls_in(text: str, names: frozenset[str] | None = None) -> list[ToolCall] | None:
    """The calls a JSON text holds (one object, or several one after another, `;` or newlines between),
    each to one of names where they are given; None when it is anything else."""
    decoder = json.JSONDecoder()
    calls: list[ToolCall] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        call = _call_of(obj)
        if call is None or (names is not None and call.name not in names):
            return None
        calls.append(call)
        pos = end
        while pos < len(text) and text[pos] in " \t\r\n;":
            pos += 1
    return calls or None


def _call_of(obj: Any) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string, as OpenAI sends them
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(new_call_id(), obj["name"], json.dumps(args, ensure_ascii=False))


class ToolCallParser:
    """Splits a reply, fed piece by piece, into text and tool calls.

    Text is passed on as it comes, except what could be the start of a call, which is held back until
    it is one or is not; a reply that begins with `{` is held to its end and read as bare call objects.
    A call that does not parse (or, where names are given, calls no function of theirs) stays text
    (as the model wrote it). Without
    `parallel`, calls after the first are dropped. Once a call is seen, whitespace-only text between
    calls is dropped (it is the template's layout, not something the model said).
    """

    def __init__(self, fmt: ToolFormat, parallel: bool = True, names: frozenset[str] | None = None):
        self.fmt = fmt
        self.parallel = parallel
        self.names = names  # given: a call to any other function stays text
        self.calls: list[ToolCall] = []
        self._buf = ""
        self._in_call = False
        # "json": the reply began with `{`, so it is held to the end and read as bare call objects (Llama 3.1's
        # format; small Qwen models drop the tags too); "text": it did not (Hermes: calls in tags may follow).
        self._mode: str | None = None

    def feed(self, text: str) -> list[str | ToolCall]:
        """The text and calls that are certain after this piece."""
        return self._step(text, final=False)

    def finish(self) -> list[str | ToolCall]:
        """Whatever was held back, at the end of the reply."""
        return self._step("", final=True)

    def _step(self, text: str, final: bool) -> list[str | ToolCall]:
        self._buf += text
        out: list[str | ToolCall] = []
        if self._mode is None:
            head = self._head()
            if head and not (PYTHON_TAG.startswith(head) and not self.fmt.opening):
                self._mode = "json" if head.startswith("{") else "text"
            elif final:
                self._mode = "text"
        if self._mode == "json":
            if final:
                calls = _calls_in(self._head(), self.names)
                out.extend(calls if calls is not None else [self._buf])
                self._buf = ""
        elif self._mode == "text":
            if self.fmt.opening:
                self._tags(out, final)
            else:
                out.append(self._buf)
                self._buf = ""
        return self._tidy(out)

    def _head(self) -> str:
        head = self._buf.lstrip()
        if head.startswith(PYTHON_TAG):
            head = head[len(PYTHON_TAG) :].lstrip()
        return head

    def _tidy(self, out: list[str | ToolCall]) -> list[str | ToolCall]:
        kept: list[str | ToolCall] = []
        for item in out:
            if isinstance(item, ToolCall):
                if self.calls and not self.parallel:
                    continue
                self.calls.append(item)
            elif not item or (self.calls and not item.strip()):
                continue
            kept.append(item)
        return kept

    def _tags(self, out: list[str | ToolCall], final: bool) -> None:
        opening, closing = self.fmt.opening, self.fmt.closing
        while True:
            if not self._in_call:
                at = self._buf.find(opening)
                if at >= 0:
                    out.append(self._buf[:at])
                    self._buf = self._buf[at + len(opening) :]
                    self._in_call = True
                    continue
                keep = 0 if final else _partial_suffix(self._buf, opening)
                out.append(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep :]
                return
            at = self._buf.find(closing)
            if at < 0 and not final:
                return
            body = self._buf if at < 0 else self._buf[:at]
            calls = _calls_in(body, self.names)
            if calls is None:
                out.append(opening + body + ("" if at < 0 else closing))
            else:
                out.extend(calls)
            self._buf = "" if at < 0 else self._buf[at + len(closing) :]
            self._in_call = False
            if at < 0:
                return


def _partial_suffix(text: str, opening: str) -> int:
    """The length of the longest end of text that begins `opening` (held back: it may become one)."""
    for n in range(min(len(text), len(opening) - 1), 0, -1):
        if opening.startswith(text[-n:]):
            return n
    return 0


def template_tool_calls(message_calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """An assistant message's calls as chat templates read them (HF's convention: arguments as an object)."""
    rendered = []
    for call in message_calls:
        try:
            arguments: Any = json.loads(call.arguments)
        except json.JSONDecodeError:
            arguments = call.arguments
        rendered.append({"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}})
    return rendered


def unanswered_result(messages: Sequence[Message]) -> int | None:
    """The index of the first tool message that answers no call of an earlier assistant message, or None."""
    calls: set[str] = set()
    for i, m in enumerate(messages):
        if m.role == "assistant":
            calls.update(call.id for call in m.tool_calls)
        elif m.role == "tool" and m.tool_call_id not in calls:
            return i
    return None


def named_results(messages: Sequence[Message]) -> list[Message]:
    """The messages, each tool result naming the function of the call it answers (templates may show it)."""
    names: dict[str, str] = {}
    out: list[Message] = []
    for m in messages:
        names.update((call.id, call.name) for call in m.tool_calls)
        if m.role == "tool" and m.name is None and m.tool_call_id in names:
            m = replace(m, name=names[m.tool_call_id])
        out.append(m)
    return out
