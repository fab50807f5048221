"""Stream helpers for engine output: stop strings, and closing a stream to end its generation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

from ..types import Chunk


class StopMatcher:
    """Finds stop strings in streamed text, holding back any tail that could begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self._longest = max((len(s) for s in self.stops), default=0)
        self.matched: str | None = None  # the stop string found, once one is

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        buf = self._held + text
        hits = [(i, s) for i, s in ((buf.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            at, self.matched = min(hits, key=lambda hit: hit[0])
            return buf[:at], True
        keep = 0
        for n in range(min(self._longest - 1, len(buf)), 0, -1):
            if any(s.startswith(buf[-n:]) for s in self.stops):
                keep = n
                break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Text held back when the stream ends without a stop."""
        held, self._held = self._held, ""
        return held


def close_stream(stream: object) -> None:
    """Close a generator-like stream (ending its generation) if it can be closed."""
    close = getattr(stream, "close", None)
    if close is not None:
        close()


def with_stops(chunks: Iterator[Chunk], stops: Sequence[str]) -> Iterator[Chunk]:
    """Apply stop strings to an engine stream; closing early cancels the generation."""
    matcher = StopMatcher(stops)
    try:
        for chunk in chunks:
            text, hit = matcher.feed(chunk.text)
            if hit:
                yield replace(chunk, text=text, finish_reason="stop", stop=matcher.matched)
                return
            if chunk.finish_reason is not None:
                yield replace(chunk, text=text + matcher.flush())
                return
            if text or chunk.logprobs:
                yield replace(chunk, text=text)
    finally:
        close_stream(chunks)
