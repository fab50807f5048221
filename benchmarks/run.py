"""Benchmark pureapi against its peers, one server at a time, in one run on one machine.

    python -m benchmarks.run --model smollm2 --model qwen --threads 2 --rounds 3 \
        [--llama-server PATH] [--llama-bench PATH] [--out benchmarks/results]

Servers: pureapi (llama.cpp engine, --parallel 8, --ctx-size 1024 per slot), llama-cpp-python's own server
(`python -m llama_cpp.server`, one request at a time), and llama.cpp's llama-server (-np 8) and
llama-bench where their binaries are given (build them from the llama-cpp-python sdist, see the
README). Same GGUF, threads and total context for all. Results go to one JSON file per model.

This machine's speed drifts by about ±10% over minutes (it is shared), so with --rounds N every
server (and llama-bench) is measured N times, the servers taking turns within each round, and
each figure reported is the median over the rounds; the rounds themselves are kept in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from . import loadgen

ROOT = Path(__file__).resolve().parent.parent
CTX = 8192
PARALLEL = 8
THINK_S = 0.5  # the paced conversations' pause before each turn, a person reading the reply


def model_path(name: str) -> Path:
    """smollm2 / qwen, or a path to a .gguf file."""
    if name == "smollm2":
        from pureapi.models.resolve import embedded_path

        return embedded_path("smollm2")
    if name == "qwen":
        sys.path.insert(0, str(ROOT))
        from tests.models import qwen_gguf

        return qwen_gguf()
    return Path(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a process (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def wait_ready(url: str, proc: subprocess.Popen[bytes], probe: str, timeout: float = 600) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if requests.get(url + probe, timeout=2).status_code == 200:
                return time.perf_counter() - started
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise RuntimeError("server did not become ready")


def servers(gguf: Path, threads: int, llama_server: str | None) -> dict[str, Callable[[int, Path], list[str]]]:
    """How to start each server on a port."""
    table: dict[str, Callable[[int, Path], list[str]]] = {
        "pureapi": lambda port, tmp: [
            sys.executable, str(ROOT / "pure_model_api.py"), "--model", str(gguf), "--engine", "llamacpp",
            "--cpu-threads", str(threads), "--parallel", str(PARALLEL), "--ctx-size", str(CTX // PARALLEL),
            "--port", str(port), "--db", str(tmp / "sessions.db"), "--log-level", "warning",
        ],
        "llama-cpp-python": lambda port, tmp: [
            sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", str(threads),
            "--n_threads_batch", str(threads), "--n_ctx", str(CTX), "--port", str(port), "--verbose", "False",
            # By default a new request interrupts the one streaming; queue them instead, as users expect.
            "--interrupt_requests", "False",
        ],
    }  # fmt: skip
    if llama_server:
        table["llama-server"] = lambda port, tmp: [
            llama_server, "-m", str(gguf), "-t", str(threads), "-c", str(CTX), "-np", str(PARALLEL),
            "--port", str(port), "--log-disable",
        ]  # fmt: skip
    return table


def stop_server(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """SIGTERM, and SIGKILL if it has not exited within timeout seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def save_chart(fig: Any, axes: Any, path: Path) -> None:
    """The benchmarks' common chart finish: every panel from zero, gridded, with a legend; then the PNG."""
    for ax in axes.flat:
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print("wrote", path)


def bench_server(name: str, cmd: list[str], url: str, quick: bool) -> dict[str, Any]:
    probe = "/health" if name != "llama-cpp-python" else "/v1/models"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = wait_ready(url, proc, probe)
        result: dict[str, Any] = {"time_to_ready_s": round(ready, 3)}
        result["single_stream"] = loadgen.single_stream(url, 128, repeats=2 if quick else 3)
        result["concurrency"] = [loadgen.as_dict(loadgen.concurrent(url, n, 1 if quick else 2, 64)) for n in (1, 4, 8)]
        result["conversations"] = loadgen.conversations(url, 4, 10, 32 if quick else 48)
        result["conversations_paced"] = loadgen.conversations(
            url, 4, 10, 32 if quick else 48, think=THINK_S, topics=loadgen.PACED_TOPICS
        )
        result["peak_rss_mb"] = peak_rss_mb(proc.pid)
        return result
    finally:
        stop_server(proc, timeout=30)


def raw_speed(llama_bench: str, gguf: Path, threads: int) -> dict[str, Any]:
    """llama.cpp's own decode speed (tg128) and prompt speed (pp512), from llama-bench."""
    out = subprocess.run(
        [llama_bench, "-m", str(gguf), "-t", str(threads), "-p", "512", "-n", "128", "-r", "3", "-o", "json"],
        capture_output=True, text=True, check=True, timeout=900,
    )  # fmt: skip
    rows = json.loads(out.stdout)
    return {("decode_tps" if r["n_gen"] else "prompt_tps"): round(r["avg_ts"], 2) for r in rows}


def torch_machine() -> dict[str, Any]:
    """The machine and library versions a transformers benchmark records."""
    import torch
    import transformers

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def median_of(runs: list[Any]) -> Any:
    """Figure by figure, the median of several runs of the same measurement (nested dicts/lists)."""
    first = runs[0]
    if isinstance(first, bool) or first is None or isinstance(first, str):
        return first
    if isinstance(first, int | float):
        values = [r for r in runs if isinstance(r, int | float)]
        return round(statistics.median(values), 4)
    if isinstance(first, dict):
        return {k: median_of([r[k] for r in runs if isinstance(r, dict) and k in r]) for k in first}
    if isinstance(first, list) and all(isinstance(r, list) and len(r) == len(first) for r in runs):
        return [median_of([r[i] for r in runs]) for i in range(len(first))]
    return first


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="smollm2, qwen or a .gguf path (repeatable)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"))
    parser.add_argument("--llama-bench", default=os.environ.get("LLAMA_BENCH"))
    parser.add_argument("--only", action="append", help="run only these servers")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--rounds", type=int, default=1, help="measure everything N times; report medians")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.model or ["smollm2"]:
        gguf = model_path(name)
        report: dict[str, Any] = {
            "model": gguf.name,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "threads": args.threads,
            "ctx": CTX,
            "parallel": PARALLEL,
            "rounds": args.rounds,
            "servers": {},
        }
        path = args.out / f"{gguf.stem}.json"
        if args.only and path.exists():  # re-measure some servers, keep the others' figures
            previous = json.loads(path.read_text())
            report["servers"] = previous["servers"]
            if "llama_bench" in previous:
                report["llama_bench"] = previous["llama_bench"]
        runs: dict[str, list[Any]] = {}
        for round_ in range(args.rounds):
            if args.llama_bench:
                runs.setdefault("llama_bench", []).append(raw_speed(args.llama_bench, gguf, args.threads))
                print(name, round_, "llama-bench", runs["llama_bench"][-1], flush=True)
            for server, build in servers(gguf, args.threads, args.llama_server).items():
                if args.only and server not in args.only:
                    continue
                with tempfile.TemporaryDirectory() as tmp:
                    port = free_port()
                    result = bench_server(server, build(port, Path(tmp)), f"http://127.0.0.1:{port}", args.quick)
                runs.setdefault(server, []).append(result)
                print(name, round_, server, json.dumps(result)[:300], flush=True)
        if "llama_bench" in runs:
            report["llama_bench_rounds"] = runs["llama_bench"]
            report["llama_bench"] = median_of(runs.pop("llama_bench"))
        for server, results in runs.items():
            report["servers"][server] = {**median_of(results), "rounds": results}
        path.write_text(json.dumps(report, indent=2) + "\n")
        print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
