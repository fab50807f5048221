"""Will it fit? Weights plus KV cache against the free memory, checked before a byte is loaded.

Without this, a model bigger than the machine is found out by the kernel's OOM killer: the
process vanishes with no message. Here it is one line saying what the model needs, what is
free, and what would fit instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ModelLoadError

# Compute buffers, the runtime itself and the allocator's slack on top of weights and KV cache.
OVERHEAD_FRACTION = 0.08
OVERHEAD_BYTES = 300 << 20

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_IUNITS = {"ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def parse_size(text: str) -> int:
    """'8GB', '8G', '7.5GiB', '512MiB', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?)?b?\s*", text.lower())
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 8GB, 7.5GiB, 512MiB)")
    number, unit = float(match.group(1)), match.group(2) or ""
    return int(number * (_IUNITS[unit] if unit.endswith("i") else _UNITS[unit]))


def human(n: float) -> str:
    """Bytes as a short decimal size: 4.7 GB, 310 MB."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}" if n / size < 100 else f"{n / size:.0f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Need:
    """What loading a build costs: weights, KV cache for every slot, and overhead."""

    weights: int
    kv: int
    ctx: int  # tokens per slot
    slots: int

    @property
    def total(self) -> int:
        return int((self.weights + self.kv) * (1 + OVERHEAD_FRACTION)) + OVERHEAD_BYTES

    def describe(self) -> str:
        """'4.7 GB weights + 1.9 GB KV cache for 4 x 8192 tokens'."""
        return f"{human(self.weights)} weights + {human(self.kv)} KV cache for {self.slots} x {self.ctx} tokens"


def need(weights: int, kv_per_token: int, ctx: int, slots: int) -> Need:
    """The memory need of a build for `slots` conversations of `ctx` tokens each."""
    return Need(weights=weights, kv=kv_per_token * ctx * slots, ctx=ctx, slots=slots)


def check(what: str, n: Need, free: int, where: str, alternatives: list[str]) -> None:
    """Raise one line when `n` does not fit in `free` bytes of `where` (RAM, cuda:0, ...)."""
    if n.total <= free:
        return
    line = f"{what} does not fit: it needs about {human(n.total)} ({n.describe()}); {human(free)} of {where} is free"
    if alternatives:
        line += "; would fit: " + ", ".join(alternatives)
    else:
        line += "; nothing smaller in the catalogue would fit either"
    raise ModelLoadError(line + " (--fit-check off to try anyway)")
