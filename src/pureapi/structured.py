"""Structured output: which JSON schemas the engines can enforce while sampling, checked up front.

Both grammar engines (llama.cpp's JSON-schema-to-GBNF converter, llguidance for transformers)
silently skip keywords they cannot enforce (`minimum`, `not`, ...), so a reply would match a
looser schema than the client asked for. Rather than let that pass, a schema may use only the
keywords that both enforce; any other keyword is a 400 that names it.
"""

from __future__ import annotations

from typing import Any

from .errors import BadRequest

# Any JSON object: what response_format {"type": "json_object"} enforces.
JSON_OBJECT: dict[str, Any] = {"type": "object"}

# Keywords that describe a value without constraining it.
ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly", "writeOnly"}
)
# Keywords enforced by both engines.
ENFORCED = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "enum",
        "const",
        "anyOf",
        "$ref",
        "$defs",
        "definitions",
        "pattern",
        "minLength",
        "maxLength",
        "format",
    }
)
TYPES = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})
FORMATS = frozenset({"date", "time", "date-time", "uuid"})
MAX_SCHEMA_NODES = 2000  # the grammar grows with the schema; a bound keeps its compilation short


def check_schema(schema: Any, param: str) -> None:
    """Raise BadRequest naming the first keyword (or value) that cannot be enforced; `param` is its field."""
    if not isinstance(schema, dict):
        raise BadRequest(f"{param}: the schema must be a JSON object", param=param)
    pending: list[tuple[str, Any]] = [("", schema)]
    nodes = 0
    while pending:
        where, node = pending.pop()
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise BadRequest(f"{param}: the schema has more than {MAX_SCHEMA_NODES} subschemas", param=param)
        if isinstance(node, bool):
            continue  # true (anything) and false (nothing) are valid schemas
        if not isinstance(node, dict):
            raise BadRequest(f"{param}{where}: a schema must be an object or a boolean", param=param)
        for key, value in node.items():
            _check_keyword(param, f"{where}.{key}", key, value, pending)


def _check_keyword(param: str, at: str, key: str, value: Any, pending: list[tuple[str, Any]]) -> None:
    def refuse(why: str) -> None:
        raise BadRequest(f"{param}{at}: {why}", param=param)

    if key in ANNOTATIONS:
        return
    if key not in ENFORCED:
        refuse(f"the keyword '{key}' is not supported in structured output (it cannot be enforced while sampling)")
    if key == "type":
        types = value if isinstance(value, list) else [value]
        if not types or any(not isinstance(t, str) or t not in TYPES for t in types):
            refuse(f"type must be one of {', '.join(sorted(TYPES))} or a list of them")
    elif key in ("properties", "$defs", "definitions"):
        if not isinstance(value, dict):
            refuse("must be an object of schemas")
        pending.extend((f"{at}.{name}", sub) for name, sub in value.items())
    elif key in ("prefixItems", "anyOf"):
        if not isinstance(value, list) or not value:
            refuse("must be a non-empty list of schemas")
        pending.extend((f"{at}[{i}]", sub) for i, sub in enumerate(value))
    elif key in ("items", "additionalProperties"):
        if isinstance(value, list):
            refuse("must be a schema (use prefixItems for tuples)")
        pending.append((at, value))
    elif key == "required":
        if not isinstance(value, list) or any(not isinstance(name, str) for name in value):
            refuse("must be a list of property names")
    elif key == "enum":
        if not isinstance(value, list) or not value:
            refuse("must be a non-empty list")
    elif key in ("minItems", "maxItems", "minLength", "maxLength"):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 10_000:
            refuse("must be an integer from 0 to 10000")
    elif key == "$ref":
        if not isinstance(value, str) or not value.startswith("#/"):
            refuse("only local references ('#/$defs/...') are supported")
    elif key == "pattern":
        if not isinstance(value, str) or not (value.startswith("^") and value.endswith("$")):
            refuse("a pattern must be anchored: start with ^ and end with $")
    elif key == "format" and value not in FORMATS:
        refuse(f"the format {value!r} is not supported; supported: {', '.join(sorted(FORMATS))}")
