"""An OpenAPI 3.1 description of every API surface, built from the app's routes and the contract each declares."""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify
from pydantic import BaseModel, TypeAdapter

from .. import __version__
from . import declared  # noqa: F401  (fills the contracts of routes that do not carry theirs yet)
from .common import SessionId
from .docs import Envelope, Operation, operation_of

bp = Blueprint("openapi", __name__)

# Routes the document leaves out: itself, and the chat page with its files.
UNDOCUMENTED = {"openapi.openapi_json", "web.index", "web.asset", "static"}

SEED_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}
OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
ANTHROPIC_ERROR = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}
ERROR_BODIES: dict[Envelope, dict[str, Any]] = {
    "seed": SEED_ERROR,
    "openai": OPENAI_ERROR,
    "anthropic": ANTHROPIC_ERROR,
}
ERROR_TEXTS = {
    400: "Bad request",
    401: "Missing or wrong API key",
    403: "Not an admin key",
    404: "Not found",
    409: "Id taken, or Idempotency-Key reused with another request",
    413: "Body too large",
    415: "Not JSON",
    429: "The tenant's limit is reached (generations in flight or tokens per minute); Retry-After says when",
    503: "Model loading or server busy",
}

# Each server-sent event: a `data:` line holding JSON ("[DONE]" ends an OpenAI stream), named on some surfaces.
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
}

# Path parameters with a shape of their own; any other is a plain string.
PATH_TYPES: dict[str, Any] = {"session_id": SessionId}


class _Spec:
    """The components the operations refer to, gathered as they are described."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def ref(self, model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            self.components[name] = sub
        self.components[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    def json(self, model: type[BaseModel] | None, error: Envelope) -> dict[str, Any]:
        schema = self.ref(model) if model is not None else ERROR_BODIES[error]
        return {"application/json": {"schema": schema}}

    def operation(self, op: Operation, path_names: list[str]) -> dict[str, Any]:
        """One operation object of the document."""
        out: dict[str, Any] = {"summary": op.summary}
        parameters = [_path_parameter(name) for name in path_names]
        if op.query is not None:
            schema = op.query.model_json_schema()
            required = set(schema.get("required", ()))
            parameters += [
                {"name": name, "in": "query", "required": name in required, "schema": sub}
                for name, sub in schema["properties"].items()
            ]
        parameters += list(op.parameters)
        if parameters:
            out["parameters"] = parameters
        if op.body is not None:
            out["requestBody"] = {"required": op.body_required, "content": self.json(op.body, op.envelope)}
        content: dict[str, Any] = {}
        if op.ok is not None:
            content |= self.json(op.ok, op.envelope)
        if op.stream is not None:
            refs = ", ".join(self.ref(m)["$ref"] for m in op.events)
            described = f"{op.stream} Event models: {refs}." if refs else op.stream
            content["text/event-stream"] = {"schema": {**SSE_EVENT, "description": described}}
        content |= op.content or {}
        success: dict[str, Any] = {"description": op.answer}
        if content:
            success["content"] = content
        responses = {str(op.status): success}
        for status in op.errors:
            responses[str(status)] = {"description": ERROR_TEXTS[status], "content": self.json(None, op.envelope)}
        for status, (description, model) in op.responses.items():
            responses[str(status)] = {"description": description, "content": self.json(model, op.envelope)}
        out["responses"] = responses
        return out


def _path_parameter(name: str) -> dict[str, Any]:
    kind = PATH_TYPES.get(name)
    schema = TypeAdapter(kind).json_schema() if kind is not None else {"type": "string"}
    return {"name": name, "in": "path", "required": True, "schema": schema}


def undocumented(app: Flask) -> list[str]:
    """The rules (with their methods) that neither carry nor were declared with a contract."""
    missing = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint in UNDOCUMENTED:
            continue
        if operation_of(rule.endpoint, app.view_functions[rule.endpoint]) is None:
            missing.append(f"{sorted(rule.methods or ())} {rule.rule}")
    return missing


def build_spec(app: Flask | None = None) -> dict[str, Any]:
    """The OpenAPI document of the app's routes (the current app's by default)."""
    app = app or current_app
    spec = _Spec()
    paths: dict[str, Any] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint in UNDOCUMENTED:
            continue
        op = operation_of(rule.endpoint, app.view_functions[rule.endpoint])
        if op is None:
            raise LookupError(f"{rule.rule} ({rule.endpoint}) declares no contract; see api/docs.py")
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        names = [str(argument) for argument in re.findall(r"<(?:\w+:)?(\w+)>", rule.rule)]
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            paths.setdefault(path, {})[method.lower()] = spec.operation(op, names)
    return {
        "openapi": "3.1.0",
        "info": {"title": "pureapi", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": spec.components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


@bp.get("/openapi.json")
def openapi_json() -> Response:
    return jsonify(build_spec())
