"""Many conversations on few slots: the load a server with many users brings, side by side with llama-server.

    python -m benchmarks.roundrobin --model smollm2 --model qwen --llama-server PATH [--rounds 2]
    python -m benchmarks.roundrobin --quick --llama-server PATH   # a smoke test

12 conversations x 8 turns go round-robin through 4 clients to a server with 4 slots: client i
owns conversations i, i+4 and i+8 and sends their turns in that order, so each conversation's
slot is always taken by two others before its next turn. Scenarios:
- `openai`: `POST /v1/chat/completions`, each request resending the whole history (what every
  OpenAI-style client does: chat UIs, agents, the `openai` SDK);
- `sessions`: pureapi's `POST /chat` with a `session_id`, the server keeping the history;
- `restart`: the `openai` load for turns 1-4, the server stopped (SIGTERM) and started again on the
  same files, then turns 5-8.
pureapi runs the llama.cpp engine with `--parallel 4`; llama-server `-np 4`, the same GGUF, threads
and context per slot (an explicit -np gives each slot its own KV cells); with --kvu also
`llama-server-kvu`, the same with `-kvu`: one pool all slots share, as pureapi's do. Per turn: TTFT
(median over the 12 conversations) and prompt tokens the server computed rather than took from its
KV cache (median); overall: completion tokens per second of wall time, and the server's peak RSS.
Servers take turns within each round; figures are medians over rounds. It prints, and records under
"targets", issue 25's two ratios: pureapi's aggregate over llama-server's on the OpenAI API, and
each server's last turn TTFT over its first; and the last turn's over the second's, since turn 1
computes only the opening (~13 tokens) and every later turn ~25.
Results: benchmarks/results/roundrobin.json, chart: benchmarks/results/roundrobin.png.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from . import loadgen
from .run import ROOT, free_port, median_of, model_path, peak_rss_mb, save_chart, stop_server, wait_ready

SLOTS = 4
CLIENTS = 4
CONVERSATIONS = 12
TURNS = 8
SLOT_CTX = 2048
MAX_TOKENS = 32
TOPICS = [
    "gardening", "astronomy", "cooking pasta", "learning the guitar", "baking bread", "birdwatching",
    "learning French", "sailing", "chess openings", "volcanoes", "bees", "the printing press",
]  # fmt: skip
OUT = ROOT / "benchmarks" / "results"


def stream_session_chat(base: str, session: str, message: str, max_tokens: int) -> loadgen.Result:
    """One streamed turn of pureapi's seed API, timed like loadgen.stream_chat."""
    body = {"message": message, "session_id": session, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    started = time.perf_counter()
    first = last = 0.0
    parts: list[str] = []
    final: dict[str, Any] = {}
    try:
        with requests.post(base + "/chat", json=body, stream=True, timeout=600) as r:
            if r.status_code != 200:
                return loadgen.Result(False, r.status_code, error=r.text[:200])
            for line in r.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                if "delta" in event:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    parts.append(event["delta"])
                elif "error" in event:
                    return loadgen.Result(False, 200, error=event["error"])
                else:
                    final = event
    except requests.RequestException as exc:
        return loadgen.Result(False, error=str(exc)[:200])
    usage = final.get("usage") or {}
    end = last or time.perf_counter()
    return loadgen.Result(
        bool(parts),
        200,
        ttft=(first or end) - started,
        total=end - started,
        completion_tokens=int(usage.get("completion_tokens") or len(parts)),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        prompt_computed=int(usage["prompt_tokens"]) - int(usage["cached_tokens"]) if usage else None,
        text="".join(parts),
    )


class Load:
    """The conversations' state across calls, so that a restart can sit between two runs of turns."""

    def __init__(
        self,
        surface: str,
        conversations: int = CONVERSATIONS,
        clients: int = CLIENTS,
        max_tokens: int = MAX_TOKENS,
        extra: dict[str, Any] | None = None,  # request fields a server needs (transformers serve: its model)
    ):
        self.surface = surface
        self.conversations, self.clients, self.max_tokens, self.extra = conversations, clients, max_tokens, extra
        self.histories: list[list[dict[str, str]]] = [[] for _ in range(conversations)]
        self.ttft: dict[int, list[float]] = {}
        self.computed: dict[int, list[int]] = {}
        self.prompt: dict[int, list[int]] = {}
        self.tokens = 0
        self.seconds = 0.0
        self.failures = 0
        self._lock = threading.Lock()  # guards the figures, written by the client threads

    def turn(self, base: str, c: int, turn: int) -> None:
        question = f"Tell me one more thing about {TOPICS[c % len(TOPICS)]} (point {turn + 1})."
        if self.surface == "sessions":
            r = stream_session_chat(base, f"conv-{c}", question, self.max_tokens)
        else:
            self.histories[c].append({"role": "user", "content": question})
            r = loadgen.stream_chat(base, self.histories[c], self.max_tokens, self.extra)
        with self._lock:
            if not r.ok:
                self.failures += 1
                if self.surface != "sessions":
                    self.histories[c].pop()
                return
            if self.surface != "sessions":
                self.histories[c].append({"role": "assistant", "content": r.text})
            self.tokens += r.completion_tokens
            self.ttft.setdefault(turn, []).append(r.ttft)
            self.prompt.setdefault(turn, []).append(r.prompt_tokens)
            if r.prompt_computed is not None:
                self.computed.setdefault(turn, []).append(r.prompt_computed)

    def run(self, base: str, turns: range) -> None:
        """These turns of every conversation, round-robin through the clients."""

        def client(i: int) -> None:
            for turn in turns:
                for c in range(i, self.conversations, self.clients):
                    self.turn(base, c, turn)

        started = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.seconds += time.perf_counter() - started

    def report(self) -> dict[str, Any]:
        turns = sorted(self.ttft)
        ttft = [round(statistics.median(self.ttft[t]), 4) for t in turns]
        computed = [statistics.median(self.computed[t]) if self.computed.get(t) else None for t in turns]
        return {
            "ttft_per_turn": ttft,
            "ttft_last_over_first": round(ttft[-1] / ttft[0], 3) if ttft and ttft[0] else None,
            # Turn 1 computes only the opening (~13 tokens), every later turn ~25: the growth at equal work.
            "ttft_last_over_second": round(ttft[-1] / ttft[1], 3) if len(ttft) > 1 and ttft[1] else None,
            "prompt_tokens_per_turn": [statistics.median(self.prompt[t]) for t in turns],
            "prompt_computed_per_turn": computed,
            "aggregate_tps": round(self.tokens / self.seconds, 2) if self.seconds else 0.0,
            "failures": self.failures,
        }


def commands(
    gguf: Path, threads: int, llama_server: str | None, kvu: bool = False
) -> dict[str, Callable[[int, Path], list[str]]]:
    table: dict[str, Callable[[int, Path], list[str]]] = {
        "pureapi": lambda port, tmp: [
            sys.executable, str(ROOT / "pure_model_api.py"), "--model", str(gguf), "--engine", "llamacpp",
            "--cpu-threads", str(threads), "--parallel", str(SLOTS), "--ctx-size", str(SLOT_CTX),
            "--port", str(port), "--db", str(tmp / "sessions.db"), "--log-level", "warning",
        ],
    }  # fmt: skip
    if llama_server:
        table["llama-server"] = lambda port, tmp: [
            llama_server, "-m", str(gguf), "-t", str(threads), "-c", str(SLOT_CTX * SLOTS), "-np", str(SLOTS),
            "--port", str(port), "--log-disable",
        ]  # fmt: skip
        if kvu:
            table["llama-server-kvu"] = lambda port, tmp: [*table["llama-server"](port, tmp), "-kvu"]
    return table


class Server:
    """One server process; start() again after stop() is a restart on the same files."""

    def __init__(self, cmd: Callable[[int, Path], list[str]], tmp: Path):
        self.cmd, self.tmp = cmd, tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.peak_rss = 0.0

    def start(self) -> None:
        cmd = self.cmd(self.port, self.tmp)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_ready(self.url, self.proc, "/health")

    def stop(self) -> None:
        assert self.proc is not None
        self.peak_rss = max(self.peak_rss, peak_rss_mb(self.proc.pid))
        stop_server(self.proc)


def scenario(
    name: str,
    cmd: Callable[[int, Path], list[str]],
    surface: str,
    restart: bool,
    turns: int = TURNS,
    max_tokens: int = MAX_TOKENS,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(cmd, Path(tmp))
        load = Load(surface, max_tokens=max_tokens)
        server.start()
        try:
            if restart:
                load.run(server.url, range(turns // 2))
                server.stop()
                server.start()
                load.run(server.url, range(turns // 2, turns))
            else:
                load.run(server.url, range(turns))
        finally:
            server.stop()
        return {**load.report(), "peak_rss_mb": server.peak_rss}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="smollm2, qwen or a .gguf path (repeatable)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--kvu", action="store_true", help="also llama-server with one unified KV pool (-kvu)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 4 turns of up to 8 tokens")
    parser.add_argument("--out", type=Path, help="results JSON (--quick: a temporary one)")
    args = parser.parse_args()
    turns, max_tokens = (4, 8) if args.quick else (TURNS, MAX_TOKENS)
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="roundrobin-")) if args.quick else OUT
        args.out /= "roundrobin.json"
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "threads": args.threads,
        "slots": SLOTS,
        "clients": CLIENTS,
        "conversations": CONVERSATIONS,
        "turns": turns,
        "slot_ctx": SLOT_CTX,
        "max_tokens": max_tokens,
        "rounds": args.rounds,
        "models": {},
        "targets": {},
    }
    plan = [("openai", False), ("sessions", False), ("openai", True)]
    for model in args.model or ["smollm2"]:
        gguf = model_path(model)
        runs: dict[str, list[dict[str, Any]]] = {}
        for round_ in range(args.rounds):
            for server, cmd in commands(gguf, args.threads, args.llama_server, args.kvu).items():
                for surface, restart in plan:
                    if surface == "sessions" and server != "pureapi":
                        continue  # llama-server keeps no conversations
                    key = f"{server} {surface}{' restart' if restart else ''}"
                    result = scenario(server, cmd, surface, restart, turns, max_tokens)
                    runs.setdefault(key, []).append(result)
                    print(model, round_, key, json.dumps(result), flush=True)
        report["models"][gguf.stem] = {key: {**median_of(results), "rounds": results} for key, results in runs.items()}
        report["targets"][gguf.stem] = targets(runs)
        print(model, "targets:", json.dumps(report["targets"][gguf.stem]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("wrote", args.out)
    chart(report, args.out.with_suffix(".png"))
    return 0


def targets(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Issue 25's two targets over the OpenAI API: aggregate against llama-server's (>= 1.0, the median of
    the rounds' ratios) and the last turn's TTFT against the first (<= 1.2), per server."""
    out: dict[str, Any] = {}
    ours, theirs = runs.get("pureapi openai", []), runs.get("llama-server openai", [])
    if ours and theirs:
        pairs = zip(ours, theirs, strict=True)
        ratio = [a["aggregate_tps"] / b["aggregate_tps"] for a, b in pairs if b["aggregate_tps"]]
        out["pureapi aggregate over llama-server"] = round(statistics.median(ratio), 3) if ratio else None
    for key, results in runs.items():
        if key.endswith(" openai"):
            for which, name in (("first", "ttft_last_over_first"), ("second", "ttft_last_over_second")):
                values = [r[name] for r in results if r.get(name)]
                out[f"{key.split()[0]} last turn TTFT over {which}"] = (
                    round(statistics.median(values), 3) if values else None
                )
    return out


def chart(report: dict[str, Any], path: Path) -> None:
    """TTFT per turn, one panel per model, a line per server and scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, (model, scenarios) in zip(axes[0], models.items(), strict=True):
        for key, r in scenarios.items():
            turns = range(1, len(r["ttft_per_turn"]) + 1)
            style = "--" if "restart" in key else "-"
            ax.plot(turns, [t * 1000 for t in r["ttft_per_turn"]], style, marker="o", label=key)
        ax.set_title(f"{model}: {report['conversations']} conversations on {report['slots']} slots")
        half = report["turns"] // 2
        ax.set_xlabel(f"turn (restart between {half} and {half + 1} on dashed lines)")
        ax.set_ylabel("TTFT p50 (ms)")
    save_chart(fig, axes, path)


if __name__ == "__main__":
    raise SystemExit(main())
