"""pureapi's transformers engine, continuously batched, against HF's own `transformers serve`, on CPU.

    python -m benchmarks.hf_batching --model smollm2 --model qwen [--rounds 1] [--quick]

Same weights for all: the GGUF from `model_path(name)`, converted once by pureapi's transformers
engine into a float32 safetensors folder in its weights cache (`convert_gguf`, the folder
`TransformersEngine.load` uses). Servers, one at a time on 127.0.0.1, stopped with SIGTERM after
their measurements:
- `pureapi-batched`: `pure_model_api.py --engine transformers --device cpu --max-batch-size 8`, the
  GGUF (its converted folder comes from the cache), transformers' ContinuousBatchingManager;
- `pureapi-one-at-a-time`: the same with `--max-batch-size 1` (one `model.generate` at a time, the
  others queued);
- `transformers-serve`: `transformers serve --continuous-batching --device cpu --dtype float32` on the
  converted folder (it cannot read a GGUF). It answers only requests naming its model, the folder's
  path, so every request to it carries `"model": <folder>`; it ignores `stream_options` but reports
  usage on its last chunk anyway, without cached tokens (prompt computed: None).
All measurements go through the OpenAI streaming `POST /v1/chat/completions`, temperature 0
(benchmarks/loadgen.py): single-stream decode speed (one warm-up, then the median of 3, or 2 with
--quick); aggregate completion tokens per second with 1, 4 and 8 clients sending requests back to
back (fixed max_tokens: 64, 32 with --quick); and the `openai` round-robin load of
benchmarks/roundrobin.py (12 conversations x 8 turns through 4 clients, each request resending the
whole history; --quick: 8 x 4) with TTFT and prompt tokens computed per turn. A server's first
request after it is ready is timed separately (transformers serve builds its batching manager
then). Reference: a bare `model.generate` loop in this process (greedy, min_new_tokens = max_new_tokens,
one warm-up then the median of 3), decode speed = (n - 1) / (time for n tokens - time for 1 token).

With --rounds N the servers take turns within each round and each figure is the median over rounds
(the rounds are kept in the JSON). Torch uses all the machine's cores in every server. A server that
fails (for instance `transformers serve` on a machine it does not support) gets its error and log
tail recorded instead of figures. Results: benchmarks/results/hf_batching.json, chart:
benchmarks/results/hf_batching.png, and a markdown table on stdout for the README.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import loadgen, roundrobin
from .run import (
    ROOT,
    free_port,
    median_of,
    model_path,
    peak_rss_mb,
    save_chart,
    stop_server,
    torch_machine,
    wait_ready,
)

BATCH = 8
MAX_QUEUE = 32  # room for 8+ waiting clients on the one-at-a-time server
CLIENTS = (1, 4, 8)
SERVERS = ("pureapi-batched", "pureapi-one-at-a-time", "transformers-serve")
OUT = ROOT / "benchmarks" / "results" / "hf_batching.json"


def hf_folder(gguf: Path) -> Path:
    """The converted safetensors folder pureapi's transformers engine uses for this GGUF (converted if missing)."""
    import transformers

    from pureapi.engines.base import model_fingerprint
    from pureapi.engines.hf_convert import convert_gguf
    from pureapi.settings import Settings

    folder: Path = Settings().weights_cache_dir() / model_fingerprint(gguf, transformers.__version__)
    if not (folder / "config.json").is_file():
        convert_gguf(gguf, folder)
    return folder


def commands(gguf: Path, folder: Path) -> dict[str, Callable[[int, Path], list[str]]]:
    """How to start each server on a port, with a temporary folder for its files."""

    def pureapi(batch: int) -> Callable[[int, Path], list[str]]:
        return lambda port, tmp: [
            sys.executable, str(ROOT / "pure_model_api.py"), "--model", str(gguf), "--engine", "transformers",
            "--device", "cpu", "--max-batch-size", str(batch), "--max-queue", str(MAX_QUEUE),
            "--port", str(port), "--db", str(tmp / "sessions.db"), "--log-level", "warning",
        ]  # fmt: skip

    def serve(port: int, tmp: Path) -> list[str]:
        return [
            str(Path(sys.executable).parent / "transformers"), "serve", "--continuous-batching", "--device", "cpu",
            "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port), str(folder),
        ]  # fmt: skip

    return {"pureapi-batched": pureapi(BATCH), "pureapi-one-at-a-time": pureapi(1), "transformers-serve": serve}


def single_stream(base: str, max_tokens: int, repeats: int, extra: dict[str, Any] | None) -> dict[str, float]:
    """loadgen.single_stream, with the request fields a server needs (transformers serve: its model)."""
    messages = [{"role": "user", "content": "Write a long story about a dragon who learns to sing."}]
    loadgen.stream_chat(base, messages, 8, extra)
    good = [r for r in (loadgen.stream_chat(base, messages, max_tokens, extra) for _ in range(repeats)) if r.ok]
    return {
        "decode_tps": round(statistics.median(r.decode_tps for r in good), 2) if good else 0.0,
        "ttft": round(statistics.median(r.ttft for r in good), 4) if good else 0.0,
        "completion_tokens": statistics.median(r.completion_tokens for r in good) if good else 0,
    }


