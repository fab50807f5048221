"""An OpenAPI 3.1 description of both API surfaces, generated from their pydantic schemas."""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, Response, jsonify
from pydantic import BaseModel

from .. import __version__
from . import anthropic, completions, conversations, openai, responses, seed, sessions

bp = Blueprint("openapi", __name__)


class _Spec:
    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def ref(self, model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            self.components[name] = sub
        self.components[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}


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


SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(error: dict[str, Any], *codes: int) -> dict[str, Any]:
    texts = {400: "Bad request", 401: "Missing or wrong API key", 413: "Body too large", 415: "Not JSON"}
    texts |= {404: "No such session", 409: "Id taken, or Idempotency-Key reused with another request"}
    texts |= {503: "Model loading or server busy"}
    return {str(c): {"description": texts[c], "content": _json(error)} for c in codes}


def build_spec() -> dict[str, Any]:
    """The OpenAPI document."""
    spec = _Spec()
    body_errors = (400, 401, 413, 415, 503)
    # Each server-sent event: a `data:` line holding JSON ("[DONE]" ends an OpenAI stream).
    sse = {"text/event-stream": {"schema": SSE_EVENT}}
    chunk = spec.ref(openai.ChatCompletionChunk)
    openai_sse = {
        "text/event-stream": {
            "schema": {
                **SSE_EVENT,
                "description": f"Each event's data: a ChatCompletionChunk ({chunk['$ref']}) or an error; then [DONE].",
            }
        }
    }
    chat_ok = {"description": "The reply", "content": {**_json(spec.ref(seed.ChatResponse)), **sse}}
    paths: dict[str, Any] = {
        "/chat": {
            "post": {
                "summary": "Chat in a server-side session",
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "description": "A retry with the same key on the same session returns the stored reply.",
                        "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"},
                    }
                ],
                "requestBody": {"required": True, "content": _json(spec.ref(seed.ChatRequest))},
                "responses": {"200": chat_ok, **_errors(SEED_ERROR, *body_errors, 409)},
            }
        },
        "/reset": {
            "post": {
                "summary": "Clear a session's history",
                "requestBody": {"required": False, "content": _json(spec.ref(seed.ResetRequest))},
                "responses": {"200": {"description": "Cleared"}, **_errors(SEED_ERROR, *body_errors)},
            }
        },
        "/status": {
            "get": {
                "summary": "Model and session status",
                "parameters": [
                    {
                        "name": "session_id",
                        "in": "query",
                        "required": False,
                        "schema": seed.StatusQuery.model_json_schema()["properties"]["session_id"],
                    }
                ],
                "responses": {
                    "200": {"description": "Status", "content": _json(spec.ref(seed.StatusResponse))},
                    **_errors(SEED_ERROR, 400, 401, 503),
                },
            }
        },
        "/health": {
            "get": {
                "summary": "200 once the model answers, 503 before",
                "responses": {"200": {"description": "Healthy"}, "503": {"description": "Loading"}},
            }
        },
        "/v1/chat/completions": {
            "post": {
                "summary": "OpenAI-compatible chat completion (stateless)",
                "requestBody": {"required": True, "content": _json(spec.ref(openai.ChatCompletionRequest))},
                "responses": {
                    "200": {
                        "description": "A completion, or SSE chunks ending in [DONE]",
                        "content": {**_json(spec.ref(openai.ChatCompletion)), **openai_sse},
                    },
                    **_errors(OPENAI_ERROR, *body_errors),
                },
            }
        },
        "/v1/completions": {
            "post": {
                "summary": "OpenAI-compatible text completion of a raw prompt (no chat template; stateless)",
                "requestBody": {"required": True, "content": _json(spec.ref(completions.CompletionRequest))},
                "responses": {
                    "200": {
                        "description": "A completion, or SSE events (each a Completion) ending in [DONE]",
                        "content": {**_json(spec.ref(completions.Completion)), **sse},
                    },
                    **_errors(OPENAI_ERROR, *body_errors),
                },
            }
        },
        "/v1/models": {
            "get": {
                "summary": "The served model",
                "responses": {
                    "200": {"description": "Model list", "content": _json(spec.ref(openai.ModelList))},
                    **_errors(OPENAI_ERROR, 401, 503),
                },
            }
        },
    }
    paths |= _sessions_paths(spec)
    paths |= _anthropic_paths(spec, body_errors)
    paths["/metrics"] = {
        "get": {
            "summary": "Prometheus metrics (text exposition format)",
            "responses": {"200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}},
        }
    }
    paths.update(_stateful_paths(spec, body_errors, sse))
    return {
        "openapi": "3.1.0",
        "info": {"title": "pureapi", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": spec.components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
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


def _anthropic_paths(spec: _Spec, body_errors: tuple[int, ...]) -> dict[str, Any]:
    """Anthropic's Messages API."""
    events = [
        spec.ref(m)["$ref"].rsplit("/", 1)[1]
        for m in (
            anthropic.MessageStart,
            anthropic.ContentBlockStart,
            anthropic.ContentBlockDelta,
            anthropic.ContentBlockStop,
            anthropic.MessageDelta,
        )
    ]
    named_sse = {
        "text/event-stream": {
            "schema": {
                **SSE_EVENT,
                "description": f"Named events: {', '.join(events)}, with ping after content_block_start and "
                "message_stop last; a failure is an `error` event in the error envelope.",
            }
        }
    }
    return {
        "/v1/messages": {
            "post": {
                "summary": "Anthropic-compatible Messages API (stateless)",
                "requestBody": {"required": True, "content": _json(spec.ref(anthropic.MessagesRequest))},
                "responses": {
                    "200": {
                        "description": "The message, or its named SSE events",
                        "content": {**_json(spec.ref(anthropic.MessageResponse)), **named_sse},
                    },
                    **_errors(ANTHROPIC_ERROR, *body_errors),
                },
            }
        },
        "/v1/messages/count_tokens": {
            "post": {
                "summary": "Count a Messages request's prompt tokens (chat template included)",
                "requestBody": {"required": True, "content": _json(spec.ref(anthropic.CountTokensRequest))},
                "responses": {
                    "200": {"description": "The count", "content": _json(spec.ref(anthropic.TokenCount))},
                    **_errors(ANTHROPIC_ERROR, *body_errors),
                },
            }
        },
    }


def _sessions_paths(spec: _Spec) -> dict[str, Any]:
    """The sessions API's operations."""
    sid = {
        "name": "session_id",
        "in": "path",
        "required": True,
        "schema": seed.StatusQuery.model_json_schema()["properties"]["session_id"]["anyOf"][0],
    }
    one = {"description": "The session", "content": _json(spec.ref(sessions.SessionObject))}
    list_query = sessions.ListQuery.model_json_schema()["properties"]
    return {
        "/v1/sessions": {
            "get": {
                "summary": "Sessions, newest first, paged",
                "parameters": [
                    {"name": name, "in": "query", "required": False, "schema": schema}
                    for name, schema in list_query.items()
                ],
                "responses": {
                    "200": {"description": "A page", "content": _json(spec.ref(sessions.SessionList))},
                    **_errors(OPENAI_ERROR, 400, 401),
                },
            },
            "post": {
                "summary": "Create a session",
                "requestBody": {"required": False, "content": _json(spec.ref(sessions.CreateSession))},
                "responses": {"201": one, **_errors(OPENAI_ERROR, 400, 401, 409, 413, 415)},
            },
        },
        "/v1/sessions/{session_id}": {
            "get": {
                "summary": "A session with its messages",
                "parameters": [sid],
                "responses": {
                    "200": {"description": "The session", "content": _json(spec.ref(sessions.SessionWithMessages))},
                    **_errors(OPENAI_ERROR, 400, 401, 404),
                },
            },
            "patch": {
                "summary": "Set a session's title, metadata or system prompt",
                "parameters": [sid],
                "requestBody": {"required": True, "content": _json(spec.ref(sessions.SessionFields))},
                "responses": {"200": one, **_errors(OPENAI_ERROR, 400, 401, 404, 413, 415)},
            },
            "delete": {
                "summary": "Delete a session",
                "parameters": [sid],
                "responses": {"200": {"description": "Deleted"}, **_errors(OPENAI_ERROR, 400, 401, 404)},
            },
        },
        "/v1/sessions/{session_id}/fork": {
            "post": {
                "summary": "Copy a session's first rounds into a new session",
                "parameters": [sid],
                "requestBody": {"required": False, "content": _json(spec.ref(sessions.ForkSession))},
                "responses": {"201": one, **_errors(OPENAI_ERROR, 400, 401, 404, 409, 413, 415)},
            }
        },
    }


def _stateful_paths(spec: _Spec, body_errors: tuple[int, ...], sse: dict[str, Any]) -> dict[str, Any]:
    """The Responses and Conversations APIs."""
    errors = _errors(OPENAI_ERROR, 400, 401, 503) | {
        "404": {"description": "Not found", "content": _json(OPENAI_ERROR)}
    }

    def ok(model: type[BaseModel], description: str) -> dict[str, Any]:
        return {"200": {"description": description, "content": _json(spec.ref(model))}, **errors}

    def body(model: type[BaseModel], required: bool = True) -> dict[str, Any]:
        return {"required": required, "content": _json(spec.ref(model))}

    paging = [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in responses.ListQuery.model_json_schema()["properties"].items()
    ]
    paths: dict[str, Any] = {
        "/v1/responses": {
            "post": {
                "summary": "Create a response, optionally continuing a stored one or a conversation",
                "requestBody": body(responses.ResponseRequest),
                "responses": {
                    "200": {
                        "description": "The response, or its named SSE events",
                        "content": {**_json(spec.ref(responses.ResponseObject)), **sse},
                    },
                    **_errors(OPENAI_ERROR, *body_errors),
                    "404": {"description": "Unknown previous response or conversation", "content": _json(OPENAI_ERROR)},
                },
            }
        },
        "/v1/responses/{response_id}": {
            "get": {"summary": "A stored response", "responses": ok(responses.ResponseObject, "The response")},
            "delete": {"summary": "Forget a stored response", "responses": ok(responses.ResponseDeleted, "Deleted")},
        },
        "/v1/responses/{response_id}/input_items": {
            "get": {
                "summary": "A stored response's input items",
                "parameters": paging,
                "responses": ok(responses.ItemList, "A page of items"),
            }
        },
        "/v1/conversations": {
            "post": {
                "summary": "Create a conversation",
                "requestBody": body(conversations.ConversationCreate, required=False),
                "responses": ok(conversations.ConversationObject, "The conversation"),
            }
        },
        "/v1/conversations/{conversation_id}": {
            "get": {"summary": "A conversation", "responses": ok(conversations.ConversationObject, "The conversation")},
            "post": {
                "summary": "Replace a conversation's metadata",
                "requestBody": body(conversations.ConversationUpdate),
                "responses": ok(conversations.ConversationObject, "The conversation"),
            },
            "delete": {
                "summary": "Delete a conversation and its items",
                "responses": ok(conversations.ConversationDeleted, "Deleted"),
            },
        },
        "/v1/conversations/{conversation_id}/items": {
            "get": {
                "summary": "A page of a conversation's items",
                "parameters": paging,
                "responses": ok(responses.ItemList, "A page of items"),
            },
            "post": {
                "summary": "Append items",
                "requestBody": body(conversations.ItemsCreate),
                "responses": ok(responses.ItemList, "The items added"),
            },
        },
        "/v1/conversations/{conversation_id}/items/{item_id}": {
            "get": {"summary": "One item", "responses": {"200": {"description": "The item"}, **errors}},
            "delete": {
                "summary": "Remove one item",
                "responses": ok(conversations.ConversationObject, "The conversation"),
            },
        },
    }
    for path, item in paths.items():
        names = re.findall(r"{(\w+)}", path)
        if names:
            item["parameters"] = [
                {"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names
            ]
    return paths


@bp.get("/openapi.json")
def openapi_json() -> Response:
    return jsonify(build_spec())
