"""Contracts of routes whose files do not carry them yet (their blueprints are being changed elsewhere).

Each moves beside its route, as `@documented(Operation(...))` under the route's decorator, once its
file is free; until then it is declared here by endpoint name.
"""

from __future__ import annotations

from . import anthropic, conversations, responses, sessions
from .docs import BODY_ERRORS, DECLARED, GENERATION_ERRORS, Operation

_NOT_FOUND = (400, 401, 404)
_NO_SESSION = {404: ("No such session", None)}
_STORED = (400, 401, 404, 503)

DECLARED.update(
    {
        "anthropic.messages": Operation(
            "Anthropic-compatible Messages API (stateless)",
            "anthropic",
            GENERATION_ERRORS,
            body=anthropic.MessagesRequest,
            ok=anthropic.MessageResponse,
            answer="The message, or its named SSE events",
            stream="Named events: message_start, then per block (text or tool_use, indices from 0) "
            "content_block_start, content_block_delta per piece (text_delta or input_json_delta), "
            "content_block_stop, with ping after the first start; message_delta and message_stop last; a "
            "failure is an `error` event in the error envelope.",
            events=(
                anthropic.MessageStart,
                anthropic.ContentBlockStart,
                anthropic.ContentBlockDelta,
                anthropic.ContentBlockStop,
                anthropic.MessageDelta,
            ),
        ),
        "anthropic.count_tokens": Operation(
            "Count a Messages request's prompt tokens (chat template included)",
            "anthropic",
            BODY_ERRORS,
            body=anthropic.CountTokensRequest,
            ok=anthropic.TokenCount,
            answer="The count",
        ),
        "sessions.list_directory": Operation(
            "Sessions, newest first, paged",
            "openai",
            (400, 401),
            query=sessions.ListQuery,
            ok=sessions.SessionList,
            answer="A page",
        ),
        "sessions.create_session": Operation(
            "Create a session",
            "openai",
            (400, 401, 409, 413, 415),
            body=sessions.CreateSession,
            body_required=False,
            ok=sessions.SessionObject,
            status=201,
            answer="The session",
        ),
        "sessions.get_session": Operation(
            "A session with its messages",
            "openai",
            _NOT_FOUND,
            ok=sessions.SessionWithMessages,
            answer="The session",
            responses=_NO_SESSION,
        ),
        "sessions.update_session": Operation(
            "Set a session's title, metadata or system prompt",
            "openai",
            (400, 401, 404, 413, 415),
            body=sessions.SessionFields,
            ok=sessions.SessionObject,
            answer="The session",
            responses=_NO_SESSION,
        ),
        "sessions.delete_session": Operation(
            "Delete a session", "openai", _NOT_FOUND, answer="Deleted", responses=_NO_SESSION
        ),
        "sessions.fork_session": Operation(
            "Copy a session's first rounds into a new session",
            "openai",
            (400, 401, 404, 409, 413, 415),
            body=sessions.ForkSession,
            body_required=False,
            ok=sessions.SessionObject,
            status=201,
            answer="The session",
            responses=_NO_SESSION,
        ),
        "responses.create_response": Operation(
            "Create a response, optionally continuing a stored one or a conversation",
            "openai",
            GENERATION_ERRORS,
            body=responses.ResponseRequest,
            ok=responses.ResponseObject,
            answer="The response, or its named SSE events",
            stream="Named events, each data object carrying its type and sequence_number: response.created, "
            "response.in_progress, output item and content part added, response.output_text.delta per piece, "
            "for each function call its output_item.added, response.function_call_arguments.delta and .done, "
            "output_item.done, the message's done events, then response.completed (or incomplete); a failure is "
            "`error`, then response.failed.",
            responses={404: ("Unknown previous response or conversation", None)},
        ),
        "responses.get_response": Operation(
            "A stored response", "openai", _STORED, ok=responses.ResponseObject, answer="The response"
        ),
        "responses.delete_response": Operation(
            "Forget a stored response", "openai", _STORED, ok=responses.ResponseDeleted, answer="Deleted"
        ),
        "responses.input_items": Operation(
            "A stored response's input items",
            "openai",
            _STORED,
            query=responses.ListQuery,
            ok=responses.ItemList,
            answer="A page of items",
        ),
        "conversations.create": Operation(
            "Create a conversation",
            "openai",
            _STORED,
            body=conversations.ConversationCreate,
            body_required=False,
            ok=conversations.ConversationObject,
            answer="The conversation",
        ),
        "conversations.retrieve": Operation(
            "A conversation", "openai", _STORED, ok=conversations.ConversationObject, answer="The conversation"
        ),
        "conversations.update": Operation(
            "Replace a conversation's metadata",
            "openai",
            _STORED,
            body=conversations.ConversationUpdate,
            ok=conversations.ConversationObject,
            answer="The conversation",
        ),
        "conversations.delete": Operation(
            "Delete a conversation and its items",
            "openai",
            _STORED,
            ok=conversations.ConversationDeleted,
            answer="Deleted",
        ),
        "conversations.list_items": Operation(
            "A page of a conversation's items",
            "openai",
            _STORED,
            query=responses.ListQuery,
            ok=responses.ItemList,
            answer="A page of items",
        ),
        "conversations.add_items": Operation(
            "Append items",
            "openai",
            _STORED,
            body=conversations.ItemsCreate,
            ok=responses.ItemList,
            answer="The items added",
        ),
        "conversations.retrieve_item": Operation("One item", "openai", _STORED, answer="The item"),
        "conversations.delete_item": Operation(
            "Remove one item", "openai", _STORED, ok=conversations.ConversationObject, answer="The conversation"
        ),
    }
)
