"""GGUF files without loading them: the metadata that sizes the KV cache, and split sets.

Only the key/value header is read (a few kilobytes), so the fit check can run on a local file
before the engine maps its tensors.
"""

from __future__ import annotations

import functools
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<n>\d{5})-of-(?P<m>\d{5})\.gguf$", re.IGNORECASE)

# GGUF value types -> struct format (strings = 8, arrays = 9 handled apart).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GgufShape:
    """What the fit check needs from a GGUF file."""

    architecture: str
    layers: int
    kv_heads: int
    head_dim: int
    context: int
    size: int  # bytes of all parts together

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """KV cache per token: keys and values, every layer, f16 by default."""
        return 2 * self.layers * self.kv_heads * self.head_dim * bytes_per_value


def split_parts(path: Path) -> list[Path]:
    """Every file of a split set given any part (just [path] for a single file)."""
    match = SPLIT_RE.match(path.name)
    if not match:
        return [path]
    count = int(match.group("m"))
    stem = match.group("stem")
    return [path.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def first_part(path: Path) -> Path:
    """The file llama.cpp must be given for a split set: its first part."""
    return split_parts(path)[0]


def _read(fh: IO[bytes], fmt: str) -> Any:
    size = struct.calcsize("<" + fmt)
    data = fh.read(size)
    if len(data) != size:
        raise ValueError("truncated GGUF header")
    return struct.unpack("<" + fmt, data)[0]


def _string(fh: IO[bytes]) -> str:
    n = _read(fh, "Q")
    if n > 1 << 24:
        raise ValueError("damaged GGUF string")
    return fh.read(n).decode("utf-8", "replace")


def _skip_strings(fh: IO[bytes], count: int) -> None:
    """Step over an array of strings (the tokenizer's vocabulary and merges: ~200k of them) unread."""
    for _ in range(count):
        n = int.from_bytes(fh.read(8), "little")
        if n > 1 << 24:
            raise ValueError("damaged GGUF string")
        fh.seek(n, 1)


def _value(fh: IO[bytes], vtype: int) -> Any:
    if vtype in _SCALARS:
        return _read(fh, _SCALARS[vtype])
    if vtype == _STRING:
        return _string(fh)
    if vtype == _ARRAY:
        item_type, count = _read(fh, "I"), _read(fh, "Q")
        if item_type in _SCALARS:  # skip numeric arrays (the tokenizer's scores) without decoding
            fh.seek(struct.calcsize("<" + _SCALARS[item_type]) * count, 1)
        elif item_type == _STRING:
            _skip_strings(fh, count)
        else:
            for _ in range(count):
                _value(fh, item_type)
        return None
    raise ValueError(f"unknown GGUF value type {vtype}")


def metadata(path: Path) -> dict[str, Any]:
    """The GGUF key/value metadata (arrays left out)."""
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        _version, _n_tensors, n_kv = _read(fh, "I"), _read(fh, "Q"), _read(fh, "Q")
        values: dict[str, Any] = {}
        for _ in range(n_kv):
            key = _string(fh)
            values[key] = _value(fh, _read(fh, "I"))
        return values


def shape(path: Path) -> GgufShape:
    """Architecture, attention shape and total size of a GGUF file or split set (read once per file
    version: the fit check asks before and after a download)."""
    stat = first_part(path).stat()
    return _shape(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _shape(path: Path, _size: int, _mtime_ns: int) -> GgufShape:
    meta = metadata(first_part(path))
    arch = str(meta.get("general.architecture", "llama"))
    heads = int(meta.get(f"{arch}.attention.head_count", 1) or 1)
    embd = int(meta.get(f"{arch}.embedding_length", 0))
    head_dim = int(meta.get(f"{arch}.attention.key_length", 0) or (embd // heads if heads else 0))
    size = sum(p.stat().st_size for p in split_parts(path) if p.exists())
    return GgufShape(
        architecture=arch,
        layers=int(meta.get(f"{arch}.block_count", 0)),
        kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads) or heads),
        head_dim=head_dim,
        context=int(meta.get(f"{arch}.context_length", 0)),
        size=size,
    )
