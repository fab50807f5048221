"""Reading server-sent events back in tests: one parser instead of a copy per test."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

DONE = "[DONE]"


def sse_data(body: Any) -> list[str]:
    """The `data:` payloads of an SSE body: text, bytes, a Flask test response or a requests response."""
    if hasattr(body, "get_data"):
        body = body.get_data(as_text=True)
    elif hasattr(body, "text") and not isinstance(body, (str, bytes)):
        body = body.text
    if isinstance(body, bytes):
        body = body.decode()
    return data_lines(body.splitlines())


def data_lines(lines: Iterable[str | bytes]) -> list[str]:
    """The payloads of the `data:` lines among lines read one by one (requests' iter_lines)."""
    out = []
    for line in lines:
        text = line.decode() if isinstance(line, bytes) else line
        if text.startswith("data: "):
            out.append(text[len("data: ") :])
    return out


def sse_events(body: Any) -> list[Any]:
    """The JSON events of an SSE body, with OpenAI's closing [DONE] left as the string."""
    return [d if d == DONE else json.loads(d) for d in sse_data(body)]
