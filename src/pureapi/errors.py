"""One exception hierarchy; the API blueprints map it onto their wire formats."""

from __future__ import annotations


class PureAPIError(Exception):
    """Base of every error pureapi raises on purpose; carries its HTTP status."""

    status = 500
    type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class BadRequest(PureAPIError):
    """The request is malformed or a field is invalid."""

    status = 400
    type = "invalid_request_error"


class ContextOverflow(BadRequest):
    """The prompt (plus the requested reply) does not fit the model's context."""

    def __init__(self, message: str, *, param: str | None = "messages"):
        super().__init__(message, param=param, code="context_length_exceeded")


class Unauthorized(PureAPIError):
    """Missing or wrong API key."""

    status = 401
    type = "authentication_error"


class ForbiddenHost(PureAPIError):
    """The Host header names a host this server does not answer for."""

    status = 403
    type = "permission_error"


class NotFound(PureAPIError):
    """A named thing (a stored response, a conversation, an item) does not exist."""

    status = 404
    type = "invalid_request_error"


class Conflict(PureAPIError):
    """The request conflicts with the resource's state (an id taken, an Idempotency-Key reused differently)."""

    status = 409
    type = "invalid_request_error"


class Forbidden(PureAPIError):
    """The key is valid but may not do this (an admin's right)."""

    status = 403
    type = "permission_error"


class RateLimited(PureAPIError):
    """A tenant's limit (concurrent generations, tokens per minute) is reached; retry after retry_after seconds."""

    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: int, code: str | None = None):
        super().__init__(message, code=code)
        self.retry_after = retry_after


class UnsupportedMediaType(PureAPIError):
    """The body is not JSON."""

    status = 415
    type = "invalid_request_error"


class Overloaded(PureAPIError):
    """The work queue is full; the client should retry later."""

    status = 503
    type = "server_overloaded"


class NotReady(PureAPIError):
    """The model is not loaded (yet)."""

    status = 503
    type = "server_error"


class EngineError(PureAPIError):
    """The engine failed while generating."""

    status = 500
    type = "server_error"


class BadGateway(PureAPIError):
    """The upstream server (remote engine) is unreachable or failed."""

    status = 502
    type = "server_error"


class GatewayTimeout(PureAPIError):
    """The upstream server (remote engine) did not answer in time."""

    status = 504
    type = "server_error"


class Cancelled(PureAPIError):
    """The generation was cancelled (client went away, reset, shutdown)."""

    status = 499
    type = "cancelled"


class ModelLoadError(Exception):
    """The model could not be found or loaded; the message is one line naming it."""
