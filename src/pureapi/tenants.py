"""Tenants: each API key is a principal that owns its sessions, responses and conversations, with its limits.

Without any key the server has one principal, the anonymous one, which owns everything (the seed API's
behaviour). With keys, each principal sees only what it created; an admin may act for another tenant
by naming it in the X-Tenant header.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import RateLimited

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"  # the principal of a server without keys, and the owner of rows from before tenants
NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")  # never '/', which joins an owner to a session id in the store
TENANT_HEADER = "X-Tenant"


@dataclass(frozen=True)
class Principal:
    """Who sent a request: a name that is not the key, a role, and its own limits (0: the server's default)."""

    name: str
    admin: bool = False
    max_concurrent: int = 0
    tokens_per_minute: int = 0

    @property
    def owner(self) -> str:
        """The owner stored beside its rows: '' for the anonymous principal (rows from before tenants too)."""
        return "" if self.name == ANONYMOUS else self.name


NOBODY = Principal(ANONYMOUS)


def owner_name(owner: str) -> str:
    """The principal name for a stored owner ('' is the anonymous principal)."""
    return owner or ANONYMOUS


class KeyFileError(ValueError):
    """The key file cannot be read or has a bad line; the message names the file and the line."""


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def unnamed(key: str) -> str:
    """The stable name of a key given without one (--api-key, PUREAPI_API_KEY): a hash, never the key."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def parse_key_file(path: Path) -> dict[str, tuple[str, Principal]]:
    """Read `name:key [admin] [max_concurrent=N] [tokens_per_minute=N]` lines ('#' starts a comment).

    Returns key -> (key, principal); raises KeyFileError naming the line of any mistake.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeyFileError(f"API key file {path}: cannot read it ({exc.strerror})") from None
    found: dict[str, tuple[str, Principal]] = {}
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"API key file {path}, line {number}"
        head, *options = line.split()
        name, sep, key = head.partition(":")
        if not sep or not key:
            raise KeyFileError(f"{where}: expected 'name:key', got no ':' or an empty key")
        if not NAME.fullmatch(name) or name == ANONYMOUS:
            raise KeyFileError(f"{where}: the name must be 1 to 64 letters, digits, _ . @ - (and not '{ANONYMOUS}')")
        if name in names:
            raise KeyFileError(f"{where}: the name '{name}' is given twice")
        if key in found:
            raise KeyFileError(f"{where}: this key is already given to '{found[key][1].name}'")
        admin, limits = False, {"max_concurrent": 0, "tokens_per_minute": 0}
        for option in options:
            option_name, eq, value = option.partition("=")
            if option == "admin":
                admin = True
            elif eq and option_name in limits and value.isdigit():
                limits[option_name] = int(value)
            else:
                raise KeyFileError(f"{where}: unknown option '{option}' (admin, max_concurrent=N, tokens_per_minute=N)")
        names.add(name)
        found[key] = (key, Principal(name, admin, **limits))
    return found


class Keyring:
    """The API keys and their principals: from flags and the environment, and from a key file (re-read on reload)."""

    def __init__(
        self,
        keys: list[str],
        admin_keys: list[str] | None = None,
        key_file: Path | None = None,
        max_concurrent: int = 0,
        tokens_per_minute: int = 0,
    ):
        self._fixed: dict[bytes, Principal] = {}
        for key, admin in [(k, False) for k in keys if k] + [(k, True) for k in admin_keys or [] if k]:
            self._fixed[_digest(key)] = Principal(unnamed(key), admin)
        self.key_file = key_file
        self.max_concurrent = max_concurrent
        self.tokens_per_minute = tokens_per_minute
        # Swapped whole on reload (one assignment), so a request sees the old table or the new one.
        self._table: dict[bytes, Principal] = {}
        self.reload()

    @classmethod
    def of(cls, settings: Settings) -> Keyring:
        """The keys a server started with these settings answers to (raises KeyFileError)."""
        return cls(
            settings.api_key,
            settings.admin_key,
            settings.api_key_file,
            settings.tenant_max_concurrent,
            settings.tenant_tokens_per_minute,
        )

    def reload(self) -> None:
        """Read the key file again (SIGHUP); a file with a mistake keeps the keys in force and raises."""
        table = dict(self._fixed)
        if self.key_file is not None:
            for key, principal in parse_key_file(self.key_file).values():
                table[_digest(key)] = principal
        if self.key_file is not None and not table:
            # An emptied key file must not turn a keyed server into an open one.
            raise KeyFileError(f"API key file {self.key_file}: it holds no keys; refusing to serve without any")
        names = [p.name for p in table.values()]
        clash = {n for n in names if names.count(n) > 1}
        if clash:
            raise KeyFileError(f"API keys: the name {sorted(clash)[0]} belongs to two keys")
        self._table = {
            digest: Principal(
                p.name,
                p.admin,
                p.max_concurrent or self.max_concurrent,
                p.tokens_per_minute or self.tokens_per_minute,
            )
            for digest, p in table.items()
        }

    def __bool__(self) -> bool:
        return bool(self._table)

    def principals(self) -> list[Principal]:
        """Every principal the keys name, by name."""
        return sorted(self._table.values(), key=lambda p: p.name)

    def anonymous(self) -> Principal:
        """The principal of a server without keys, with the server's per-tenant limits."""
        return Principal(ANONYMOUS, False, self.max_concurrent, self.tokens_per_minute)

    def find(self, given: bytes) -> Principal | None:
        """The principal of a presented key, or None.

        The key is hashed before the lookup, so the time taken says nothing about how much of a real key
        the guess matched.
        """
        return self._table.get(_digest(given)) if given else None


@dataclass
class _Usage:
    """One principal's counters: in flight now, tokens in the last minute, totals since start."""

    in_flight: int = 0
    window: deque[tuple[float, int]] = field(default_factory=deque)  # (time, tokens) of finished generations
    window_tokens: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rejected: int = 0


class TenantLimits:
    """Per-tenant admission: concurrent generations and a tokens-per-minute budget (429 with Retry-After)."""

    WINDOW = 60.0

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        # Guards every principal's counters; held for a check-and-update only.
        self._lock = threading.Lock()
        self._usage: dict[str, _Usage] = {}

    def _now(self) -> float:
        return self._clock()

    def _trim(self, usage: _Usage, now: float) -> None:
        while usage.window and usage.window[0][0] <= now - self.WINDOW:
            usage.window_tokens -= usage.window.popleft()[1]

    @contextmanager
    def admit(self, principal: Principal) -> Iterator[None]:
        """Hold one of the principal's concurrent generations; RateLimited when it has none left."""
        with self._lock:
            usage = self._usage.setdefault(principal.name, _Usage())
            now = self._now()
            self._trim(usage, now)
            if principal.max_concurrent and usage.in_flight >= principal.max_concurrent:
                usage.rejected += 1
                raise RateLimited(
                    f"tenant '{principal.name}' has {usage.in_flight} generations in flight, its limit; "
                    "retry when one ends",
                    retry_after=1,
                    code="concurrency_limit_exceeded",
                )
            budget = principal.tokens_per_minute
            if budget and usage.window_tokens >= budget:
                # Wait until enough of the window's oldest generations age out to bring it under budget.
                over, wait = usage.window_tokens - budget, self.WINDOW
                for at, tokens in usage.window:
                    over -= tokens
                    if over < 0:
                        wait = at + self.WINDOW - now
                        break
                usage.rejected += 1
                raise RateLimited(
                    f"tenant '{principal.name}' used {usage.window_tokens} tokens in the last minute, over its "
                    f"budget of {budget}",
                    retry_after=max(1, int(wait + 0.999)),
                    code="rate_limit_exceeded",
                )
            usage.in_flight += 1
            usage.requests += 1
        try:
            yield
        finally:
            with self._lock:
                usage.in_flight -= 1

    def spent(self, principal: Principal, prompt_tokens: int, completion_tokens: int) -> None:
        """Count a finished (or stopped) generation's tokens against the principal's budget."""
        with self._lock:
            usage = self._usage.setdefault(principal.name, _Usage())
            now = self._now()
            usage.window.append((now, prompt_tokens + completion_tokens))
            usage.window_tokens += prompt_tokens + completion_tokens
            usage.prompt_tokens += prompt_tokens
            usage.completion_tokens += completion_tokens
            self._trim(usage, now)

    def usage(self) -> dict[str, dict[str, int]]:
        """Each principal's counters, by name (for /v1/tenants)."""
        with self._lock:
            now = self._now()
            report = {}
            for name, usage in sorted(self._usage.items()):
                self._trim(usage, now)
                report[name] = {
                    "in_flight": usage.in_flight,
                    "requests": usage.requests,
                    "rejected": usage.rejected,
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                    "tokens_last_minute": usage.window_tokens,
                }
            return report
