"""A client that leaves a stream cancels its generation, on every streaming surface.

Each test holds every stream its surface primes, as a server might elsewhere (PyPy, a reference
cycle, a traceback kept for a log line): then CPython's reference counting cannot end the generation
for the surface, and only the relay's explicit close can.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from pureapi.api import anthropic, completions, openai, responses, seed
from pureapi.app import create_app
from pureapi.chat.store import SQLiteStore
from pureapi.engines.llamacpp import LlamaCppEngine
from pureapi.models.resolve import ResolvedModel
from pureapi.settings import Settings
from pureapi.types import Chunk

from ..conftest import MakeFakeApp

LONG = 1000  # words the abandoned reply would run to: 50 s at the fake engine's 0.05 s a token
GO = [{"role": "user", "content": "go"}]

SURFACES: dict[str, tuple[ModuleType, str, dict[str, Any]]] = {
    "seed": (seed, "/chat", {"message": "go", "max_tokens": LONG, "session_id": "gone"}),
    "chat.completions": (openai, "/v1/chat/completions", {"messages": GO, "max_tokens": LONG}),
    "completions": (completions, "/v1/completions", {"prompt": "go", "max_tokens": LONG}),
    "messages": (anthropic, "/v1/messages", {"messages": GO, "max_tokens": LONG}),
    "responses": (responses, "/v1/responses", {"input": "go", "max_output_tokens": LONG}),
}


def keep_streams(monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> list[Iterator[Chunk]]:
    """Hold every stream the surface module primes, for as long as the test runs."""
    kept: list[Iterator[Chunk]] = []
    real = module.primed

    def priming(chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        kept.append(real(chunks))
        return kept[-1]

    monkeypatch.setattr(module, "primed", priming)
    return kept


@pytest.mark.parametrize(
    "surface",
    list(SURFACES),
)
def test_a_client_that_leaves_a_stream_cancels_its_generation(
    make_fake_app: MakeFakeApp, monkeypatch: pytest.MonkeyPatch, surface: str
) -> None:
    module, path, body = SURFACES[surface]
    fake = make_fake_app(token_delay=0.05)
    fake.engine.enqueue(" ".join(["w"] * LONG))
    kept = keep_streams(monkeypatch, module)
    r = fake.client.post(path, json={**body, "stream": True}, buffered=False)
    assert r.status_code == 200, r.get_data(as_text=True)
    next(iter(r.response))  # the first event: the generation runs
    r.close()  # the client goes away
    assert len(kept) == 1
    deadline = time.monotonic() + 10
    while not fake.engine.generated and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.engine.generated, "the generation kept running after its client left"
    assert fake.engine.generated[0] < 100  # it stopped within a few tokens, not at its 1000th
    if surface == "seed":  # and the abandoned round was not stored
        assert fake.client.get("/status?session_id=gone").get_json()["conversation_length"] == 0


@pytest.mark.real
def test_leaving_a_seed_stream_frees_the_llamacpp_slot(
    smollm2_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On real weights: the abandoned generation stops within a step or two, not at its 900th token."""
    engine = LlamaCppEngine.load(
        ResolvedModel(smollm2_gguf.stem, smollm2_gguf), n_threads=2, ctx_size=2048, n_parallel=1, max_queue=4
    )
    store = SQLiteStore(tmp_path / "s.db")
    app = create_app(Settings(engine="llamacpp", db=tmp_path / "s.db"), engine=engine, store=store)
    try:
        keep_streams(monkeypatch, seed)
        body = {"message": "Count from 1 to 1000, one number per line.", "max_tokens": 900, "temperature": 0}
        r = app.test_client().post("/chat", json={**body, "stream": True}, buffered=False)
        assert r.status_code == 200
        events = iter(r.response)
        deltas = 0
        while deltas < 3:  # three pieces of the reply: the generation is under way
            deltas += b'"delta"' in next(events)
        r.close()  # the client goes away
        deadline = time.monotonic() + 60
        while engine.metrics()["slots_active"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.metrics()["slots_active"] == 0, "the slot is still generating for a client that left"
        assert engine.stats["generated_tokens"] < 3 + 10, engine.stats
    finally:
        engine.close()
        store.close()