def plan(quick: bool) -> dict[str, Any]:
    """The measurement sizes."""
    return {
        "max_tokens": 32 if quick else 64,
        "single_stream_repeats": 2 if quick else 3,
        "clients": list(CLIENTS),
        "requests_per_client": 1 if quick else 2,
        "roundrobin": {
            "conversations": 8 if quick else roundrobin.CONVERSATIONS,
            "turns": 4 if quick else roundrobin.TURNS,
            "clients": roundrobin.CLIENTS,
            "max_tokens": roundrobin.MAX_TOKENS,
        },
    }


def bench_server(
    cmd: Callable[[int, Path], list[str]], extra: dict[str, Any] | None, sizes: dict[str, Any]
) -> dict[str, Any]:
    """Start one server, measure it, stop it; on failure, the error and the end of its log."""
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = Path(tmp) / "server.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(cmd(port, Path(tmp)), stdout=log, stderr=log)
        try:
            result: dict[str, Any] = {"time_to_ready_s": round(wait_ready(url, proc, "/health"), 3)}
            started = time.perf_counter()
            first = loadgen.stream_chat(url, [{"role": "user", "content": "Hello"}], 8, extra)
            if not first.ok:
                raise RuntimeError(f"first request failed: {first.status} {first.error}")
            result["first_request_s"] = round(time.perf_counter() - started, 3)
            n = sizes["max_tokens"]
            result["single_stream"] = single_stream(url, n, sizes["single_stream_repeats"], extra)
            result["concurrency"] = [
                loadgen.as_dict(loadgen.concurrent(url, c, sizes["requests_per_client"], n, extra))
                for c in sizes["clients"]
            ]
            rr = sizes["roundrobin"]
            load = roundrobin.Load("openai", rr["conversations"], rr["clients"], rr["max_tokens"], extra)
            load.run(url, range(rr["turns"]))
            result["roundrobin"] = load.report()
            result["peak_rss_mb"] = peak_rss_mb(proc.pid)
            return result
        except Exception as exc:  # recorded, and the other servers still run
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            return {"error": f"{type(exc).__name__}: {exc}", "log_tail": tail}
        finally:
            stop_server(proc)


