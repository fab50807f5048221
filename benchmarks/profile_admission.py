"""Where the llama.cpp scheduler's time goes when clients outnumber slots: admission, KV saves, restores, decode.

    python -m benchmarks.profile_admission [--model smollm2] [--clients 8 16] [--conversations 12] [--out PATH]

Starts pureapi at default flags (16 slots over one KV pool) in a child process whose scheduler methods are wrapped in
timers (nothing in the engine changes), then runs, one after another:
- `N clients`: N streaming clients, two 64-token replies each, the prompts of the default-flags
  benchmark (8 different prompts: whenever a prompt takes a slot, the slot's last reply is saved);
- `C conversations`: C stateless conversations of 8 turns, one client each, every request resending
  the whole history (so turns are restored from saved states, and slots saved again when taken).
For each load it prints the scheduler's time per call site as a tree (`admit/save/state` is the KV
copy made by a save during admission), as a share of the scheduler's busy time (admit + step +
idle) and of the load's wall time, with call counts and the engine's reuse counters.
Results: the printed table, and the JSON at --out (default: a temporary file).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import loadgen
from .run import ROOT, free_port, model_path, stop_server, wait_ready

# What is timed: (module, class or None for a module function, attribute, label).
TIMED = [
    ("pureapi.engines.llamacpp.engine", "LlamaCppEngine", "admit", "admit"),
    ("pureapi.engines.llamacpp.engine", "LlamaCppEngine", "step", "step"),
    ("pureapi.engines.llamacpp.engine", "LlamaCppEngine", "idle", "idle"),
    ("pureapi.engines.llamacpp.engine", "LlamaCppEngine", "drop", "drop"),
    ("pureapi.engines.llamacpp.engine", "LlamaCppEngine", "_finish", "finish"),
    ("pureapi.engines.llamacpp.engine", None, "make_sampler", "make_sampler"),
    ("pureapi.engines.llamacpp.prompt_cache", "PromptCache", "find", "find"),
    ("pureapi.engines.llamacpp.prompt_cache", "PromptCache", "covers", "covers"),
    ("pureapi.engines.llamacpp.prompt_cache", "PromptCache", "put", "put"),
    ("pureapi.engines.llamacpp.prompt_cache", "PromptCache", "read", "read"),
    ("pureapi.engines.llamacpp.reuse", "KVReuse", "save", "save"),
    ("pureapi.engines.llamacpp.reuse", "KVReuse", "restore", "restore"),
    ("pureapi.engines.llamacpp.reuse", "KVReuse", "copy_prefix", "copy_prefix"),
    ("pureapi.engines.llamacpp.kv", "SequenceKV", "state", "state"),
    ("pureapi.engines.llamacpp.kv", "SequenceKV", "load", "load"),
    ("pureapi.engines.llamacpp.kv", "SequenceKV", "trim", "trim"),
    ("pureapi.engines.llamacpp.kv", "SequenceKV", "share", "share"),
    ("pureapi.engines.llamacpp.reuse", "KVReuse", "evict_idle", "evict_idle"),
    ("pureapi.engines.llamacpp.pool", "KVPool", "park", "park"),
    ("pureapi.engines.llamacpp.pool", "KVPool", "resume", "resume"),
    ("pureapi.engines.llamacpp.batch", "Batch", "decode", "decode"),
    ("pureapi.engines.llamacpp.sampling", "Sampler", "sample", "sample"),
    ("pureapi.engines.llamacpp.state_files", "StateFiles", "put", "disk_write"),
    ("pureapi.engines.llamacpp.state_files", "StateFiles", "take", "disk_read"),
    ("pureapi.engines.jobs", "Job", "emit", "emit"),
]
TOP = ("admit", "step", "idle", "drop")  # what the scheduler runs; their sum is its busy time


def install_timers(totals: dict[str, list[float]], engines: list[Any]) -> None:
    """Wrap every TIMED callable: time per call path on the calling thread (`admit/save/state`)."""
    import importlib

    local = threading.local()

    def wrap(orig: Callable[..., Any], label: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            stack = local.__dict__.setdefault("stack", [])
            if label == "admit" and not engines:
                engines.append(args[0])
            stack.append(label)
            path = "/".join(stack)
            started = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                cell = totals.setdefault(path, [0.0, 0])
                cell[0] += time.perf_counter() - started
                cell[1] += 1
                stack.pop()

        return timed

    for module_name, cls_name, attr, label in TIMED:
        module = importlib.import_module(module_name)
        owner = getattr(module, cls_name) if cls_name else module
        setattr(owner, attr, wrap(getattr(owner, attr), label))


def serve(stats_file: Path, argv: list[str]) -> int:
    """The child: pureapi with timers, its totals written to stats_file four times a second."""
    sys.path.insert(0, str(ROOT / "src"))
    totals: dict[str, list[float]] = {}
    engines: list[Any] = []
    install_timers(totals, engines)

    def dump() -> None:
        while True:
            time.sleep(0.25)
            snapshot = {
                "totals": {k: list(v) for k, v in list(totals.items())},
                "engine": dict(engines[0].stats) if engines else {},
            }
            tmp = stats_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(snapshot))
            os.replace(tmp, stats_file)

    threading.Thread(target=dump, daemon=True, name="profile-dump").start()
    from pureapi.cli import run_serve

    return int(run_serve(argv, prog="pureapi (profiled)"))


def snapshot(stats_file: Path) -> dict[str, Any]:
    time.sleep(0.6)  # past the next dump
    if not stats_file.exists():
        return {"totals": {}, "engine": {}}
    found: dict[str, Any] = json.loads(stats_file.read_text())
    return found


def delta(before: dict[str, Any], after: dict[str, Any], wall: float) -> dict[str, Any]:
    """What one load cost: per call path, seconds, calls and shares of busy and wall time."""
    paths: dict[str, Any] = {}
    for path, (secs, calls) in after["totals"].items():
        old = before["totals"].get(path, [0.0, 0])
        if calls - old[1]:
            paths[path] = {"seconds": secs - old[0], "calls": calls - old[1]}
    busy = sum(v["seconds"] for p, v in paths.items() if p in TOP)
    for v in paths.values():
        v["share_busy"] = round(v["seconds"] / busy, 4) if busy else 0.0
        v["share_wall"] = round(v["seconds"] / wall, 4)
        v["ms_per_call"] = round(1000 * v["seconds"] / v["calls"], 3)
        v["seconds"] = round(v["seconds"], 4)
    engine = {k: v - before["engine"].get(k, 0) for k, v in after["engine"].items() if v - before["engine"].get(k, 0)}
    return {"wall_s": round(wall, 2), "busy_s": round(busy, 3), "paths": dict(sorted(paths.items())), "engine": engine}


def show(name: str, result: dict[str, Any]) -> None:
    print(f"\n== {name}: wall {result['wall_s']} s, scheduler busy {result['busy_s']} s")
    print(f"{'call path':42} {'s':>8} {'% busy':>7} {'% wall':>7} {'calls':>7} {'ms/call':>8}")
    for path, v in result["paths"].items():
        indent = "  " * path.count("/") + path.rsplit("/", 1)[-1]
        print(
            f"{indent:42} {v['seconds']:8.3f} {100 * v['share_busy']:7.1f} {100 * v['share_wall']:7.1f}"
            f" {v['calls']:7d} {v['ms_per_call']:8.3f}"
        )
    print("engine counters:", json.dumps(result["engine"]))


def conversations(url: str, count: int, turns: int) -> dict[str, Any]:
    """count stateless conversations, one client each, resending their histories (roundrobin's load)."""
    from .roundrobin import Load

    load = Load("openai", conversations=count, clients=count)
    load.run(url, range(turns))
    return load.report()


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":  # the child
        return serve(Path(sys.argv[2]), sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, qwen or a .gguf path")
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--conversations", type=int, default=12, help="0: leave that load out")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--flag", action="append", default=[], help="a pureapi flag to add (repeatable)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results: dict[str, Any] = {"model": args.model, "flags": args.flag, "loads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        stats_file = Path(tmp) / "stats.json"
        port = free_port()
        cmd = [sys.executable, "-m", "benchmarks.profile_admission", "--serve", str(stats_file)]
        cmd += ["--port", str(port), "--db", str(Path(tmp) / "s.db"), *args.flag]
        if args.model != "smollm2":
            cmd += ["--model", str(model_path(args.model))]
        server_log = Path(tmp) / "server.log"
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=server_log.open("wb"))
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, proc, "/health")
            loadgen.single_stream(url, 16, repeats=1)  # warm-up
            loads: list[tuple[str, Callable[[], Any]]] = [
                (f"{n} clients", functools.partial(loadgen.concurrent, url, n, 2, args.max_tokens))
                for n in args.clients
            ]
            if args.conversations:
                loads.append(
                    (f"{args.conversations} conversations", lambda: conversations(url, args.conversations, args.turns))
                )
            for name, load in loads:
                before = snapshot(stats_file)
                started = time.perf_counter()
                outcome = loadgen.as_dict(load())
                wall = time.perf_counter() - started
                result = delta(before, snapshot(stats_file), wall)
                result["load"] = {k: v for k, v in outcome.items() if k != "per_request"}
                results["loads"][name] = result
                show(name, result)
        except Exception:
            print("the server's log ends:\n" + server_log.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        finally:
            stop_server(proc)
    out = args.out or Path(tempfile.mkdtemp(prefix="profile-admission-")) / "profile.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print("\nwrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
