"""Races that every engine must survive, run against the scripted engine and the real ones."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

from pureapi.engines.base import Engine
from pureapi.errors import NotReady, Overloaded, PureAPIError
from pureapi.types import GenerationRequest, SamplingParams


def generate_until_refused(engine: Engine, ended: list[str]) -> None:
    """Generate and read replies until the engine refuses; record how it ended."""
    while True:
        try:
            for _ in engine.generate(GenerationRequest([1, 2, 3], SamplingParams(max_tokens=4))):
                pass
        except (NotReady, Overloaded):
            ended.append("refused")
            return
        except PureAPIError:
            pass  # failed by the close: the stream ended, which is all the race asks


def race_generate_with_close(make: Callable[[], Engine], rounds: int, threads: int = 4) -> None:
    """Every `generate` racing `close` ends: it is refused, fails or finishes, and never waits forever."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so that close lands inside generate
    try:
        for _ in range(rounds):
            engine = make()
            ended: list[str] = []
            workers = [
                threading.Thread(target=generate_until_refused, args=(engine, ended), daemon=True)
                for _ in range(threads)
            ]
            for w in workers:
                w.start()
            engine.close()
            for w in workers:
                w.join(timeout=10)
            assert not any(w.is_alive() for w in workers), "a generate racing close never ended"
            assert ended == ["refused"] * threads
    finally:
        sys.setswitchinterval(interval)
