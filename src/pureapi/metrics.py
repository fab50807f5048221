"""Prometheus metrics at /metrics: one registry per app, so that tests can build as many apps as they like."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .api.docs import Operation, declare
from .types import Chunk

if TYPE_CHECKING:
    from .app import AppState

# Seconds; a token on CPU takes milliseconds, a long reply minutes.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# What the engines report through Engine.metrics(); a key ending in _total is a counter.
ENGINE_HELP = {
    "slots_active": "llama.cpp slots generating now.",
    "slots_free": "llama.cpp slots idle now.",
    "kv_cache_hits_total": "Generations that reused some prompt KV (slot, copy or restored state) instead of "
    "computing the whole prompt.",
    "kv_cache_misses_total": "Generations that reused no prompt KV.",
    "reused_tokens_total": "Prompt tokens whose KV was reused rather than computed.",
    "generated_tokens_total": "Tokens the model sampled, a cancelled generation's included (up to where it stopped).",
    "restored_tokens_ram_total": "Prompt tokens restored from KV states saved in RAM.",
    "restored_tokens_disk_total": "Prompt tokens restored from KV states saved on disk.",
    "restored_bytes_ram_total": "Bytes of KV states restored from RAM.",
    "restored_bytes_disk_total": "Bytes of KV states restored from disk.",
    "evicted_slots_total": "Idle llama.cpp slots whose KV left the shared pool for the prompt cache (or was dropped) "
    "when another prompt was admitted or the pool was full.",
    "parked_jobs_total": "Running generations set aside (KV copied out) because the shared KV pool was full.",
    "resumed_jobs_total": "Parked generations put back into the KV pool.",
    "preempted_jobs_total": "Running generations set aside (KV copied out, back in the queue) so that a tenant "
    "below its fair share of the slots could start.",
    "compactions_total": "Times the llama.cpp slots' KV, scattered cell by cell by generating side by side, was "
    "laid out again in one run of cells per slot.",
    "compacted_tokens_total": "Tokens of KV those compactions moved.",
    "kv_pool_used_tokens": "Tokens of KV the llama.cpp slots hold now (a prefix two slots share counts twice).",
    "kv_pool_tokens": "Cells of the llama.cpp KV pool all slots share.",
    "slots_parked": "llama.cpp generations parked now, waiting for cells of the KV pool.",
    "saved_state_bytes_ram": "Bytes of saved KV states held in RAM now.",
    "saved_state_bytes_disk": "Bytes of saved KV states held on disk now.",
}


METRICS_OPERATION = Operation(
    "Prometheus metrics (text exposition format)",
    "seed",
    answer="Metrics",
    content={"text/plain": {"schema": {"type": "string"}}},
)


class _LiveCollector(Collector):
    """Values read at scrape time from the app's state: queue, sessions, model, engine counters."""

    def __init__(self, state: AppState):
        self.state = state

    def collect(self) -> Iterator[Metric]:
        state = self.state
        service = state.gateway
        yield GaugeMetricFamily(
            "pureapi_queue_depth", "Generations admitted and waiting for their first token.", value=service.waiting()
        )
        yield GaugeMetricFamily(
            "pureapi_generations_running", "Generations producing tokens now.", value=service.running()
        )
        yield GaugeMetricFamily(
            "pureapi_sessions", "Conversations kept in the session store.", value=state.store.count_sessions()
        )
        if _sees_tenants(state):
            yield from _tenant_metrics(state.limits.usage())
        if state.load_seconds is not None:
            yield GaugeMetricFamily(
                "pureapi_model_load_seconds",
                "Seconds the model took to load and answer its first token.",
                value=state.load_seconds,
            )
        engine = state.engine
        if engine is None:
            return
        info = GaugeMetricFamily(
            "pureapi_model_info", "The loaded model (always 1).", labels=["model", "engine", "device"]
        )
        info.add_metric([engine.model_name, engine.name, engine.device], 1)
        yield info
        yield GaugeMetricFamily(
            "pureapi_model_memory_bytes", "Bytes the model occupies.", value=engine.memory_allocated()
        )
        for key, value in sorted(engine.metrics().items()):
            name, help_text = "pureapi_engine_" + key, ENGINE_HELP.get(key, f"Engine counter {key}.")
            if key.endswith("_total"):
                yield CounterMetricFamily(name, help_text, value=value)
            else:
                yield GaugeMetricFamily(name, help_text, value=value)


