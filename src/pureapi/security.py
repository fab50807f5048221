"""Access control: API keys, the Host-header check against DNS rebinding, and opt-in CORS."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re

from flask import Flask, g, request

from .errors import ForbiddenHost, Unauthorized
from .settings import Settings

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
OPEN_PATHS = {"/health", "/"}  # the chat page holds no data; it asks for the key itself
OPEN_PREFIXES = ("/web/",)  # the page's scripts and styles


def is_loopback(host: str) -> bool:
    """True for localhost names and loopback addresses (127.0.0.0/8, ::1)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The host part of a Host header: 'example.com:5000' -> 'example.com', '[::1]:80' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def install(app: Flask, settings: Settings) -> None:
    """Register the checks that run before every request."""
    keys = [k.encode() for k in settings.api_key if k]
    allowed = {h.lower() for h in settings.allowed_hosts}
    check_host = is_loopback(settings.host) or bool(allowed)
    open_paths = OPEN_PATHS | ({"/metrics"} if settings.metrics_public else set())

    @app.before_request
    def _guard() -> None:
        if check_host:
            name = host_name(request.host)
            if not (name in allowed or "*" in allowed or (is_loopback(settings.host) and is_loopback(name))):
                raise ForbiddenHost(f"host '{name}' is not allowed (see --allowed-hosts)")
        is_open = request.path in open_paths or request.path.startswith(OPEN_PREFIXES)
        if not keys or is_open or request.method == "OPTIONS":
            return
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        if not given:  # Anthropic's clients send the key in x-api-key
            given = request.headers.get("x-api-key", "").strip().encode()
        # Compare against every key, always, in constant time: no early exit leaks which matched.
        matched = False
        for key in keys:
            matched |= hmac.compare_digest(given, key)
        if not matched:
            raise Unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'")
        if settings.kv_cache_scope == "key":
            # Cached KV is shared only among requests with this key (a hash: the key stays out of memory dumps).
            g.cache_scope = hashlib.sha256(given).hexdigest()[:16]

    if settings.cors_origins:
        from flask_cors import CORS

        # Only the listed origins are echoed back; an arbitrary Origin is never reflected. Each is
        # matched literally and whole: flask-cors would take one with [ or ( (an IPv6 origin) for a
        # regex, which need only match a prefix. "*" answers "*" itself rather than echoing the Origin.
        wildcard = "*" in settings.cors_origins
        origins: list[str | re.Pattern[str]] = (
            ["*"]
            if wildcard
            else [re.compile(re.escape(o.rstrip("/")) + r"\Z", re.IGNORECASE) for o in settings.cors_origins]
        )
        CORS(
            app,
            origins=origins,
            send_wildcard=wildcard,
            always_send=False,
            allow_headers=[
                "Authorization",
                "Content-Type",
                "X-Request-Id",
                "Idempotency-Key",
                "x-api-key",
                "anthropic-version",
                "anthropic-beta",
            ],
            expose_headers=["X-Request-Id"],
            max_age=600,
        )
