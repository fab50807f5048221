"""The on-disk store of KV states: format, index, bounds, resets, and damage handling."""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

from pureapi.engines.base import model_fingerprint
from pureapi.engines.llamacpp.prompt_cache import content_key
from pureapi.engines.llamacpp.state_files import MAGIC, StateFiles


def state(data: bytes) -> ctypes.Array[ctypes.c_uint8]:
    return (ctypes.c_uint8 * len(data)).from_buffer_copy(data)


def test_round_trip_index_and_take(tmp_path: Path) -> None:
    files = StateFiles(tmp_path, 1 << 20)
    key = content_key("", [1, 2, 151643])
    assert files.put(key, [1, 2, 151643], "", {"session/../x"}, state(b"kv-bytes"))
    (name,) = [p.name for p in tmp_path.iterdir()]
    assert name == key + ".kv" and "session" not in name  # named by content, never by a session id
    # A new process reads the index from the headers alone.
    again = StateFiles(tmp_path, 1 << 20)
    meta = again.index()[key]
    assert meta.tokens == [1, 2, 151643] and meta.scope == "" and meta.sessions == {"session/../x"}
    kept = again.take(key, keep=True)
    assert kept is not None and bytes(kept) == b"kv-bytes" and (tmp_path / name).exists()
    taken = again.take(key)
    assert taken is not None and bytes(taken) == b"kv-bytes"
    assert list(tmp_path.iterdir()) == [] and again.take(key) is None and again.index() == {}


def test_oldest_files_go_first_over_the_limit(tmp_path: Path) -> None:
    files = StateFiles(tmp_path, 1 << 20)
    files.put("probe", [0, 0], "", set(), state(bytes(1000)))
    one = (tmp_path / "probe.kv").stat().st_size
    files.drop("probe")
    files = StateFiles(tmp_path, 2 * one)
    for i, key in enumerate(["a", "b", "c"]):
        assert files.put(key, [i, i], "", set(), state(bytes(1000)))
        os.utime(files._path(key), ns=(i * 10**9, i * 10**9))  # distinct write times, whatever the clock
        files._index = None  # re-read the write times
    assert sorted(files.index()) == ["b", "c"] and files.index()["b"].tokens == [1, 1]
    assert files.total_bytes() <= 2 * one
    assert not files.put("huge", [0], "", set(), state(bytes(3 * one)))  # larger than the whole folder


def test_a_reset_drops_only_the_states_its_session_alone_reached(tmp_path: Path) -> None:
    files = StateFiles(tmp_path, 1 << 20)
    files.put("mine", [1], "", {"S"}, state(b"1"))
    files.put("shared", [2], "", {"S", "T"}, state(b"2"))
    files.put("stateless", [3], "", set(), state(b"3"))
    files.forget("S")
    assert sorted(files.index()) == ["shared", "stateless"] and files.index()["shared"].sessions == {"T"}
    assert not files._path("mine").exists()


def test_damaged_and_foreign_files_are_dropped_not_read(tmp_path: Path) -> None:
    files = StateFiles(tmp_path, 1 << 20)
    files.put("a", [1, 2, 3], "", set(), state(b"kv"))
    path = files._path("a")
    path.write_bytes(path.read_bytes()[: len(MAGIC) + 6])  # cut inside the metadata
    files._path("b").write_bytes(b"not a state file at all")
    files._path("c").write_bytes(b"PUREKV1\n" + bytes(40))  # the older layout, keyed by session
    meta = json.dumps({"scope": 1, "sessions": []}).encode()
    files._path("d").write_bytes(MAGIC + len(meta).to_bytes(4, "little") + meta + bytes(8))
    files.put("e", [1], "", set(), state(b"kv"))
    files._path("e").write_bytes(files._path("e").read_bytes()[:-2])  # no state bytes
    files._index = None
    assert files.index() == {}
    assert list(tmp_path.iterdir()) == []
    # A file damaged after the index was read is dropped when taken.
    files.put("f", [1], "", set(), state(b"kv"))
    files._path("f").write_bytes(b"garbage")
    assert files.take("f") is None and not files._path("f").exists() and files.index() == {}


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
