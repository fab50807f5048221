"""What a user gets at default flags: 1-16 streaming clients on pureapi and its peers, beside llama.cpp's ceiling.

    python -m benchmarks.default_flags --model smollm2 --model qwen --rounds 2 \
        --llama-server lcpp/bin/llama-server --batched-bench lcpp/bin/llama-batched-bench
    python -m benchmarks.default_flags --quick --llama-server ... --batched-bench ...   # a smoke test

Servers, each started as a new user would, with only a port, a scratch database and the threads:
- `pureapi`: no flags (the llama.cpp engine, its default slots over its default KV pool);
- `llama-server`: `llama-server -m GGUF -t T`, its defaults: 4 slots over one unified KV pool of the
  model's trained context, its prompt cache on;
- `llama-server-same`: `-np <pureapi's slots> -c <pureapi's pool> -kvu`: the same slots over the same
  unified pool as pureapi (an explicit -np alone would turn llama-server's unified pool off);
- `llama-cpp-python`: `python -m llama_cpp.server` at its defaults but two: the same threads, and a
  new request queued instead of interrupting the one streaming.
All get the same threads (default: the cores this process may use). Clients stream
/v1/chat/completions at temperature 0, two requests each back to back, replies of up to 64 tokens
("short") and up to 256 ("long"). The ceiling is `llama-batched-bench` on the same GGUF and
threads: 1, 2, 4, 8 and 16 sequences, 64-token prompts, as many tokens generated each as the
replies allow (64 or 256, so the attention is as deep as the servers'); its decode rate (S_TG) at N
sequences is what N clients could get at most if prompts cost nothing, and N x generated / (prompt +
decode time) what they could get with each sequence's prompt computed once. It runs twice: with a
KV stream per sequence (batched-bench's default, each sequence attends to its own cells only) and
with one unified pool (`-kvu`, the layout of pureapi's slots and of llama-server at its defaults,
where every sequence's attention spans the pool's used cells and masks the others').
Each round runs batched-bench and then every server, the servers in a rotated order each round
(the machine's speed drifts); figures are medians over rounds, ratios the medians of each
round's ratios. Results: benchmarks/results/default_flags.json and default_flags.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import loadgen
from .run import ROOT, free_port, median_of, model_path, peak_rss_mb, save_chart, stop_server, wait_ready

OUT = ROOT / "benchmarks" / "results" / "default_flags.json"
SERVERS = ("pureapi", "llama-server", "llama-server-same", "llama-cpp-python")
# llama_cpp.server's own dependencies, which llama-cpp-python installs only with its [server] extra.
CPP_SERVER_DEPS = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")


class Plan:
    """The sizes of one run: full, or --quick for a smoke test."""

    def __init__(self, quick: bool, clients: list[int] | None, rounds: int | None, replies: list[str] | None = None):
        self.quick = quick
        self.clients = clients or ([1, 4] if quick else [1, 4, 8, 16])
        self.rounds = rounds or (1 if quick else 2)
        lengths = {"short": 16, "long": 48} if quick else {"short": 64, "long": 256}
        self.lengths = {label: n for label, n in lengths.items() if label in (replies or lengths)}
        self.per_client = 1 if quick else 2
        self.bench_pl = [1, 2, 4] if quick else [1, 2, 4, 8, 16]
        self.bench_pp = 64
        self.layouts = {"streams": [], "pool": ["-kvu"]}  # batched-bench's KV layouts: its default, pureapi's


def default_shape(gguf: Path) -> tuple[int, int]:
    """pureapi's slots and KV pool at default flags: a window of the model's trained context (capped on a
    CPU), POOL_WINDOWS of them, and as many slots as the loader gives that pool."""
    from pureapi.engines.llamacpp.loader import default_slots, default_window
    from pureapi.engines.llamacpp.model import LlamaModel
    from pureapi.models.resolve import pool_windows

    model = LlamaModel(gguf)
    try:
        window = default_window(model)
    finally:
        model.free()
    pool = window * pool_windows(None)
    return default_slots(pool, window), pool


def commands(
    model: str, gguf: Path, threads: int, default_threads: bool, llama_server: str | None, tmp: Path
) -> dict[str, Callable[[int], list[str]]]:
    """How each server starts at its defaults, on a port."""
    pureapi = [sys.executable, str(ROOT / "pure_model_api.py"), "--db", str(tmp / "s.db")]
    if model != "smollm2":  # the embedded model needs no flag
        pureapi += ["--model", str(gguf)]
    if not default_threads:
        pureapi += ["--cpu-threads", str(threads)]
    t = str(threads)
    table: dict[str, Callable[[int], list[str]]] = {"pureapi": lambda port: [*pureapi, "--port", str(port)]}
    if llama_server:
        slots, pool = map(str, default_shape(gguf))
        table["llama-server"] = lambda port: [llama_server, "-m", str(gguf), "-t", t, "--port", str(port)]
        table["llama-server-same"] = lambda port: [
            llama_server, "-m", str(gguf), "-t", t, "-np", slots, "-c", pool, "-kvu", "--port", str(port),
        ]  # fmt: skip
    table["llama-cpp-python"] = lambda port: [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
        "--n_threads", t, "--n_threads_batch", t, "--interrupt_requests", "False",
    ]  # fmt: skip
    return table


def measure(name: str, command: list[str], port: int, plan: Plan) -> dict[str, Any]:
    """Start one server, run the single stream and every client count at both reply lengths, stop it."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        # pureapi and llama-server answer /health with 200 once the model answers; llama_cpp.server has no /health.
        ready = wait_ready(url, proc, "/v1/models" if name == "llama-cpp-python" else "/health")
        result: dict[str, Any] = {"ready_s": round(ready, 2), "single": loadgen.single_stream(url, 64)}
        for label, max_tokens in plan.lengths.items():
            for n in plan.clients:
                run = loadgen.concurrent(url, n, plan.per_client, max_tokens)
                result[f"{label} {n}"] = {
                    **{k: v for k, v in loadgen.as_dict(run).items() if k != "per_request"},
                    "tokens_per_request": round(run.tokens / max(run.requests - run.failures, 1), 1),
                }
                print(f"  {name}: {label} replies, {n} clients: {run.aggregate_tps} tok/s", flush=True)
                if run.failures:
                    print(f"  {name}: {run.failures} of {run.requests} requests failed", flush=True)
        result["peak_rss_mb"] = peak_rss_mb(proc.pid)
        return result
    finally:
        stop_server(proc)


