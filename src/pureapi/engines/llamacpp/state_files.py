"""Sessions' llama.cpp sequence states on disk, beside the sessions database.

A state file holds the tokens whose KV it stores and the bytes of `llama_state_seq_get_data`, so
that a session whose slot and RAM copy are gone (evicted, or the server restarted) gets its next
turn restored instead of prefilled. A state is only ever used through the common token prefix
with the new prompt, so a stale one (an older turn, a reset session) can cost a restore but never
change an answer. States of one model file and llama.cpp build live in a folder of their own (the
model fingerprint), since KV bytes mean nothing to another model.

File layout: MAGIC, then the token count (uint32, little-endian), the tokens (int32 each), then
the state bytes to the end of the file. Names are a hash of the session id, never the id itself.
Writes go to a temporary file that replaces the old one, so a crash leaves the old state or the
new one, never a torn file; a file that does not parse is deleted and ignored.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import struct
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"PUREKV1\n"
_COUNT = struct.Struct("<I")
SUFFIX = ".kv"


class StateFiles:
    """A bounded folder of session states; the oldest files (by write time) go first."""

    def __init__(self, folder: Path, limit_bytes: int):
        self.folder = folder
        self.limit = limit_bytes
        folder.mkdir(parents=True, exist_ok=True)
        for tmp in folder.glob("*.tmp"):  # left by a crash in the middle of a write
            tmp.unlink(missing_ok=True)

    def _path(self, session: str) -> Path:
        return self.folder / (hashlib.sha256(session.encode()).hexdigest()[:32] + SUFFIX)

    def tokens(self, session: str) -> list[int] | None:
        """The tokens of the session's saved state, without reading the state itself."""
        entry = self._read(session, with_state=False)
        return entry[0] if entry is not None else None

    def take(self, session: str) -> tuple[list[int], ctypes.Array[ctypes.c_uint8]] | None:
        """Read the session's state and delete its file: the slot it is restored into now owns it."""
        entry = self._read(session, with_state=True)
        self.drop(session)
        if entry is None or entry[1] is None:
            return None
        return entry[0], entry[1]

    def _read(self, session: str, with_state: bool) -> tuple[list[int], ctypes.Array[ctypes.c_uint8] | None] | None:
        """Parse a state file in one open: its tokens, and its state bytes if asked. Damaged: dropped."""
        path = self._path(session)
        try:
            with path.open("rb") as f:
                head = f.read(len(MAGIC) + _COUNT.size)
                if len(head) != len(MAGIC) + _COUNT.size or not head.startswith(MAGIC):
                    raise ValueError("bad header")
                (count,) = _COUNT.unpack_from(head, len(MAGIC))
                data = f.read(4 * count)
                if len(data) != 4 * count:
                    raise ValueError("truncated tokens")
                tokens = list(struct.unpack(f"<{count}i", data))
                if not with_state:
                    return tokens, None
                size = os.fstat(f.fileno()).st_size - f.tell()
                if size <= 0:
                    raise ValueError("truncated state")
                buf = (ctypes.c_uint8 * size)()
                if f.readinto(buf) != size:  # type: ignore[attr-defined]
                    raise ValueError("truncated state")
                return tokens, buf
        except FileNotFoundError:
            return None
        except (OSError, ValueError, struct.error) as exc:
            log.warning("dropping unreadable KV state file %s: %s", path.name, exc)
            self.drop(session)
            return None

    def put(self, session: str, tokens: list[int], state: ctypes.Array[ctypes.c_uint8]) -> bool:
        """Write the session's state (replacing an older one), then delete the oldest files over the limit."""
        size = len(MAGIC) + _COUNT.size + 4 * len(tokens) + len(state)
        if size > self.limit:
            return False
        path = self._path(session)
        try:
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(MAGIC + _COUNT.pack(len(tokens)) + struct.pack(f"<{len(tokens)}i", *tokens))
                    f.write(memoryview(state))
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            log.warning("could not write a KV state file: %s", exc)
            return False
        self._trim(keep=path)
        return True

    def drop(self, session: str) -> None:
        """Delete the session's state, if any."""
        self._path(session).unlink(missing_ok=True)

    def total_bytes(self) -> int:
        return sum(size for _, _, size in self._files())

    def _files(self) -> list[tuple[int, Path, int]]:
        files = []
        for path in self.folder.glob("*" + SUFFIX):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime_ns, path, st.st_size))
        return sorted(files)

    def _trim(self, keep: Path) -> None:
        files = self._files()
        total = sum(size for _, _, size in files)
        for _, path, size in files:
            if total <= self.limit:
                break
            if path != keep:
                path.unlink(missing_ok=True)
                total -= size
