"""GET /v1/tenants: an admin's view of every tenant (API key): its role, limits, usage and stored state."""

from __future__ import annotations

from typing import Literal

from flask import Blueprint, Response, current_app, jsonify
from pydantic import BaseModel

from ..errors import Forbidden
from ..security import principal
from ..tenants import ANONYMOUS, Principal
from .docs import Operation, documented

bp = Blueprint("tenants", __name__, url_prefix="/v1/tenants")


class TenantUsage(BaseModel):
    """What a tenant has used since the server started, and holds now."""

    in_flight: int
    requests: int
    rejected: int
    prompt_tokens: int
    completion_tokens: int
    tokens_last_minute: int
    sessions: int
    responses: int
    conversations: int


class TenantObject(BaseModel):
    """One tenant: its name (never its key), role and limits (0: none)."""

    name: str
    object: Literal["tenant"] = "tenant"
    admin: bool
    max_concurrent: int
    tokens_per_minute: int
    usage: TenantUsage


class TenantList(BaseModel):
    """GET /v1/tenants."""

    object: Literal["list"] = "list"
    data: list[TenantObject]


@bp.get("")
@documented(
    Operation(
        "Every tenant (API key) with its role, limits, usage and stored state: an admin key only",
        "openai",
        (401, 403),
        ok=TenantList,
        answer="The tenants",
    )
)
def list_tenants() -> Response:
    if not principal().admin:
        raise Forbidden("only an admin key may list tenants (see --admin-key and the key file's admin option)")
    state = current_app.extensions["pureapi"]
    usage = state.limits.usage()
    # The configured principals, and the anonymous one: it owns what was stored before keys were set.
    principals = [*state.keys.principals(), Principal(ANONYMOUS)]
    data = []
    for who in principals:
        counts = usage.get(who.name, {})
        responses, conversations = state.responses.store.counts(who.owner)
        data.append(
            TenantObject(
                name=who.name,
                admin=who.admin,
                max_concurrent=who.max_concurrent,
                tokens_per_minute=who.tokens_per_minute,
                usage=TenantUsage(
                    in_flight=counts.get("in_flight", 0),
                    requests=counts.get("requests", 0),
                    rejected=counts.get("rejected", 0),
                    prompt_tokens=counts.get("prompt_tokens", 0),
                    completion_tokens=counts.get("completion_tokens", 0),
                    tokens_last_minute=counts.get("tokens_last_minute", 0),
                    sessions=state.store.count_sessions(who.owner),
                    responses=responses,
                    conversations=conversations,
                ),
            )
        )
    return jsonify(TenantList(data=data).model_dump())