def batched_bench(binary: str, gguf: Path, threads: int, plan: Plan, tg: int, layout: list[str]) -> dict[str, Any]:
    """llama.cpp's aggregate prompt and decode rates at each sequence count (prompts not shared),
    generating tg tokens a sequence, with the KV layout's flags."""
    pp = plan.bench_pp
    cmd = [
        binary, "-m", str(gguf), "-t", str(threads), "-tb", str(threads),
        "-c", str(max(plan.bench_pl) * (pp + tg)), "-npp", str(pp), "-ntg", str(tg),
        "-npl", ",".join(map(str, plan.bench_pl)), "--output-format", "jsonl", *layout,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"llama-batched-bench failed ({out.returncode}): {out.stderr[-2000:]}")
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if not rows:
        raise RuntimeError(f"llama-batched-bench printed no results: {out.stdout[-2000:]}")
    result: dict[str, Any] = {"flash_attn": rows[0].get("flash_attn"), "n_kv_max": rows[0].get("n_kv_max")}
    for r in rows:
        result[str(r["pl"])] = {
            "prompt_tps": round(r["speed_pp"], 2),
            "decode_tps": round(r["speed_tg"], 2),
            # Generated tokens over the whole time, prompts included: the rate N clients could see at most.
            "end_to_end_tps": round(r["pl"] * r["tg"] / r["t"], 2),
        }
    print(f"  llama-batched-bench: {json.dumps({k: v for k, v in result.items() if k[0].isdigit()})}", flush=True)
    return result


