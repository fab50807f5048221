"""Reading engines' reply streams in tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def read_together(streams: Sequence[Iterator[T]], timeout: float = 300) -> list[list[T]]:
    """Read every stream to its end, each on a thread of its own so that they run side by side; the items
    of each (those read so far, for a stream that failed or outlived the timeout)."""
    results: list[list[T]] = [[] for _ in streams]

    def read(i: int) -> None:
        results[i].extend(streams[i])

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return results
