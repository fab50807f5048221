"""Several tenants on one server: a tenant's chat while another tenant's batch job fills every slot.

    python -m benchmarks.tenants [--rounds 2] [--bulk-clients 24] [--source NAME=PATH ...] [--out FILE]

Two API keys (a key file): `bulk` runs 24 clients (--bulk-clients) that stream replies of 128 to 383 tokens back to
back, starting 0.4 s apart (more clients than the 16 default slots, so about 8 of them always wait in
the queue, and slots free one at a time, as with real clients), and `chat` sends one short request
at a time (64 tokens), pausing 0.5 s between them.
The server runs at default flags otherwise (the embedded SmolLM2, llama.cpp engine). Per round and
source: `chat` alone first (its TTFT with the server idle), then `chat` while `bulk` runs. Figures:
chat's TTFT (median and worst), its whole reply time, and bulk's aggregate tokens/s while chat's
requests ran (the engine's generated tokens from /metrics over that window, less chat's own), with
the generations preempted for chat in it. Sources (this checkout unless --source names others) take
turns within each round; figures are medians over the rounds. Results:
benchmarks/results/tenants.json, chart tenants.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

from . import loadgen
from .run import ROOT, free_port, save_chart, stop_server, wait_ready

OUT = ROOT / "benchmarks" / "results"
BULK_CLIENTS = 24
BULK_TOKENS = (128, 384)  # each bulk request asks for a length in [lo, hi)
BULK_STAGGER_S = 0.4
CHAT_TOKENS = 64
CHAT_REQUESTS = 5
CHAT_PAUSE_S = 0.5
BULK_HEAD_START_S = 15.0  # let bulk fill the slots and the queue before chat asks
KEYS = {"bulk": "key-of-bulk", "chat": "key-of-chat"}


def headers(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def chat_turns(url: str, n: int) -> list[loadgen.Result]:
    """n short requests from the chat tenant, one at a time."""
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": f"In one sentence, what is {loadgen.TOPICS[i % 4]}?"}]
        out.append(loadgen.stream_chat(url, messages, CHAT_TOKENS, headers=headers("chat")))
        time.sleep(CHAT_PAUSE_S)
    return out


def bulk_load(url: str, stop: threading.Event, results: list[loadgen.Result], clients: int) -> list[threading.Thread]:
    """`clients` threads streaming long replies for the bulk tenant until `stop` is set; a refused request
    (503, 429) is asked again after the server's Retry-After of 1 s, as a well-behaved client does."""
    lock = threading.Lock()

    def client(i: int) -> None:
        j = 0
        stop.wait(i * BULK_STAGGER_S)
        lo, hi = BULK_TOKENS
        while not stop.is_set():
            prompt = loadgen.PROMPTS[(i + j) % len(loadgen.PROMPTS)]
            tokens = lo + (i * 37 + j * 101) % (hi - lo)
            r = loadgen.stream_chat(url, [{"role": "user", "content": prompt}], tokens, headers=headers("bulk"))
            with lock:
                results.append(r)
            j += 1
            if not r.ok:
                stop.wait(1.0)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    return threads


def engine_counters(url: str) -> dict[str, float]:
    """The engine's counters from /metrics (`pureapi_engine_<name>_total` -> value), as the bulk tenant sees them."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{url}/metrics", headers=headers("bulk"), timeout=30).text
    prefix = "pureapi_engine_"
    return {
        sample.name[len(prefix) :]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith(prefix) and sample.name.endswith("_total")
    }


def summarize(chat: list[loadgen.Result]) -> dict[str, Any]:
    good = [r for r in chat if r.ok]
    return {
        "requests": len(chat),
        "failures": len(chat) - len(good),
        "ttft_p50": round(statistics.median(r.ttft for r in good), 3) if good else None,
        "ttft_max": round(max(r.ttft for r in good), 3) if good else None,
        "total_p50": round(statistics.median(r.total for r in good), 3) if good else None,
        "statuses": sorted({r.status for r in chat if not r.ok}),
    }


def measure(source: Path, clients: int) -> dict[str, Any]:
    """Start the source's server with two tenants, measure chat alone, then beside bulk, and stop it."""
    with tempfile.TemporaryDirectory(prefix="tenants-") as tmp:
        key_file = Path(tmp, "keys")
        key_file.write_text("".join(f"{name}:{key}\n" for name, key in KEYS.items()))
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(source / "src")}
        cmd = [sys.executable, str(source / "pure_model_api.py"), "--port", str(port), "--api-key-file", str(key_file)]
        cmd += ["--db", str(Path(tmp, "sessions.db")), "--log-level", "warning"]
        proc = subprocess.Popen(cmd, env=env, cwd=source, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, proc, "/health", timeout=120)
            chat_turns(url, 1)  # warm-up
            alone = chat_turns(url, CHAT_REQUESTS)
            stop, bulk = threading.Event(), []
            started = time.perf_counter()
            threads = bulk_load(url, stop, bulk, clients)
            time.sleep(BULK_HEAD_START_S)
            before, chat_started = engine_counters(url), time.perf_counter()
            during = chat_turns(url, CHAT_REQUESTS)
            after, chat_window = engine_counters(url), time.perf_counter() - chat_started
            stop.set()
            window = time.perf_counter() - started
            for t in threads:
                t.join()
            # Bulk's aggregate while chat ran: every token the engine generated then, less chat's own.
            generated = after["generated_tokens_total"] - before["generated_tokens_total"]
            bulk_during = generated - sum(r.completion_tokens for r in during if r.ok)
            return {
                "chat_alone": summarize(alone),
                "chat_beside_bulk": summarize(during),
                "bulk_tps": round(bulk_during / chat_window, 2),
                "bulk_failures": sum(not r.ok for r in bulk),
                "bulk_statuses": sorted({r.status for r in bulk if not r.ok}),
                "preempted": after.get("preempted_jobs_total", 0) - before.get("preempted_jobs_total", 0),
                "chat_window_s": round(chat_window, 1),
                "window_s": round(window, 1),
            }
        finally:
            stop_server(proc)


