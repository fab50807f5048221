"""A load generator for OpenAI-compatible streaming chat endpoints (pureapi and its peers).

Every figure comes from the client side of `POST /v1/chat/completions` with `"stream": true`:
time to first token (TTFT) is the time to the first non-empty content delta, decode speed is
(completion tokens - 1) / (time of last token - time of first token), tokens are counted from
the server's usage (stream_options.include_usage) where it reports it, else one per delta.
Prompt tokens the server computed (rather than took from its KV cache) come from
usage.prompt_tokens_details.cached_tokens (OpenAI's field) or llama-server's timings.prompt_n.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import requests


@dataclass
class Result:
    """One request's timings."""

    ok: bool
    status: int = 0
    ttft: float = 0.0
    total: float = 0.0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    prompt_computed: int | None = None  # prompt tokens not served from the KV cache, if reported
    text: str = ""
    error: str = ""

    @property
    def decode_tps(self) -> float:
        span = self.total - self.ttft
        return (self.completion_tokens - 1) / span if self.completion_tokens > 1 and span > 0 else 0.0


def stream_chat(
    base: str,
    messages: list[dict[str, str]],
    max_tokens: int,
    extra: dict[str, Any] | None = None,
    timeout: float = 600,
    headers: dict[str, str] | None = None,
) -> Result:
    """One streaming chat completion, timed."""
    body = {
        "model": "bench",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }
    started = time.perf_counter()
    first = last = 0.0
    deltas = 0
    parts: list[str] = []
    usage: dict[str, Any] = {}
    computed: int | None = None
    try:
        with requests.post(
            base + "/v1/chat/completions", json=body, stream=True, timeout=timeout, headers=headers
        ) as r:
            if r.status_code != 200:
                return Result(False, r.status_code, error=r.text[:200])
            for line in r.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:]
                if payload == b"[DONE]":
                    break
                event = json.loads(payload)
                if event.get("usage"):
                    usage = event["usage"]
                if "prompt_n" in (event.get("timings") or {}):
                    computed = int(event["timings"]["prompt_n"])
                for choice in event.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        now = time.perf_counter()
                        first = first or now
                        last = now
                        deltas += 1
                        parts.append(content)
    except requests.RequestException as exc:
        return Result(False, error=str(exc)[:200])
    end = last or time.perf_counter()
    if not deltas:  # a stream cut off before any text (llama_cpp.server interrupts by default)
        return Result(False, 200, error="stream ended without any text")
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if computed is None and cached is not None and usage.get("prompt_tokens"):
        computed = int(usage["prompt_tokens"]) - int(cached)
    return Result(
        True,
        200,
        ttft=(first or end) - started,
        total=end - started,
        completion_tokens=int(usage.get("completion_tokens") or deltas),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        prompt_computed=computed,
        text="".join(parts),
    )


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe the water cycle in detail.",
    "Write a poem about autumn leaves.",
    "Tell me about the history of the printing press.",
    "Explain why the sky is blue.",
    "Describe a day in the life of a bee.",
    "Write a letter to a friend about a trip to the mountains.",
]


@dataclass
class Concurrency:
    """Aggregate throughput with N clients, each sending requests back to back."""

    clients: int
    requests: int
    seconds: float
    tokens: int
    aggregate_tps: float
    p50_latency: float
    p95_latency: float
    p50_ttft: float
    failures: int
    per_request: list[dict[str, Any]] = field(default_factory=list)


def concurrent(
    base: str, clients: int, per_client: int, max_tokens: int, extra: dict[str, Any] | None = None
) -> Concurrency:
    """N threads, each running per_client streaming requests back to back."""
    results: list[Result] = []
    lock = threading.Lock()  # guards results, appended from the client threads

    def client(i: int) -> None:
        for j in range(per_client):
            prompt = PROMPTS[(i * per_client + j) % len(PROMPTS)]
            r = stream_chat(base, [{"role": "user", "content": prompt}], max_tokens, extra)
            with lock:
                results.append(r)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    good = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in good)
    return Concurrency(
        clients=clients,
        requests=len(results),
        seconds=round(seconds, 3),
        tokens=tokens,
        aggregate_tps=round(tokens / seconds, 2),
        p50_latency=round(pct([r.total for r in good], 50), 3),
        p95_latency=round(pct([r.total for r in good], 95), 3),
        p50_ttft=round(pct([r.ttft for r in good], 50), 3),
        failures=len(results) - len(good),
    )


def single_stream(
    base: str, max_tokens: int, repeats: int = 3, extra: dict[str, Any] | None = None
) -> dict[str, float]:
    """Decode speed and TTFT of one client alone (median of repeats, after a warm-up)."""
    messages = [{"role": "user", "content": "Write a long story about a dragon who learns to sing."}]
    stream_chat(base, messages, 8, extra)
    runs = [stream_chat(base, messages, max_tokens, extra) for _ in range(repeats)]
    good = [r for r in runs if r.ok]
    return {
        "decode_tps": round(statistics.median(r.decode_tps for r in good), 2) if good else 0.0,
        "ttft": round(statistics.median(r.ttft for r in good), 4) if good else 0.0,
        "completion_tokens": statistics.median(r.completion_tokens for r in good) if good else 0,
    }


TOPICS = ["gardening", "astronomy", "cooking pasta", "learning the guitar"]
PACED_TOPICS = ["baking bread", "birdwatching", "learning French", "sailing"]  # not in any cache yet


def conversations(
    base: str,
    n_conv: int = 4,
    turns: int = 10,
    max_tokens: int = 48,
    think: float = 0.0,
    topics: Sequence[str] = TOPICS,
) -> dict[str, Any]:
    """n_conv conversations interleaved turn by turn, each resending its whole history (OpenAI style).

    With think > 0 each request waits that many seconds after the previous reply, as a person
    reading it would; with 0 the requests follow each other at once, as a script's would.
    Returns TTFT per turn (median over conversations), conversation 0's prompt sizes, and how many
    of those prompt tokens the server computed rather than took from its cache, where it says.
    """
    histories: list[list[dict[str, str]]] = [[] for _ in range(n_conv)]
    ttft: list[list[float]] = [[] for _ in range(turns)]
    prompt_tokens: list[int] = []
    computed: list[int | None] = []
    for turn in range(turns):
        for c in range(n_conv):
            question = f"Tell me one more thing about {topics[c % len(topics)]} (point {turn + 1})."
            histories[c].append({"role": "user", "content": question})
            time.sleep(think)
            r = stream_chat(base, histories[c], max_tokens)
            if not r.ok:
                raise RuntimeError(f"conversation request failed: {r.status} {r.error}")
            histories[c].append({"role": "assistant", "content": r.text})
            ttft[turn].append(r.ttft)
            if c == 0:
                prompt_tokens.append(r.prompt_tokens)
                computed.append(r.prompt_computed)
    per_turn = [round(statistics.median(t), 4) for t in ttft]
    return {
        "conversations": n_conv,
        "turns": turns,
        "think_s": think,
        "ttft_per_turn": per_turn,
        "ttft_turn10_over_turn1": round(per_turn[-1] / per_turn[0], 3) if per_turn[0] else None,
        "prompt_tokens_per_turn_conv0": prompt_tokens,
        "prompt_computed_per_turn_conv0": computed,
    }


def as_dict(obj: Any) -> Any:
    """Dataclasses to plain dicts for JSON."""
    return asdict(obj) if hasattr(obj, "__dataclass_fields__") else obj
