"""The cost of pureapi in front of vLLM: the same streams sent to vLLM alone and through pureapi's remote engine.

    PUREAPI_VLLM_PYTHON=../vllm-venv/bin/python python -m benchmarks.vllm_front [--rounds 4] [--out PATH]

One vLLM server (SmolLM2-135M on CPUs, see tests/vllm_server.py) and one pureapi (`--engine remote`) in
front of it, both up for the whole run. Each round measures vLLM directly and through pureapi (the order
alternating between rounds): one client alone (decode tokens/s) and 8 clients at once (aggregate tokens/s).
Greedy, the same prompts both ways, so both paths generate the same tokens. Each figure is the median over
the rounds (this machine is shared and drifts); the ratio front/direct is the front's overhead. On one
machine the front also takes CPU from vLLM. Results go to benchmarks/results/vllm_front.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import loadgen
from .run import ROOT, free_port, stop_server, wait_ready

CLIENTS = 8
MAX_TOKENS = 128


def measure(url: str, model: str, quick: bool) -> dict[str, Any]:
    """Single-stream decode speed and 8-client aggregate throughput against one base URL."""
    extra = {"model": model}
    single = loadgen.single_stream(url, MAX_TOKENS, repeats=2 if quick else 3, extra=extra)
    many = loadgen.concurrent(url, CLIENTS, 1 if quick else 2, MAX_TOKENS, extra)
    return {
        "single_decode_tps": single["decode_tps"],
        "single_ttft_s": single["ttft"],
        "clients8_aggregate_tps": many.aggregate_tps,
        "clients8_p50_latency_s": many.p50_latency,
        "clients8_failures": many.failures,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="fewer requests per figure")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vllm_front.json")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from tests.vllm_server import MODEL_NAME, VLLMServer, smollm2_hf, vllm_python

    python = vllm_python()
    if python is None:
        parser.error("set PUREAPI_VLLM_PYTHON to vLLM's interpreter (`make vllm-venv` builds one)")
    tmp = Path(tempfile.mkdtemp(prefix="vllm-front-"))
    vllm = VLLMServer(python, smollm2_hf(), tmp / "vllm.log")
    vllm_ready = vllm.start()
    front_port = free_port()
    front_url = f"http://127.0.0.1:{front_port}"
    cmd = [
        sys.executable, str(ROOT / "pure_model_api.py"), "--engine", "remote", "--upstream", vllm.url + "/v1",
        "--port", str(front_port), "--db", str(tmp / "front.db"), "--log-level", "warning",
    ]  # fmt: skip
    front = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rounds: list[dict[str, Any]] = []
    try:
        wait_ready(front_url, front, "/health")
        for i in range(args.rounds):
            # Who goes first alternates: the second of a pair meets vLLM's prefix cache warm from the first.
            if i % 2 == 0:
                direct = measure(vllm.url, MODEL_NAME, args.quick)
                through = measure(front_url, "any", args.quick)
            else:
                through = measure(front_url, "any", args.quick)
                direct = measure(vllm.url, MODEL_NAME, args.quick)
            rounds.append({"vllm": direct, "pureapi_front": through})
            print(f"round {i + 1}: vllm {direct}\n         front {through}", flush=True)
    finally:
        stop_server(front)
        vllm.stop()

    def median(side: str, key: str) -> float:
        return round(statistics.median(r[side][key] for r in rounds), 2)

    keys = ["single_decode_tps", "single_ttft_s", "clients8_aggregate_tps", "clients8_p50_latency_s"]
    summary = {side: {k: median(side, k) for k in keys} for side in ("vllm", "pureapi_front")}
    ratios = {
        k: round(summary["pureapi_front"][k] / summary["vllm"][k], 3)
        for k in ("single_decode_tps", "clients8_aggregate_tps")
        if summary["vllm"][k]
    }
    result = {
        "what": "SmolLM2-135M-Instruct (bf16) on vLLM's CPU build; vLLM alone vs pureapi --engine remote in front",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, shared with other jobs",
        "vllm_version": subprocess.run(
            [str(python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True
        ).stdout.strip(),
        "vllm_start_s": round(vllm_ready, 1),
        "max_tokens": MAX_TOKENS,
        "clients": CLIENTS,
        "median": summary,
        "front_over_direct": ratios,
        "rounds": rounds,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"median": summary, "front_over_direct": ratios}, indent=2))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
