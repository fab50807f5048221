"""Decode in one KV pool against a stream per sequence: what the pool's masked walk costs, per llama.cpp build.

    python -m benchmarks.pool_layout [--model smollm2] [--sequences 8 16] [--tokens 320 1000] \
        [--steps 200] [--rounds 3] [--lib NAME=DIR ...] [--out PATH]

S sequences of L random tokens are prefilled one after another, so each sits in one run of cells
(the layout pureapi's compaction keeps), then decoded side by side, one token each per step, for
--steps steps; each step first removes the tokens the step before added, so every step attends over
the same S x L cells. Layouts: `pool` (llama.cpp's unified KV cache, as pureapi and llama-server at
its defaults run) and `streams` (a stream of cells per sequence, llama-batched-bench's default).

--lib NAME=DIR runs llama.cpp's shared libraries from DIR (through LLAMA_CPP_LIB_PATH and
LD_LIBRARY_PATH): a build of the same llama-cpp-python source with a patch, for instance
docs/llama.cpp-fa-skip-masked.patch. Without --lib the installed llama-cpp-python is measured.
Each measurement runs in its own child process; the builds and layouts take turns within each
round and the figures are medians over the rounds. Each child also prints a checksum of its last
logits, so that builds can be checked to compute the same thing. Results: the printed table and
the JSON at --out (default benchmarks/results/pool_layout.json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pureapi.engines.llamacpp.batch import Batch
from pureapi.engines.llamacpp.slots import Slot

from .run import ROOT, model_path

OUT = ROOT / "benchmarks" / "results" / "pool_layout.json"
LAYOUTS = ("pool", "streams")


def child(gguf: str, sequences: int, tokens: int, layout: str, steps: int, threads: int) -> dict[str, Any]:
    """Prefill, then time the decode steps; in this process, with whichever libraries it loaded."""
    import llama_cpp as llc

    llc.llama_backend_init()
    model = llc.llama_model_load_from_file(gguf.encode(), llc.llama_model_default_params())
    params = llc.llama_context_default_params()
    params.n_ctx = sequences * (tokens + 64)
    params.n_batch = params.n_ubatch = 512
    params.n_seq_max = sequences
    params.kv_unified = layout == "pool"
    params.flash_attn_type = llc.LLAMA_FLASH_ATTN_TYPE_ENABLED  # llama.cpp's default on CPU
    params.n_threads = params.n_threads_batch = threads
    ctx = llc.llama_init_from_model(model, params)
    n_vocab = llc.llama_vocab_n_tokens(llc.llama_model_get_vocab(model))
    rng = random.Random(0)
    slots = [
        Slot(i) for i in range(sequences)
    ]  # pureapi's batch filler places each slot's tokens after its cached ones
    batch = Batch(llc, 512)

    def decode() -> None:
        if batch.decode(ctx) != 0:
            raise RuntimeError("llama_decode failed")
        batch.clear()

    for slot in slots:
        while len(slot.cached) < tokens:
            chunk = [rng.randrange(100, n_vocab - 100) for _ in range(min(512, tokens - len(slot.cached)))]
            batch.add(slot, chunk, logits_last=len(slot.cached) + len(chunk) == tokens)
            decode()
            slot.cached += chunk
    memory = llc.llama_get_memory(ctx)
    started = time.perf_counter()
    for _ in range(steps):
        for slot in slots:  # the token the step before added goes, so each step sees the same cells
            llc.llama_memory_seq_rm(memory, slot.id, tokens, -1)
            batch.add(slot, [rng.randrange(100, n_vocab - 100)], logits_last=True)
        decode()
    seconds = time.perf_counter() - started
    logits = llc.llama_get_logits_ith(ctx, 0)
    checksum = sum(float(logits[i]) for i in range(0, n_vocab, 97))
    return {"decode_tps": round(sequences * steps / seconds, 2), "checksum": round(checksum, 3)}


def measure(
    lib: str | None, gguf: Path, sequences: int, tokens: int, layout: str, args: argparse.Namespace
) -> dict[str, Any]:
    env = dict(os.environ)
    if lib:
        env["LLAMA_CPP_LIB_PATH"] = lib  # llama-cpp-python's libllama
        env["LD_LIBRARY_PATH"] = lib + os.pathsep + env.get("LD_LIBRARY_PATH", "")  # and the ggml it links
    cmd = [sys.executable, "-m", "benchmarks.pool_layout", "--child", str(gguf), str(sequences), str(tokens)]
    cmd += [layout, str(args.steps), str(args.threads)]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        gguf, sequences, tokens, layout, steps, threads = sys.argv[2:8]
        print(json.dumps(child(gguf, int(sequences), int(tokens), layout, int(steps), int(threads))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--sequences", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--tokens", type=int, nargs="+", default=[320, 1000])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lib", action="append", default=[], help="NAME=DIR of llama.cpp's shared libraries")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    gguf = model_path(args.model)
    libs: dict[str, str | None] = dict(x.split("=", 1) for x in args.lib) or {"installed": None}
    shapes = [(s, t) for s in args.sequences for t in args.tokens]
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in range(args.rounds):
        for sequences, tokens in shapes:
            order = [(name, layout) for name in libs for layout in LAYOUTS]
            for name, layout in order if r % 2 == 0 else order[::-1]:  # turns alternate round by round
                result = measure(libs[name], gguf, sequences, tokens, layout, args)
                runs.setdefault(f"{name} {layout} {sequences}x{tokens}", []).append(result)
                print(r, name, layout, f"{sequences}x{tokens}", result, flush=True)
    rows = []
    for sequences, tokens in shapes:
        for name in libs:
            tps = {
                lay: round(statistics.median(x["decode_tps"] for x in runs[f"{name} {lay} {sequences}x{tokens}"]), 1)
                for lay in LAYOUTS
            }
            rows.append({
                "build": name, "sequences": sequences, "tokens": tokens, **{f"{k}_tps": v for k, v in tps.items()},
                "pool_over_streams": round(tps["pool"] / tps["streams"], 3),
                "same_logits": {
                    lay: len({x["checksum"] for n in libs for x in runs[f"{n} {lay} {sequences}x{tokens}"]}) == 1
                    for lay in LAYOUTS
                },
            })  # fmt: skip
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "model": gguf.name,
        "steps": args.steps,
        "rounds": args.rounds,
        "threads": args.threads,
        "builds": {name: lib or "installed llama-cpp-python" for name, lib in libs.items()},
        "rows": rows,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("build | sequences x tokens | pool tok/s | streams tok/s | pool / streams")
    for row in rows:
        print(
            f"{row['build']} | {row['sequences']} x {row['tokens']} | {row['pool_tps']} | "
            f"{row['streams_tps']} | {row['pool_over_streams']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