def ratios(rounds: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    """pureapi over each peer and over the ceiling, per reply length and client count: medians of the rounds'."""
    out: dict[str, Any] = {}
    for label in plan.lengths:
        for n in plan.clients:
            key = f"{label} {n}"
            per: dict[str, list[float]] = {}
            for r in rounds:
                ours = r["servers"].get("pureapi", {}).get(key, {}).get("aggregate_tps")
                if not ours:
                    continue
                for peer in SERVERS[1:]:
                    theirs = r["servers"].get(peer, {}).get(key, {}).get("aggregate_tps")
                    if theirs:
                        per.setdefault(f"over {peer}", []).append(ours / theirs)
                ceilings = (r.get("ceilings") or {}).get(label, {})
                ceiling, pooled = ceilings.get("streams", {}).get(str(n)), ceilings.get("pool", {}).get(str(n))
                if ceiling:
                    per.setdefault("over ceiling decode", []).append(ours / ceiling["decode_tps"])
                    per.setdefault("over ceiling end-to-end", []).append(ours / ceiling["end_to_end_tps"])
                if pooled:
                    per.setdefault("over pooled ceiling decode", []).append(ours / pooled["decode_tps"])
            out[key] = {k: round(statistics.median(v), 3) for k, v in per.items()}
    return out


def run_model(model: str, args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    """Every round of one model: the ceiling, then the servers in turn."""
    gguf = model_path(model)
    rounds: list[dict[str, Any]] = []
    for r in range(plan.rounds):
        entry: dict[str, Any] = {"servers": {}}
        if args.batched_bench:
            entry["ceilings"] = {}
            for label, tg in plan.lengths.items():
                for layout, flags in plan.layouts.items():
                    print(f"{model} round {r + 1}: llama-batched-bench, {tg} generated, {layout}", flush=True)
                    bench = batched_bench(args.batched_bench, gguf, args.threads, plan, tg, flags)
                    entry["ceilings"].setdefault(label, {})[layout] = bench
        with tempfile.TemporaryDirectory() as tmp:
            table = commands(model, gguf, args.threads, args.default_threads, args.llama_server, Path(tmp))
            names = [n for n in table if n in args.only]
            order = names[r % len(names) :] + names[: r % len(names)]
            print(f"{model} round {r + 1}: {' then '.join(order)}", flush=True)
            for name in order:
                port = free_port()
                entry["servers"][name] = measure(name, table[name](port), port, plan)
        rounds.append(entry)
    servers = {name: median_of([x["servers"][name] for x in rounds]) for name in rounds[0]["servers"]}
    result: dict[str, Any] = {"gguf": gguf.name, "servers": servers, "ratios": ratios(rounds, plan), "rounds": rounds}
    if args.batched_bench:
        result["ceilings"] = median_of([x["ceilings"] for x in rounds])
    return result


def summary(report: dict[str, Any]) -> None:
    """The medians and ratios, one line per reply length and client count."""
    for model, res in report["models"].items():
        for key, rat in res["ratios"].items():
            tps = {name: s.get(key, {}).get("aggregate_tps") for name, s in res["servers"].items()}
            label, n = key.split()
            ceilings = (res.get("ceilings") or {}).get(label, {})
            line = ", ".join(f"{name} {v}" for name, v in tps.items())
            if ceiling := ceilings.get("streams", {}).get(n):
                line += f", ceiling {ceiling['decode_tps']} decode / {ceiling['end_to_end_tps']} end-to-end"
            if pooled := ceilings.get("pool", {}).get(n):
                line += f", pooled ceiling {pooled['decode_tps']} decode"
            rats = ", ".join(f"{k} {v}x" for k, v in rat.items())
            print(f"{model} {key} clients: {line}\n    pureapi {rats}")


def chart(report: dict[str, Any], path: Path) -> None:
    """Aggregate tokens/s per client count, one panel per model and reply length, the ceiling as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    lengths = report["reply_tokens"]
    fig, axes = plt.subplots(len(models), len(lengths), figsize=(6 * len(lengths), 4 * len(models)), squeeze=False)
    for row, res in zip(axes, models.values(), strict=True):
        for ax, (label, max_tokens) in zip(row, lengths.items(), strict=True):
            ceilings = (res.get("ceilings") or {}).get(label, {})
            bench, pooled = ceilings.get("streams", {}), ceilings.get("pool", {})
            clients = report["clients"]
            for name, s in res["servers"].items():
                tps = [s.get(f"{label} {n}", {}).get("aggregate_tps") for n in clients]
                ax.plot(clients, tps, marker="o", label=name)
            pl = [n for n in clients if str(n) in bench]
            if pl:
                ax.plot(pl, [bench[str(n)]["decode_tps"] for n in pl], "k--", label="batched-bench decode (ceiling)")
                ax.plot(pl, [bench[str(n)]["end_to_end_tps"] for n in pl], "k:", label="batched-bench with prompts")
            pl = [n for n in clients if str(n) in pooled]
            if pl:
                ax.plot(pl, [pooled[str(n)]["decode_tps"] for n in pl], "k-.", label="batched-bench decode, one pool")
            ax.set_title(f"{res['gguf']}: replies up to {max_tokens} tokens")
            ax.set_xlabel("concurrent streaming clients")
            ax.set_ylabel("aggregate tokens/s")
            ax.set_xticks(clients)
    save_chart(fig, axes, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", choices=["smollm2", "qwen"])
    parser.add_argument("--rounds", type=int, help="default 2 (--quick: 1)")
    parser.add_argument("--clients", type=int, nargs="+", help="default 1 4 8 16 (--quick: 1 4)")
    parser.add_argument("--threads", type=int, help="every server's and batched-bench's (default: the cores)")
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"))
    parser.add_argument("--batched-bench", default=os.environ.get("LLAMA_BATCHED_BENCH"))
    parser.add_argument("--only", nargs="+", choices=SERVERS, default=list(SERVERS), help="run only these servers")
    parser.add_argument("--replies", nargs="+", choices=["short", "long"], help="reply lengths (default: both)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: short replies, 1 request per client")
    parser.add_argument("--out", type=Path, help="results JSON (default: benchmarks/results/default_flags.json; "
                        "--quick: a temporary folder's)")  # fmt: skip
    args = parser.parse_args()
    plan = Plan(args.quick, args.clients, args.rounds, args.replies)
    cores = len(os.sched_getaffinity(0))
    args.default_threads = args.threads is None or args.threads == cores
    args.threads = args.threads or cores
    if "llama-cpp-python" in args.only and (missing := [m for m in CPP_SERVER_DEPS if not importlib.util.find_spec(m)]):
        parser.error(f"llama_cpp.server needs {', '.join(missing)}: pip install 'llama-cpp-python[server]' "
                     "(or leave it out with --only)")  # fmt: skip
    for flag, binary in (("--llama-server", args.llama_server), ("--batched-bench", args.batched_bench)):
        if binary is None:
            print(f"note: no {flag} given, so that column is left out", file=sys.stderr)
        elif not os.access(binary, os.X_OK):
            parser.error(f"{flag} {binary}: not an executable file")
    out = args.out or (Path(tempfile.mkdtemp(prefix="default-flags-")) / "default_flags.json" if args.quick else OUT)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"cores": cores, "platform": platform.platform(), "python": platform.python_version()},
        "threads": args.threads,
        "rounds": plan.rounds,
        "clients": plan.clients,
        "requests_per_client": plan.per_client,
        "reply_tokens": plan.lengths,
        "batched_bench": {"npp": plan.bench_pp, "ntg": plan.lengths, "npl": plan.bench_pl, "layouts": plan.layouts},
        "models": {},
    }
    started = time.perf_counter()
    for model in args.model or ["smollm2"]:
        report["models"][model] = run_model(model, args, plan)
        report["minutes"] = round((time.perf_counter() - started) / 60, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")  # after each model: a late failure keeps the first
    summary(report)
    print("wrote", out)
    chart(report, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
