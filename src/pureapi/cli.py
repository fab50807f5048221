"""Command line: `pureapi serve` runs the server, `pureapi chat` the client, `pull`/`models` manage models."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from . import __version__
from .settings import add_settings_arguments, settings_from_args


def serve_parser(prog: str = "pureapi serve") -> argparse.ArgumentParser:
    """The `serve` flags, built from Settings."""
    parser = argparse.ArgumentParser(prog=prog, description="Serve a chat model over HTTP (seed API + OpenAI API).")
    add_settings_arguments(parser)
    return parser


def run_serve(argv: list[str] | None = None, prog: str = "pureapi serve") -> int:
    """Parse serve flags and run the server."""
    ns = serve_parser(prog).parse_args(argv)
    try:
        settings = settings_from_args(ns)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        print(f"{prog}: --{str(err['loc'][0]).replace('_', '-')}: {err['msg']}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if settings.log_level != "debug":  # downloads log every HTTP request at info; progress bars say enough
        for noisy in ("httpx", "httpx2", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    from .server import serve

    return serve(settings)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pureapi` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="pureapi", description="pureapi: a chat API server for Qwen and Llama models."
    )
    parser.add_argument("--version", action="version", version=f"pureapi {__version__}")
    commands = ["serve", "chat", "pull", "models"]
    parser.add_argument(
        "command",
        choices=commands,
        help="serve: run the server; chat: interactive client; pull: download a model; models: list the catalogue",
    )
    if not argv or argv[0] not in commands:
        parser.parse_args(argv[:1])  # prints usage / version and exits
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return run_serve(rest)
    if command in ("pull", "models"):
        from .models import commands as model_commands

        return model_commands.pull(rest) if command == "pull" else model_commands.models(rest)
    from .client import main as client_main

    return client_main(rest)
