"""Access control: API keys, the Host-header check against DNS rebinding, and opt-in CORS."""

from __future__ import annotations

import ipaddress
import re

from flask import Flask, g, has_request_context, request

from .errors import BadRequest, Forbidden, ForbiddenHost, Unauthorized
from .settings import Settings
from .tenants import ANONYMOUS, NAME, TENANT_HEADER, Keyring, Principal

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


def principal() -> Principal:
    """Who sent the request being served (the anonymous principal without keys, or outside a request)."""
    found = g.get("principal") if has_request_context() else None
    return found if found is not None else Principal(ANONYMOUS)


def owner() -> str:
    """Whose sessions, responses and conversations the request reaches: its principal's, or the tenant an
    admin named in X-Tenant."""
    found = g.get("owner") if has_request_context() else None
    return found if found is not None else principal().owner


def install(app: Flask, settings: Settings, keys: Keyring) -> None:
    """Register the checks that run before every request."""
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
        if not keys:
            g.principal = keys.anonymous()
            _act_for(g.principal)
            return
        if is_open or request.method == "OPTIONS":
            return
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        if not given:  # Anthropic's clients send the key in x-api-key
            given = request.headers.get("x-api-key", "").strip().encode()
        found = keys.find(given)
        if found is None:
            raise Unauthorized("missing or invalid API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'")
        g.principal = found
        _act_for(found)
        if settings.kv_cache_scope == "key":
            # Cached KV is shared only among requests of one tenant: another cannot tell from response
            # times what was cached. The principal's name, never the key, so it survives a key rotation.
            g.cache_scope = found.name

    def _act_for(who: Principal) -> None:
        """An admin may name the tenant it acts for in X-Tenant; anyone else naming one is refused."""
        tenant = request.headers.get(TENANT_HEADER)
        if tenant is None:
            return
        if not who.admin:
            raise Forbidden(f"only an admin key may act for another tenant ({TENANT_HEADER})", param=TENANT_HEADER)
        tenant = tenant.strip()
        # Any well-formed name: a tenant whose key was removed still owns rows an admin may clean up.
        if not NAME.fullmatch(tenant):
            raise BadRequest(f"{TENANT_HEADER}: a tenant name is 1 to 64 letters, digits, _ . @ -", param=TENANT_HEADER)
        g.owner = "" if tenant == ANONYMOUS else tenant

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
                TENANT_HEADER,
            ],
            expose_headers=["X-Request-Id"],
            max_age=600,
        )
