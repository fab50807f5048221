"""Request ids and logs: every response carries X-Request-Id, and every log line of a request names it."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask, Response

REQUEST_ID_HEADER = "X-Request-Id"
# A client's id is echoed back only if it is short and plain: no spaces, quotes or control
# characters that could forge a log line or a header.
_SANE_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")

access_log = logging.getLogger("pureapi.access")


def request_id() -> str | None:
    """The current request's id, or None outside a request.

    Flask is not imported here: logging is configured before the app exists (the model starts loading
    in between), and until Flask is imported there is no request to name. The loader thread can log
    while the main thread is still half-way through importing Flask, so a module without
    has_request_context yet counts as no request."""
    has_context = getattr(sys.modules.get("flask"), "has_request_context", None)
    if has_context is None or not has_context():
        return None
    rid: str | None = sys.modules["flask"].g.get("request_id")
    return rid


class RequestIdFilter(logging.Filter):
    """Stamps every record with the id of the request it was logged in ('-' outside requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id() or "-"
        return True


# Attributes every LogRecord has; whatever else a record carries was passed as `extra` and goes into JSON.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "request_id"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(level: str, fmt: str = "text") -> None:
    """Set up the root logger: plain text for people, or one JSON object a line (--log-format json)."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def install(app: Flask) -> None:
    """Give each request an id (the client's if sane, else a new one), echo it, and log the access line."""
    from flask import g, request

    @app.before_request
    def _assign() -> None:
        given = request.headers.get(REQUEST_ID_HEADER, "")
        g.request_id = given if _SANE_ID.fullmatch(given) else uuid.uuid4().hex
        g.started = time.monotonic()

    @app.after_request
    def _stamp(response: Response) -> Response:
        rid = g.get("request_id") or uuid.uuid4().hex
        response.headers[REQUEST_ID_HEADER] = rid
        fields = {
            "request_id": rid,
            "method": request.method,
            "path": request.path,
            "status": response.status_code,
        }
        started = g.get("started", time.monotonic())

        # A streamed body is still being produced: log when the server is done with it, so the
        # duration covers the whole reply.
        def done() -> None:
            ms = round((time.monotonic() - started) * 1000, 1)
            access_log.info(
                "%s %s %d %.1fms", fields["method"], fields["path"], fields["status"], ms, extra={**fields, "ms": ms}
            )

        if response.is_streamed:
            response.call_on_close(done)
        else:
            done()
        return response
