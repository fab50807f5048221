"""Serving: a waitress WSGI server (one process, threads) with the model loaded in the background."""

from __future__ import annotations

import _thread
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

from .chat.expiry import SessionExpirer
from .chat.store import SQLiteStore, StoreError
from .engines.registry import choose_engine, load_engine, resolve
from .errors import ModelLoadError
from .models.resolve import ResolvedModel
from .settings import Settings
from .tenants import KeyFileError, Keyring
from .types import GenerationRequest, Message, SamplingParams

if TYPE_CHECKING:
    from .app import AppState

log = logging.getLogger("pureapi")


def wsgi_threads(settings: Settings, slots: int) -> int:
    """WSGI threads for an engine running `slots` generations at once: each generation the gateway admits
    (running or waiting: max_queue + slots, and up to `slots` more for tenants below their share) holds
    a thread while it streams, and 16 more answer /health, /status and the 503s of an overload."""
    return max(settings.threads, settings.max_queue + 2 * slots + 16)


@dataclass
class _Serving:
    """What serve() hands the loader once it is about to enter its loop."""

    state: AppState
    threads: Callable[[int], None]  # sets the WSGI server's thread count


def _load(settings: Settings, model: ResolvedModel, app: Future[_Serving], failed: list[str]) -> None:
    """Load the engine, answer one token to prove it works, then attach it to the app (health turns 200)
    once serve() has built it and entered its loop, with threads for the generations its slots admit.

    It starts before the app is built, so the load (mostly llama.cpp clearing its KV pool, in C without
    the GIL) runs beside the imports and set-up of the HTTP side on another core.
    """
    started = time.monotonic()
    try:
        engine = load_engine(settings, model)
        prompt = engine.encode_chat([Message("user", "Hi")])
        for _ in engine.generate(GenerationRequest(prompt, SamplingParams(max_tokens=1, temperature=0))):
            pass
    except ModelLoadError as exc:
        failed.append(str(exc))
    except Exception as exc:  # any load failure must end the process, not leave it half-alive
        log.debug("model load failed", exc_info=True)
        failed.append(f"model {settings.model}: failed to load ({type(exc).__name__}: {exc})".splitlines()[0])
    else:
        seconds = time.monotonic() - started
        serving = app.result()
        serving.threads(wsgi_threads(settings, engine.slots))  # before health turns 200
        state = serving.state
        state.load_seconds = seconds
        state.engine = engine
        log.info(
            "ready: %s on %s (%s engine, context %d) in %.1fs",
            engine.model_name,
            engine.device,
            engine.name,
            engine.context_length,
            state.load_seconds,
        )
        return
    app.result()  # serve() is in its loop, where the interrupt is caught
    _thread.interrupt_main()  # wake the server loop in the main thread so the process exits


def shared_kv_refusal(settings: Settings, tenants: int, engine: str) -> str | None:
    """Why the server must not start: the transformers batch shares KV pages by content across all
    requests, so with several tenants and --kv-cache-scope key one could time another's cache hits."""
    batched = settings.concurrency("transformers") > 1
    if engine == "transformers" and batched and tenants > 1 and settings.kv_cache_scope == "key":
        return (
            f"{tenants} API keys with --kv-cache-scope key, but the transformers engine's batch shares cached KV "
            "pages across keys; start with --kv-cache-scope global to accept that, or --parallel 1"
        )
    return None


def serve(settings: Settings) -> int:
    """Run the server until SIGINT/SIGTERM; returns the process exit code."""
    from waitress.server import create_server

    try:
        model = resolve(settings)  # a missing or damaged model file fails here, before binding the port
        store = SQLiteStore(settings.db_path())
    except (ModelLoadError, StoreError) as exc:
        print(f"pureapi: {exc}", file=sys.stderr)
        return 1
    try:  # the key file is checked before the model starts loading
        keys = Keyring.of(settings)
    except KeyFileError as exc:
        print(f"pureapi: {exc}", file=sys.stderr)
        return 1
    shared = shared_kv_refusal(settings, len(keys.principals()), choose_engine(settings, model))
    if shared:
        print(f"pureapi: {shared}", file=sys.stderr)
        return 1
    failed: list[str] = []
    app_ready: Future[_Serving] = Future()
    threading.Thread(target=_load, args=(settings, model, app_ready, failed), name="model-loader", daemon=True).start()
    from .app import create_app  # after the load has started: importing the APIs takes a while

    app = create_app(settings, store=store, keys=keys)
    state: AppState = app.extensions["pureapi"]
    try:
        server = create_server(
            app,
            host=settings.host,
            port=settings.port,
            # Enough threads that admitted generations never starve /health or the 503 answers; raised
            # once the engine's slots are known (nothing is admitted before).
            threads=wsgi_threads(settings, settings.parallel or 0),
            ident="pureapi",
            # Lets waitress notice a client that hung up while its non-streaming reply is being
            # generated (environ["waitress.client_disconnected"]), so the generation is cancelled.
            channel_request_lookahead=1,
        )
    except OSError as exc:
        print(f"pureapi: cannot listen on {settings.host}:{settings.port} ({exc.strerror})", file=sys.stderr)
        return 1

    def stop(signum: int, frame: FrameType | None) -> None:
        # Stop the generations in flight first: waitress then waits (5 s at most) for its threads,
        # and the engine's close waits for its worker, so neither sits out a long reply.
        state.gateway.cancel_all()
        raise KeyboardInterrupt

    def reload_keys(signum: int, frame: FrameType | None) -> None:
        try:
            state.keys.reload()
        except KeyFileError as exc:  # a mistake in the edited file keeps the keys in force
            log.error("%s; the keys in force are kept", exc)
        else:
            log.info("API keys reloaded: %d tenants", len(state.keys.principals()))

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, reload_keys)
    expirer = SessionExpirer(state.directory, settings.session_ttl).start() if settings.session_ttl > 0 else None
    log.info("listening on http://%s:%d (model %s loading)", settings.host, settings.port, settings.model)
    try:
        app_ready.set_result(_Serving(state, server.task_dispatcher.set_thread_count))
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        log.info("shutting down")
        server.close()
        if expirer is not None:
            expirer.stop()
        if state.engine is not None:
            state.engine.close()
        store.close()
    if failed:
        print(f"pureapi: {failed[0]}", file=sys.stderr)
        return 1
    return 0
