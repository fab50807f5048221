"""Shared fixtures: fake-engine apps for fast tests, real weights and real servers for the rest."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from pureapi.app import create_app
from pureapi.chat.store import SQLiteStore
from pureapi.engines.fake import FakeEngine
from pureapi.settings import Settings

from . import models

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class FakeApp:
    """A Flask test client over a scripted engine and a throwaway store."""

    app: Flask
    client: FlaskClient
    engine: FakeEngine
    store: SQLiteStore


MakeFakeApp = Callable[..., FakeApp]


@pytest.fixture
def make_fake_app(tmp_path: Path) -> Iterator[MakeFakeApp]:
    """Build apps over a FakeEngine and a SQLite file in tmp_path; every one is closed afterwards.

    Keyword arguments go to the FakeEngine; `settings` to Settings; `db` names the database file
    (the default one is shared by every app of a test, as a restarted server shares it).
    """
    built: list[FakeApp] = []

    def build(settings: dict[str, Any] | None = None, db: str = "sessions.db", **engine_kwargs: Any) -> FakeApp:
        engine = FakeEngine(**engine_kwargs)
        store = SQLiteStore(tmp_path / db)
        app = create_app(Settings(engine="fake", db=tmp_path / db, **(settings or {})), engine=engine, store=store)
        built.append(FakeApp(app, app.test_client(), engine, store))
        return built[-1]

    yield build
    for app in built:
        app.engine.close()
        app.store.close()


@pytest.fixture
def fake(make_fake_app: MakeFakeApp) -> FakeApp:
    """A fast app over the scripted engine."""
    return make_fake_app()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The embedded SmolLM2-135M-Instruct (Llama architecture) GGUF."""
    return models.smollm2_gguf()


@pytest.fixture(scope="session")
def qwen_gguf() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture), assembled from its PyPI packages and verified."""
    return models.qwen_gguf()


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A real `python pure_model_api.py` process."""

    url: str
    proc: subprocess.Popen[str]
    db: Path
    log: Path

    def stop(self, sig: str = "term") -> int:
        """Stop the process (SIGTERM or SIGKILL) and return its exit code."""
        if self.proc.poll() is None:
            self.proc.terminate() if sig == "term" else self.proc.kill()
        return self.proc.wait(timeout=60)


def start_server(
    args: list[str],
    db: Path,
    log: Path,
    timeout: float = 600,
    script: str = "pure_model_api.py",
    python: Path | None = None,
    env: dict[str, str] | None = None,
) -> Server:
    """Start the seed entry point (with another venv's python, and more environment, where given) and wait
    until /health says 200."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [str(python or sys.executable), str(ROOT / script), "--port", str(port), "--db", str(db), *args]
    if script.endswith(".sh"):
        cmd = ["bash", str(ROOT / script), "--port", str(port), "--db", str(db), *args]
        env["PYTHON"] = sys.executable
    out = log.open("w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return Server(url, proc, db, log)
        except (requests.ConnectionError, requests.Timeout):  # refused while starting, or slow under load
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"server not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


@contextmanager
def serve_in_thread(app: Flask) -> Iterator[str]:
    """Serve an app with waitress on a thread of this process (to drive its engine from the test); yields the URL."""
    from waitress.server import create_server

    server = create_server(app, host="127.0.0.1", port=0, threads=4, channel_request_lookahead=1)

    def run() -> None:
        with suppress(OSError, ValueError):  # the loop's sockets are closed from the test's thread at the end
            server.run()

    thread = threading.Thread(target=run, name="test-waitress", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"  # type: ignore[union-attr]
    finally:
        server.task_dispatcher.shutdown(timeout=5)
        server.close()
        thread.join(timeout=5)
