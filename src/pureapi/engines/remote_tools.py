"""Tool calls through an upstream: the choice it is sent, and its calls written back as text pureapi parses.

pureapi parses a reply's tool calls from its text, in the format the engine declares (tool_format). An
upstream parses them itself and streams them as `delta.tool_calls`, so the remote engine declares Hermes
and writes each call the upstream made as a Hermes call; the API layers then treat it like any other
model's. A forced call (tool_choice required or named) reaches the engine as the prefix that opens the
call and the schema of the calls allowed (tools.forced_schema): the upstream is asked for the same.
"""

from __future__ import annotations

import json
from typing import Any

from ..tools import HERMES


def upstream_choice(prefix: str, schema: dict[str, Any] | None) -> str | dict[str, Any]:
    """OpenAI's tool_choice for the upstream: auto, or the one function (or any) a forced call may name."""
    if not prefix:
        return "auto"
    names = [c["properties"]["name"]["const"] for c in (schema or {}).get("anyOf", [schema])] if schema else []
    if len(names) == 1:
        return {"type": "function", "function": {"name": names[0]}}
    return "required"


class UpstreamCalls:
    """The calls an upstream streams (OpenAI's delta.tool_calls: pieces by index), as Hermes text at the end."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, str]] = {}

    def feed(self, deltas: list[dict[str, Any]]) -> None:
        """Add one event's tool-call pieces."""
        for delta in deltas:
            call = self._calls.setdefault(int(delta.get("index", 0)), {"name": "", "arguments": ""})
            function = delta.get("function") or {}
            call["name"] += function.get("name") or ""
            call["arguments"] += function.get("arguments") or ""

    def text(self, forced: bool) -> str:
        """The calls as Hermes text; a forced reply's first call follows the opening the prompt ended with."""
        parts = []
        for i, (_, call) in enumerate(sorted(self._calls.items())):
            name = json.dumps(call["name"], ensure_ascii=False)
            try:
                arguments = json.dumps(json.loads(call["arguments"] or "{}"), ensure_ascii=False)
            except json.JSONDecodeError:
                # A call cut off (max_tokens): written as it came, it parses as no call and stays text.
                arguments = call["arguments"]
            body = f'{{"name": {name}, "arguments": {arguments}}}'
            opening = "" if forced and i == 0 else HERMES.opening + "\n"
            closing = "" if forced and i == len(self._calls) - 1 else "\n" + HERMES.closing
            parts.append(opening + body + closing)
        return "\n".join(parts)
