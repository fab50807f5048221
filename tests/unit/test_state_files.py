"""The on-disk store of sessions' KV states: format, bounds, and damage handling."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from pureapi.engines.base import model_fingerprint
from pureapi.engines.llamacpp.state_files import MAGIC, StateFiles


def state(data: bytes) -> ctypes.Array[ctypes.c_uint8]:
    return (ctypes.c_uint8 * len(data)).from_buffer_copy(data)


def test_round_trip_and_take_removes_the_file(tmp_path: Path) -> None:
    files = StateFiles(tmp_path, 1 << 20)
    assert files.put("session/../x", [1, 2, 151643], state(b"kv-bytes"))
    assert files.tokens("session/../x") == [1, 2, 151643]
    (name,) = [p.name for p in tmp_path.iterdir()]
    assert "session" not in name and name.endswith(".kv")  # a hash of the id, never a path from it
    tokens, buf = files.take("session/../x") or ([], state(b""))
    assert tokens == [1, 2, 151643] and bytes(buf) == b"kv-bytes"
    assert list(tmp_path.iterdir()) == [] and files.take("session/../x") is None


def test_oldest_files_go_first_over_the_limit(tmp_path: Path) -> None:
    one = len(MAGIC) + 4 + 4 * 2 + 1000
    files = StateFiles(tmp_path, 2 * one)
    for i, session in enumerate(["a", "b", "c"]):
        assert files.put(session, [i, i], state(bytes(1000)))
        path = files._path(session)
        os.utime(path, ns=(i * 10**9, i * 10**9))  # distinct write times, whatever the clock's resolution
    assert files.tokens("a") is None and files.tokens("b") == [1, 1] and files.tokens("c") == [2, 2]
    assert files.total_bytes() <= 2 * one
    assert not files.put("huge", [0], state(bytes(3 * one)))  # larger than the whole folder may hold


def test_damaged_files_are_dropped_not_read(tmp_path: Path) -> None:
    files = StateFiles(tmp_path, 1 << 20)
    files.put("a", [1, 2, 3], state(b"kv"))
    path = files._path("a")
    path.write_bytes(path.read_bytes()[: len(MAGIC) + 6])  # cut inside the token list
    assert files.tokens("a") is None and not path.exists()
    files._path("b").write_bytes(b"not a state file at all")
    assert files.take("b") is None and not files._path("b").exists()
    files.put("c", [1], state(b"kv"))
    files._path("c").write_bytes(files._path("c").read_bytes()[: len(MAGIC) + 4 + 4])  # no state bytes
    assert files.take("c") is None and not files._path("c").exists()


def test_interrupted_writes_are_cleaned_up(tmp_path: Path) -> None:
    (tmp_path / "abc.tmp").write_bytes(b"half a state")
    StateFiles(tmp_path, 1 << 20)
    assert list(tmp_path.iterdir()) == []


def test_fingerprint_changes_with_the_model_file_and_settings(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(100))
    base = model_fingerprint(model, "0.3.36", True)
    assert base == model_fingerprint(model, "0.3.36", True)
    assert base != model_fingerprint(model, "0.3.37", True) != model_fingerprint(model, "0.3.36", False)
    model.write_bytes(b"GGUF" + bytes(101))
    assert model_fingerprint(model, "0.3.36", True) != base
