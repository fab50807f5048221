"""The content-addressed prompt cache: lookup by longest prefix, scopes, bounds, spills, resets."""

from __future__ import annotations

import ctypes
from pathlib import Path

from pureapi.engines.llamacpp.prompt_cache import PromptCache
from pureapi.engines.llamacpp.state_files import StateFiles


def state(n: int, fill: int = 0) -> ctypes.Array[ctypes.c_uint8]:
    return (ctypes.c_uint8 * n).from_buffer_copy(bytes([fill]) * n)


A = list(range(100, 140))
B = list(range(200, 240))


def test_the_longest_prefix_of_the_scope_is_found() -> None:
    cache = PromptCache(1 << 20)
    cache.put(A[:20], state(10), "", None)
    cache.put(B, state(10), "", "s")
    found = cache.find([*A[:30], 1, 2], "")
    assert found is not None and found.tokens == A[:20] and found.common == 20 and not found.on_disk
    assert cache.find([*B[:5], 9], "") is not None
    assert cache.find([7, 7, 7], "") is None
    assert cache.find(A, "another-key") is None  # another scope never sees it


def test_a_longer_entry_replaces_its_prefixes_and_covers_shorter_ones() -> None:
    cache = PromptCache(1 << 20)
    assert cache.put(A[:10], state(10), "", None)
    assert cache.put(A[:30], state(30), "", None)
    assert [t for t, _, _ in cache.entries()] == [A[:30]] and cache.bytes == 30
    assert not cache.put(A[:20], state(20), "", "s")  # covered: the longer one serves it
    assert cache.put(A[:20], state(20), "k", None)  # but not across scopes
    assert len(cache.entries()) == 2


def test_read_takes_a_whole_entry_and_keeps_a_partial_one() -> None:
    cache = PromptCache(1 << 20)
    cache.put(A, state(40, 7), "", None)
    found = cache.find([*A[:25], 1], "")
    assert found is not None
    buf = cache.read(found, take=False)
    assert buf is not None and bytes(buf) == bytes([7]) * 40 and cache.bytes == 40
    found = cache.find([*A, 5, 6], "")
    assert found is not None and found.common == len(A)
    assert cache.read(found, take=True) is not None and cache.bytes == 0 and cache.entries() == []


def test_ram_stays_within_its_bound_and_spills_the_least_recently_used(tmp_path: Path) -> None:
    disk = StateFiles(tmp_path, 1 << 20)
    cache = PromptCache(100, disk)
    cache.put(A, state(60), "", "a")
    cache.put(B, state(60), "", "b")  # A spills
    assert cache.bytes == 60 and [t for t, _, _ in cache.entries()] == [B]
    found = cache.find(A, "")
    assert found is not None and found.on_disk and found.common == len(A)
    buf = cache.read(found, take=True)
    assert buf is not None and len(buf) == 60 and cache.taken_from == "disk" and disk.index() == {}
    cache.put([5] * 30, state(500), "", None)  # larger than all of RAM: straight to disk
    assert cache.bytes == 60 and len(disk.index()) == 1


def test_a_state_put_in_ram_supersedes_its_prefix_on_disk(tmp_path: Path) -> None:
    disk = StateFiles(tmp_path, 1 << 20)
    cache = PromptCache(100, disk)
    cache.put(A[:20], state(60), "", None)
    cache.put(B, state(60), "", None)  # A[:20] spills
    cache.put(A, state(60), "", None)  # B spills; A[:20] on disk is superseded
    assert [m.tokens for m in disk.index().values()] == [B]


def test_a_reset_drops_only_what_the_session_alone_reached(tmp_path: Path) -> None:
    disk = StateFiles(tmp_path, 1 << 20)
    cache = PromptCache(100, disk)
    cache.put(A, state(60), "", "S")
    cache.put(B, state(60), "", None)  # a stateless client's; A spills
    cache.put([1] * 20, state(30), "", "S")
    cache.forget("S")
    assert [t for t, _, _ in cache.entries()] == [B] and disk.index() == {}


def test_shutdown_writes_everything_and_a_restart_finds_it(tmp_path: Path) -> None:
    cache = PromptCache(1 << 20, StateFiles(tmp_path, 1 << 20))
    cache.put(A, state(60, 3), "k", "S")
    entries = cache.drain()
    entries.append(cache.entry(B, state(50, 4), "", None))
    cache.persist(entries)
    restarted = PromptCache(1 << 20, StateFiles(tmp_path, 1 << 20))
    found = restarted.find([*A, 9], "k")
    assert found is not None and found.on_disk and found.common == len(A)
    assert bytes(restarted.read(found, take=True) or b"") == bytes([3]) * 60
    assert restarted.find(B, "k") is None and restarted.find(B, "") is not None


def test_covers_tells_a_save_it_would_be_for_nothing() -> None:
    """A slot whose tokens an entry already holds (or extends) need not copy its KV out at all."""
    cache = PromptCache(1 << 20)
    assert cache.put([1, 2, 3, 4], state(8), "", None)
    assert cache.covers([1, 2, 3], "") and cache.covers([1, 2, 3, 4], "")
    assert not cache.covers([1, 2, 3, 4, 5], "") and not cache.covers([1, 2, 9], "")
    assert not cache.covers([1, 2, 3], "other scope")