def median_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(get: Any) -> float | None:
        values = [v for v in (get(r) for r in runs) if v is not None]
        return round(statistics.median(values), 3) if values else None

    return {
        "chat_alone_ttft_p50": med(lambda r: r["chat_alone"]["ttft_p50"]),
        "chat_beside_bulk_ttft_p50": med(lambda r: r["chat_beside_bulk"]["ttft_p50"]),
        "chat_beside_bulk_ttft_max": med(lambda r: r["chat_beside_bulk"]["ttft_max"]),
        "chat_beside_bulk_total_p50": med(lambda r: r["chat_beside_bulk"]["total_p50"]),
        "bulk_tps": med(lambda r: r["bulk_tps"]),
        "preempted": med(lambda r: r.get("preempted")),
        "chat_beside_bulk_failures": sum(r["chat_beside_bulk"]["failures"] for r in runs),
        "chat_beside_bulk_requests": sum(r["chat_beside_bulk"]["requests"] for r in runs),
    }


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["sources"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    ttft, tps = axes[0][0], axes[0][1]
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        m = report["sources"][name]["median"]
        xs = [x + i * width for x in range(3)]
        values = [m["chat_alone_ttft_p50"], m["chat_beside_bulk_ttft_p50"], m["chat_beside_bulk_ttft_max"]]
        bars = ttft.bar(xs, [v or 0 for v in values], width, label=name)
        refused = f"{m.get('chat_beside_bulk_failures', 0)}/{m.get('chat_beside_bulk_requests', 0)} refused"
        labels = [f"{v:.2g} s" if v is not None else refused if k else "" for k, v in enumerate(values)]
        ttft.bar_label(bars, labels=labels, fontsize=7)
        bars = tps.bar([i], [m["bulk_tps"] or 0], 0.6, label=name)
        tps.bar_label(bars, fmt="%.0f", fontsize=7)
    ttft.set_xticks([x + width * (len(names) - 1) / 2 for x in range(3)])
    ttft.set_xticklabels(["alone, median", "beside bulk, median", "beside bulk, worst"])
    ttft.set_ylabel("chat tenant's time to first token (s)")
    ttft.set_title(f"chat while bulk streams {report['bulk']['clients']} clients on 16 slots")
    tps.set_xticks(range(len(names)))
    tps.set_xticklabels(names)
    tps.set_ylabel("bulk tenant's tokens/s")
    tps.set_title("bulk tenant's aggregate while chat asks")
    save_chart(fig, axes, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--source", action="append", default=[], help="NAME=PATH of a checkout to run")
    parser.add_argument(
        "--bulk-clients",
        type=int,
        default=BULK_CLIENTS,
        help="bulk's concurrent clients (more than --max-queue + slots, 32 at default flags, fill the server)",
    )
    parser.add_argument("--out", type=Path, default=OUT / "tenants.json")
    args = parser.parse_args()
    sources = {name: Path(path) for name, path in (s.split("=", 1) for s in args.source)} or {"pureapi": ROOT}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sources}
    started = time.time()
    for r in range(args.rounds):
        for name, path in sources.items():
            result = measure(path, args.bulk_clients)
            runs[name].append(result)
            print(f"round {r + 1} {name}: {json.dumps(result)}", flush=True)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "bulk": {"clients": args.bulk_clients, "max_tokens": BULK_TOKENS},
        "chat": {"requests": CHAT_REQUESTS, "max_tokens": CHAT_TOKENS, "pause_s": CHAT_PAUSE_S},
        "minutes": round((time.time() - started) / 60, 1),
        "sources": {name: {"median": median_figures(rs), "rounds": rs} for name, rs in runs.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("wrote", args.out)
    for name, s in report["sources"].items():
        print(name, json.dumps(s["median"]))
    chart(report, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