def _sees_tenants(state: AppState) -> bool:
    """Other tenants' names and usage are for an admin key, a public /metrics, or a server without keys."""
    from .security import principal

    return not state.keys or state.settings.metrics_public or principal().admin


def _tenant_metrics(usage: dict[str, dict[str, int]]) -> Iterator[Metric]:
    """Per-tenant counts, labelled by the principal's name (never by its key)."""
    in_flight = GaugeMetricFamily("pureapi_tenant_in_flight", "Generations in flight, by tenant.", labels=["tenant"])
    requests = CounterMetricFamily("pureapi_tenant_generations", "Generations admitted, by tenant.", labels=["tenant"])
    rejected = CounterMetricFamily(
        "pureapi_tenant_rejected", "Generations refused by the tenant's limits (429), by tenant.", labels=["tenant"]
    )
    tokens = CounterMetricFamily(
        "pureapi_tenant_tokens", "Tokens by tenant and kind (prompt, completion).", labels=["tenant", "kind"]
    )
    for name, counts in usage.items():
        in_flight.add_metric([name], counts["in_flight"])
        requests.add_metric([name], counts["requests"])
        rejected.add_metric([name], counts["rejected"])
        tokens.add_metric([name, "prompt"], counts["prompt_tokens"])
        tokens.add_metric([name, "completion"], counts["completion_tokens"])
    yield from (in_flight, requests, rejected, tokens)


class Metrics:
    """The app's metric families; the session service and the request hooks feed them."""

    def __init__(self, state: AppState):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pureapi_requests", "HTTP requests answered.", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "pureapi_request_duration_seconds",
            "Seconds from a request's arrival until its response (a stream included) was sent.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "pureapi_time_to_first_token_seconds",
            "Seconds from a generation's admission to its first token (queueing, prefill, first step).",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "pureapi_tokens",
            "Tokens by kind: prompt (all of it), computed_prompt (prefilled; the rest was reused), completion.",
            ["kind"],
            registry=self.registry,
        )
        self.generations = Counter(
            "pureapi_generations", "Generations ended, by outcome.", ["outcome"], registry=self.registry
        )
        self.registry.register(_LiveCollector(state))

    def first_token(self, seconds: float) -> None:
        """A generation produced its first chunk `seconds` after admission."""
        self.ttft.observe(seconds)

    def generation_ended(self, last: Chunk | None, completed: bool) -> None:
        """Count a generation's tokens (those computed count even if it was cut short) and its outcome."""
        if last is not None:
            self.tokens.labels("prompt").inc(last.prompt_tokens)
            self.tokens.labels("computed_prompt").inc(max(0, last.prompt_tokens - last.cached_tokens))
            self.tokens.labels("completion").inc(last.completion_tokens)
        self.generations.labels("completed" if completed else "stopped").inc()

    def render(self) -> Response:
        """The exposition text."""
        return Response(generate_latest(self.registry), content_type=CONTENT_TYPE_LATEST)


def install(app: Flask, metrics: Metrics) -> None:
    """Count every request by route and status, time it to its last byte, and serve /metrics."""

    @app.before_request
    def _start() -> None:
        g.metrics_started = time.monotonic()

    @app.after_request
    def _count(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        method, status = request.method, str(response.status_code)
        started = g.get("metrics_started", time.monotonic())

        def done() -> None:
            metrics.requests.labels(route, method, status).inc()
            metrics.latency.labels(route).observe(time.monotonic() - started)

        # A streamed body is still being produced: count it when the server is done with it.
        if response.is_streamed:
            response.call_on_close(done)
        else:
            done()
        return response

    view: Callable[[], Any] = metrics.render
    app.add_url_rule("/metrics", "metrics", view, methods=["GET"])
    declare("metrics", METRICS_OPERATION)
