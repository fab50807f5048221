"""The application factory: `create_app(settings, engine=None, store=None)`."""

from __future__ import annotations

import logging
from dataclasses import InitVar, dataclass, field
from typing import Any

from flask import Flask, Response, g, has_request_context, jsonify, request
from werkzeug.exceptions import HTTPException

from .api.anthropic import PATH as ANTHROPIC_PATH
from .api.anthropic import error_body as anthropic_error
from .chat.directory import SessionDirectory
from .chat.gateway import Caller, Gateway
from .chat.response_store import ResponseStore
from .chat.responses import ResponseService
from .chat.sessions import SessionService
from .chat.store import SessionStore, SQLiteStore
from .engines.base import Engine
from .errors import PureAPIError
from .metrics import Metrics
from .settings import Settings
from .tenants import Keyring, TenantLimits

log = logging.getLogger(__name__)


@dataclass
class AppState:
    """What the routes reach through current_app.extensions['pureapi']."""

    settings: Settings
    store: SessionStore
    engine: Engine | None = None
    load_seconds: float | None = None  # how long the engine took to load, once it has
    gateway: Gateway = field(init=False)
    sessions: SessionService = field(init=False)
    directory: SessionDirectory = field(init=False)
    metrics: Metrics = field(init=False)
    responses: ResponseService = field(init=False)
    keys: Keyring = field(init=False)
    given_keys: InitVar[Keyring | None] = None  # else read from the settings' flags and key file
    limits: TenantLimits = field(init=False)

    def __post_init__(self, given_keys: Keyring | None) -> None:
        from . import security

        settings = self.settings
        self.keys = Keyring.of(settings) if given_keys is None else given_keys
        self.limits = TenantLimits()
        self.metrics = Metrics(self)

        def caller() -> Caller:
            scope = g.get("cache_scope", "") if has_request_context() else ""
            return Caller(security.principal(), security.owner(), scope)

        self.gateway = Gateway(
            lambda: self.engine, settings.max_queue, caller=caller, limits=self.limits, metrics=self.metrics
        )
        self.sessions = SessionService(self.store, self.gateway, settings.max_rounds)
        self.directory = SessionDirectory(self.sessions)
        if not isinstance(self.store, SQLiteStore):
            raise TypeError("the Responses API keeps its state in the SQLite session store")
        self.responses = ResponseService(ResponseStore(self.store), self.sessions, self.settings.response_ttl)


def create_app(
    settings: Settings | None = None,
    engine: Engine | None = None,
    store: SessionStore | None = None,
    keys: Keyring | None = None,
) -> Flask:
    """Build the Flask app; the engine may be attached later (state.engine) once it has loaded. Without
    `keys`, the keys are read from the settings (raises KeyFileError)."""
    settings = settings or Settings()
    app = Flask("pureapi")
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep the documented key order
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    state = AppState(settings=settings, store=store or SQLiteStore(settings.db_path()), engine=engine, given_keys=keys)
    app.extensions["pureapi"] = state

    from . import logs, metrics, security
    from .api import anthropic, completions, conversations, openai, openapi, responses, seed, sessions, tenants, web

    logs.install(app)  # first, so that even a request the guard refuses has an id
    metrics.install(app, state.metrics)
    security.install(app, settings, state.keys)

    app.register_blueprint(seed.bp)
    app.register_blueprint(openai.bp)
    app.register_blueprint(completions.bp)
    app.register_blueprint(anthropic.bp)
    app.register_blueprint(responses.bp)
    app.register_blueprint(conversations.bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(sessions.bp)
    app.register_blueprint(tenants.bp)
    app.register_blueprint(web.bp)

    app.register_error_handler(PureAPIError, _pureapi_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    return app


def error_response(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    retry_after: int = 1,
) -> Response:
    """The error envelope of the surface the request came to: Anthropic's under /v1/messages, OpenAI's
    elsewhere under /v1, the seed's elsewhere."""
    body: dict[str, Any]
    if request.path == ANTHROPIC_PATH or request.path.startswith(ANTHROPIC_PATH + "/"):
        body = anthropic_error(status, message)
    elif request.path.startswith("/v1/") or request.path == "/v1":
        body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    else:
        body = {"error": message}
    response = jsonify(body)
    response.status_code = status
    if status in (429, 503):
        response.headers["Retry-After"] = str(retry_after)
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _pureapi_error(exc: PureAPIError) -> Response:
    if exc.status >= 500:
        log.warning("%s %s -> %d: %s", request.method, request.path, exc.status, exc.message)
    return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, getattr(exc, "retry_after", 1))


def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    messages = {
        404: f"no route {request.method} {request.path}",
        405: f"method {request.method} is not allowed on {request.path}",
        413: "request body is too large",
    }
    message = messages.get(status) or exc.description or exc.name
    type_ = "not_found_error" if status == 404 else "invalid_request_error" if status < 500 else "server_error"
    response = error_response(status, message, type_)
    if status == 405 and exc.get_response().headers.get("Allow"):
        response.headers["Allow"] = exc.get_response().headers["Allow"]
    return response


def _unexpected_error(exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.path)
    return error_response(500, f"internal server error ({type(exc).__name__})", "server_error")
