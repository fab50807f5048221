"""OpenAI's Conversations API: /v1/conversations and their items, kept in the session store."""

from __future__ import annotations

from typing import Literal

from flask import Blueprint, Response, jsonify, request
from pydantic import BaseModel, Field, field_validator

from ..chat.responses import new_id
from ..errors import NotFound
from .common import json_body, sessions, validate
from .responses import InputItem, ItemList, ListQuery, Metadata, ok, service
from .strict import StrictBody

bp = Blueprint("conversations", __name__, url_prefix="/v1/conversations")

MAX_NEW_ITEMS = 20  # per request, as OpenAI
MAX_METADATA_KEYS = 16


def _check_metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is not None:
        if len(value) > MAX_METADATA_KEYS:
            raise ValueError(f"at most {MAX_METADATA_KEYS} keys")
        if any(len(k) > 64 or len(v) > 512 for k, v in value.items()):
            raise ValueError("keys are at most 64 characters, values at most 512")
    return value


class ConversationCreate(StrictBody):
    """Body of POST /v1/conversations."""

    metadata: Metadata | None = None
    items: list[InputItem] | None = Field(None, max_length=MAX_NEW_ITEMS)

    _metadata = field_validator("metadata")(_check_metadata)


class ConversationUpdate(StrictBody):
    """Body of POST /v1/conversations/{id}: the new metadata."""

    metadata: Metadata

    _metadata = field_validator("metadata")(_check_metadata)


class ItemsCreate(StrictBody):
    """Body of POST /v1/conversations/{id}/items."""

    items: list[InputItem] = Field(min_length=1, max_length=MAX_NEW_ITEMS)


class ConversationObject(BaseModel):
    """A conversation."""

    id: str
    object: Literal["conversation"] = "conversation"
    created_at: int
    metadata: dict[str, str]


class ConversationDeleted(BaseModel):
    """The answer to DELETE /v1/conversations/{id}."""

    id: str
    object: Literal["conversation.deleted"] = "conversation.deleted"
    deleted: bool = True


def _items(items: list[InputItem]) -> list[dict[str, object]]:
    return [item.item() for item in items]


@bp.post("")
def create() -> Response:
    body = validate(ConversationCreate, json_body(allow_empty=True))
    made = service().store.create_conversation(
        new_id("conv"), body.metadata or {}, _items(body.items or []), owner=sessions().owner()
    )
    return ok(ConversationObject.model_validate(made))


@bp.get("/<conversation_id>")
def retrieve(conversation_id: str) -> Response:
    return ok(ConversationObject.model_validate(service().conversation(conversation_id)))


@bp.post("/<conversation_id>")
def update(conversation_id: str) -> Response:
    body = validate(ConversationUpdate, json_body())
    updated = service().store.update_conversation(conversation_id, body.metadata, owner=sessions().owner())
    if updated is None:
        raise NotFound(f"conversation '{conversation_id}' not found")
    return ok(ConversationObject.model_validate(updated))


@bp.delete("/<conversation_id>")
def delete(conversation_id: str) -> Response:
    service().delete_conversation(conversation_id)
    return ok(ConversationDeleted(id=conversation_id))


@bp.get("/<conversation_id>/items")
def list_items(conversation_id: str) -> Response:
    query = validate(ListQuery, request.args.to_dict())
    page = service().store.items_page(conversation_id, query.limit, query.order, query.after, owner=sessions().owner())
    if page is None:
        raise NotFound(f"conversation '{conversation_id}' not found")
    return ok(ItemList.of(page.items, page.has_more))


@bp.post("/<conversation_id>/items")
def add_items(conversation_id: str) -> Response:
    body = validate(ItemsCreate, json_body())
    items = _items(body.items)
    if not service().store.add_items(conversation_id, items, owner=sessions().owner()):
        raise NotFound(f"conversation '{conversation_id}' not found")
    return ok(ItemList.of(items, False))


@bp.get("/<conversation_id>/items/<item_id>")
def retrieve_item(conversation_id: str, item_id: str) -> Response:
    service().conversation(conversation_id)
    item = service().store.item(conversation_id, item_id, owner=sessions().owner())
    if item is None:
        raise NotFound(f"item '{item_id}' not found in conversation '{conversation_id}'")
    return jsonify(item)


@bp.delete("/<conversation_id>/items/<item_id>")
def delete_item(conversation_id: str, item_id: str) -> Response:
    conversation = service().conversation(conversation_id)
    if not service().store.delete_item(conversation_id, item_id, owner=sessions().owner()):
        raise NotFound(f"item '{item_id}' not found in conversation '{conversation_id}'")
    return ok(ConversationObject.model_validate(conversation))
