"""The chat page at `/`: static files shipped in the package, no build step, nothing fetched from elsewhere."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, send_from_directory

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
bp = Blueprint("web", __name__)


@bp.get("/")
def index() -> Response:
    return _file("index.html")


@bp.get("/web/<path:name>")
def asset(name: str) -> Response:
    return _file(name)


def _file(name: str) -> Response:
    # send_from_directory refuses paths that leave the folder (404), and names the right content type.
    response = send_from_directory(WEB_DIR, name, max_age=0)
    # The page talks only to this server: no inline scripts, no other origins.
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
