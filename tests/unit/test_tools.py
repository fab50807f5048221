"""The tool-call parser and the forced-call schema, without a model."""

from __future__ import annotations

import json

import pytest

from pureapi.tools import HERMES, LLAMA3_JSON, ToolCallParser, detect_format, forced_schema
from pureapi.types import ToolCall


def parse(fmt, text: str, pieces: int = 0, parallel: bool = True):  # type: ignore[no-untyped-def]
    """Text and calls of a reply fed whole (pieces=0) or in pieces of that many characters."""
    parser = ToolCallParser(fmt, parallel)
    size = pieces or len(text) or 1
    items = [item for i in range(0, len(text), size) for item in parser.feed(text[i : i + size])]
    items += parser.finish()
    content = "".join(i for i in items if isinstance(i, str))
    return content, [(c.name, json.loads(c.arguments)) for c in items if isinstance(c, ToolCall)]


QWEN_TWO = (
    'Let me look.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "time", "arguments": {"zone": "CET"}}\n</tool_call>'
)


@pytest.mark.parametrize("pieces", [0, 1, 3, 7])
def test_hermes_calls_are_parsed_whole_or_streamed(pieces: int) -> None:
    content, calls = parse(HERMES, QWEN_TWO, pieces)
    assert calls == [("weather", {"city": "Paris"}), ("time", {"zone": "CET"})]
    assert content.strip() == "Let me look."


def test_without_parallel_only_the_first_call_is_kept() -> None:
    _, calls = parse(HERMES, QWEN_TWO, parallel=False)
    assert calls == [("weather", {"city": "Paris"})]


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>\n{not json}\n</tool_call>",
        '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',  # arguments not an object
        '<tool_call>\n{"name": "f", "arguments": {"a": 1',  # cut off
    ],
)
def test_a_malformed_call_stays_text(text: str) -> None:
    for pieces in (0, 2):
        assert parse(HERMES, text, pieces) == (text, [])


def test_text_that_only_looks_like_an_opening_is_passed_on() -> None:
    text = "use <tool> or <tool_cal tags"
    assert parse(HERMES, text, 1) == (text, [])


def test_an_unclosed_call_at_the_end_still_parses() -> None:
    assert parse(HERMES, '<tool_call>\n{"name": "f", "arguments": {}}')[1] == [("f", {})]


@pytest.mark.parametrize("pieces", [0, 1, 5])
def test_llama3_json_calls(pieces: int) -> None:
    text = '{"name": "weather", "parameters": {"city": "Paris"}}'
    assert parse(LLAMA3_JSON, text, pieces) == ("", [("weather", {"city": "Paris"})])
    two = text + '; {"name": "time", "parameters": {}}'
    assert parse(LLAMA3_JSON, "<|python_tag|>" + two, pieces)[1] == [("weather", {"city": "Paris"}), ("time", {})]


def test_hermes_also_reads_calls_without_their_tags() -> None:
    text = '{"name": "f", "arguments": {"a": 1}}\n{"name": "g", "arguments": {}}'
    assert parse(HERMES, text, 4) == ("", [("f", {"a": 1}), ("g", {})])
    assert parse(HERMES, '{"answer": 42}', 4) == ('{"answer": 42}', [])
    cut = '{"name": "f", "arguments": {"a": 1}}\n{"name": "g", "argu'
    assert parse(HERMES, cut, 4) == (cut, [])


def test_llama3_prose_and_bad_json_stay_text() -> None:
    assert parse(LLAMA3_JSON, "Paris is sunny {today}.", 2) == ("Paris is sunny {today}.", [])
    assert parse(LLAMA3_JSON, '{"temp": 20}', 2) == ('{"temp": 20}', [])


def test_arguments_written_as_a_json_string_are_accepted() -> None:
    text = '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>'
    assert parse(HERMES, text)[1] == [("f", {"a": 1})]


def test_formats_are_detected_from_the_template() -> None:
    assert detect_format("{% for m in messages %}{{ m.content }}{% endfor %}") is None
    assert detect_format("{% if tools %}<tool_call>{% endif %}") is HERMES
    assert detect_format("{% if tools %}{{ tools | tojson }}{% endif %}") is LLAMA3_JSON


def test_forced_schema_is_one_call_to_one_of_the_functions() -> None:
    params = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    one = forced_schema([("weather", params)], HERMES)
    assert one["properties"] == {"name": {"const": "weather"}, "arguments": params}
    both = forced_schema([("weather", params), ("time", {"type": "object"})], LLAMA3_JSON)
    assert [c["properties"]["name"]["const"] for c in both["anyOf"]] == ["weather", "time"]
    assert "parameters" in both["anyOf"][0]["required"]