def bare_generate(folder: Path, max_tokens: int) -> dict[str, Any]:
    """Decode speed of model.generate in this process: greedy, exactly max_tokens new tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()  # type: ignore[no-untyped-call]
    messages = [{"role": "user", "content": "Write a long story about a dragon who learns to sing."}]
    ids: Any = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )

    def timed(n: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        assert out.shape[1] - ids["input_ids"].shape[1] == n
        return time.perf_counter() - started

    timed(max_tokens)  # warm-up
    full = statistics.median(timed(max_tokens) for _ in range(3))
    prefill = statistics.median(timed(1) for _ in range(3))
    return {
        "new_tokens": max_tokens,
        "seconds": round(full, 4),
        "first_token_s": round(prefill, 4),
        "decode_tps": round((max_tokens - 1) / (full - prefill), 2),
        "torch_threads": torch.get_num_threads(),
    }


def aggregate(result: dict[str, Any], clients: int) -> float | None:
    for row in result.get("concurrency") or []:
        if row["clients"] == clients:
            return float(row["aggregate_tps"])
    return None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def ratios(servers: dict[str, dict[str, Any]], generate: dict[str, Any] | None) -> dict[str, Any]:
    batched = servers.get("pureapi-batched", {})
    one = servers.get("pureapi-one-at-a-time", {})
    serve = servers.get("transformers-serve", {})
    top = max(CLIENTS)
    single = (batched.get("single_stream") or {}).get("decode_tps")
    return {
        f"batched_{top}_clients_over_transformers_serve_{top}_clients": ratio(
            aggregate(batched, top), aggregate(serve, top)
        ),
        f"batched_{top}_clients_over_one_at_a_time_single_stream": ratio(
            aggregate(batched, top), (one.get("single_stream") or {}).get("decode_tps")
        ),
        f"batched_{top}_clients_over_one_at_a_time_{top}_clients": ratio(aggregate(batched, top), aggregate(one, top)),
        "roundrobin_ttft_last_over_first": {
            name: (r.get("roundrobin") or {}).get("ttft_last_over_first") for name, r in servers.items()
        },
        "batched_single_stream_over_bare_generate": ratio(single, (generate or {}).get("decode_tps")),
    }


def table(report: dict[str, Any]) -> str:
    """The results as a markdown table for the README."""
    top = max(CLIENTS)
    lines = [
        "| model | server | single stream tok/s | "
        + " | ".join(f"{c} clients tok/s" for c in CLIENTS)
        + " | round-robin TTFT first → last turn (ms) | round-robin tok/s | peak RSS MiB |",
        "|---" * (6 + len(CLIENTS)) + "|",
    ]
    for model, m in report["models"].items():
        gen = m.get("generate") or {}
        if gen:
            blank = " | ".join("" for _ in CLIENTS)
            lines.append(f"| {model} | bare `model.generate` | {gen.get('decode_tps')} | {blank} | | | |")
        for name, r in m["servers"].items():
            if "error" in r:
                lines.append(f"| {model} | {name} | failed: {r['error'][:80]} |" + " |" * (4 + len(CLIENTS)))
                continue
            rr = r["roundrobin"]
            ttft = rr["ttft_per_turn"]
            cells = [
                model,
                name,
                str(r["single_stream"]["decode_tps"]),
                *(str(aggregate(r, c)) for c in CLIENTS),
                f"{ttft[0] * 1000:.0f} → {ttft[-1] * 1000:.0f} (×{rr['ttft_last_over_first']})" if ttft else "",
                str(rr["aggregate_tps"]),
                str(r.get("peak_rss_mb")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        x = m["ratios"]
        lines.append(
            f"\n{model}: batched {top} clients = ×{x[f'batched_{top}_clients_over_transformers_serve_{top}_clients']}"
            f" transformers serve, ×{x[f'batched_{top}_clients_over_one_at_a_time_single_stream']} one-at-a-time"
            f" single stream; batched single stream = ×{x['batched_single_stream_over_bare_generate']} bare generate\n"
        )
    return "\n".join(lines)


def chart(report: dict[str, Any], path: Path) -> None:
    """Per model: aggregate tok/s against clients, and round-robin TTFT per turn, a line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4 * len(models)), squeeze=False)
    for (left, right), (model, m) in zip(axes, models.items(), strict=True):
        for name, r in m["servers"].items():
            if "error" in r:
                continue
            rows = r["concurrency"]
            left.plot([row["clients"] for row in rows], [row["aggregate_tps"] for row in rows], marker="o", label=name)
            ttft = r["roundrobin"]["ttft_per_turn"]
            right.plot(range(1, len(ttft) + 1), [t * 1000 for t in ttft], marker="o", label=name)
        gen = m.get("generate") or {}
        if gen.get("decode_tps"):
            left.axhline(gen["decode_tps"], color="gray", linestyle=":", label="bare model.generate (1 stream)")
        rr = report["plan"]["roundrobin"]
        left.set_title(f"{model}: aggregate tok/s (max_tokens {report['plan']['max_tokens']})", fontsize=10)
        left.set_xlabel("concurrent clients")
        left.set_ylabel("tok/s")
        left.set_xticks(list(CLIENTS))
        right.set_title(f"{model}: {rr['conversations']} conversations through {rr['clients']} clients", fontsize=10)
        right.set_xticks(range(1, rr["turns"] + 1))
        right.set_xlabel("turn (whole history resent)")
        right.set_ylabel("TTFT p50 (ms)")
    save_chart(fig, axes, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="smollm2, qwen or a .gguf path (repeatable)")
    parser.add_argument("--rounds", type=int, default=1, help="measure everything N times; report medians")
    parser.add_argument("--quick", action="store_true", help="shorter replies, fewer repeats and turns")
    parser.add_argument("--only", action="append", choices=SERVERS, help="run only these servers")
    parser.add_argument("--no-generate", action="store_true", help="skip the bare model.generate reference")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    sizes = plan(args.quick)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": torch_machine(),
        "device": "cpu",
        "dtype": "float32",
        "max_batch_size": BATCH,
        "rounds": args.rounds,
        "quick": args.quick,
        "plan": sizes,
        "commands": {},
        "models": {},
    }
    for name in args.model or ["smollm2"]:
        gguf = model_path(name)
        folder = hf_folder(gguf)
        extras: dict[str, dict[str, Any] | None] = {"transformers-serve": {"model": str(folder)}}
        table_ = commands(gguf, folder)
        report["commands"][gguf.stem] = {s: " ".join(cmd(0, Path("TMP"))) for s, cmd in table_.items()}
        runs: dict[str, list[dict[str, Any]]] = {}
        generate: list[dict[str, Any]] = []
        for round_ in range(args.rounds):
            for server, cmd in table_.items():
                if args.only and server not in args.only:
                    continue
                result = bench_server(cmd, extras.get(server), sizes)
                runs.setdefault(server, []).append(result)
                print(name, round_, server, json.dumps(result)[:300], flush=True)
            if not args.no_generate:
                generate.append(bare_generate(folder, sizes["max_tokens"]))
                print(name, round_, "generate", json.dumps(generate[-1]), flush=True)
        servers = {s: {**median_of(results), "rounds": results} for s, results in runs.items()}
        gen = {**median_of(generate), "rounds": generate} if generate else None
        report["models"][gguf.stem] = {
            "gguf": str(gguf),
            "hf_folder": str(folder),
            "generate": gen,
            "servers": servers,
            "ratios": ratios(servers, gen),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("wrote", args.out)
    chart(report, args.out.with_suffix(".png"))
    print()
    print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
