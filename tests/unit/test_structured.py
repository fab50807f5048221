"""Schemas that check_schema lets through are ones both grammar converters build (no weights needed)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

from pureapi.engines.llamacpp.sampling import grammar_of
from pureapi.errors import BadRequest
from pureapi.structured import JSON_OBJECT, MAX_SCHEMA_NODES, check_schema


class Pet(BaseModel):
    kind: str
    name: str | None = None


class Person(BaseModel):
    name: str
    pets: list[Pet]


ACCEPTED: list[dict[str, Any]] = [
    JSON_OBJECT,
    Person.model_json_schema(),  # $defs, $ref, anyOf for Optional, titles and defaults
    {"type": ["string", "null"]},
    {"type": "array", "prefixItems": [{"type": "integer"}, {"const": "x"}]},
    {"type": "array", "items": {"enum": [1, "two", None]}, "minItems": 1, "maxItems": 3},
    {"type": "string", "pattern": "^[a-z]{2,4}-[0-9]+$"},
    {"type": "string", "minLength": 1, "maxLength": 5, "description": "short"},
    {"type": "object", "properties": {"at": {"type": "string", "format": "date-time"}}, "additionalProperties": False},
    {"type": "object", "additionalProperties": {"type": "number"}},
    {"definitions": {"n": {"type": "integer"}}, "$ref": "#/definitions/n"},
]


@pytest.mark.parametrize("schema", ACCEPTED)
def test_accepted_schemas_compile_for_both_engines(schema: dict[str, Any]) -> None:
    import llguidance

    check_schema(schema, "s")
    assert "root ::=" in grammar_of(schema)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, None)
    assert not failed, messages


@pytest.mark.parametrize("pattern", ["^(?=a)b$", "^a[$"])
def test_a_pattern_the_converter_cannot_build_is_a_400(pattern: str) -> None:
    schema = {"type": "string", "pattern": pattern}
    check_schema(schema, "s")  # anchored: the keyword check cannot tell
    with pytest.raises(BadRequest, match="cannot be turned into a grammar") as info:
        grammar_of(schema)
    assert info.value.param == "response_format.json_schema.schema"


def test_boolean_subschemas_and_the_size_bound() -> None:
    check_schema({"type": "object", "properties": {"any": True, "none": False}}, "s")
    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(MAX_SCHEMA_NODES)}}
    with pytest.raises(BadRequest, match="more than"):
        check_schema(wide, "s")
    with pytest.raises(BadRequest, match="must be a JSON object"):
        check_schema([], "s")
