"""Single-stream decode speed of two llama-cpp-python builds, side by side in one run.

Each build is a folder that holds a `llama_cpp` package (a `pip install --target` of its wheel, or
a virtualenv's site-packages). Rounds alternate the builds, each in a fresh process, and the result
is the median of each round's ratio, since this machine's speed drifts between minutes.

    python -m benchmarks.builds --build native=/path/site-packages --build safe=/tmp/llsafe \\
        --model smollm2 --model qwen --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .run import model_path

# Runs in the child: a bare llama_decode loop, one token at a time, the next id fixed in advance
# (what llama-bench's tg test measures: the library, not sampling).
CHILD = r"""
import ctypes, json, sys, time
import llama_cpp as llc
path, n_threads, n_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
quiet = llc.llama_log_callback(lambda *a: None)  # kept referenced: C calls it later
llc.llama_log_set(quiet, ctypes.c_void_p(0))
llc.llama_backend_init()
mp = llc.llama_model_default_params(); mp.n_gpu_layers = 0
m = llc.llama_model_load_from_file(path.encode(), mp)
cp = llc.llama_context_default_params()
cp.n_ctx = 1024; cp.n_batch = cp.n_ubatch = 512; cp.n_threads = cp.n_threads_batch = n_threads
cp.flash_attn_type = llc.LLAMA_FLASH_ATTN_TYPE_ENABLED
ctx = llc.llama_init_from_model(m, cp)
vocab = llc.llama_model_get_vocab(m); n_vocab = llc.llama_vocab_n_tokens(vocab)
prompt = [(i * 7919 + 13) % n_vocab for i in range(16)]
arr = (llc.llama_token * 16)(*prompt)
assert llc.llama_decode(ctx, llc.llama_batch_get_one(arr, 16)) == 0
tok = prompt[-1]
start = time.perf_counter()
for _ in range(n_tokens):
    one = (llc.llama_token * 1)(tok)
    assert llc.llama_decode(ctx, llc.llama_batch_get_one(one, 1)) == 0
    tok = (tok + 1) % n_vocab
elapsed = time.perf_counter() - start
print(json.dumps({"tok_s": n_tokens / elapsed, "version": llc.__version__}))
"""


def decode_speed(site: Path, model: Path, threads: int, tokens: int) -> float:
    """Decode tokens/s of the build in `site` (fresh process, so the library loads from there)."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(model), str(threads), str(tokens)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    return float(json.loads(out.strip().splitlines()[-1])["tok_s"])


def main() -> None:
    """Run the rounds and write benchmarks/results/builds.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="append", required=True, help="NAME=FOLDER holding llama_cpp")
    parser.add_argument("--model", action="append", default=None, help="smollm2, qwen or a .gguf path")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "builds.json")
    ns = parser.parse_args()
    builds = dict(b.split("=", 1) for b in ns.build)
    names = list(builds)
    result: dict[str, object] = {"when": time.strftime("%Y-%m-%d %H:%M"), "threads": ns.threads, "models": {}}
    for spec in ns.model or ["smollm2"]:
        model = model_path(spec)
        rounds: list[dict[str, float]] = []
        for r in range(ns.rounds):
            order = names if r % 2 == 0 else names[::-1]  # alternate who goes first
            rounds.append({name: decode_speed(Path(builds[name]), model, ns.threads, ns.tokens) for name in order})
            print(model.name, "round", r + 1, {k: round(v, 1) for k, v in rounds[-1].items()}, flush=True)
        summary = {name: statistics.median(x[name] for x in rounds) for name in names}
        ratios = [x[names[1]] / x[names[0]] for x in rounds] if len(names) > 1 else []
        result["models"][model.name] = {  # type: ignore[index]
            "median_tok_s": summary,
            "ratio": {f"{names[1]}/{names[0]}": statistics.median(ratios)} if ratios else {},
            "rounds": rounds,
        }
        print(model.name, json.dumps(result["models"][model.name]), flush=True)  # type: ignore[index]
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
