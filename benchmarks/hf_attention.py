"""The CPU batch's attention: transformers' one masked SDPA over the packed batch against pureapi's per-sequence SDPA.

    python -m benchmarks.hf_attention --model smollm2 --model qwen [--rounds 2] [--prompt-tokens 1500]

In this process, one transformers engine per model (`--max-batch-size 8`, CPU, float32, the GGUF's
converted folder). Both attentions run on the same engine, switched between rounds under
transformers' "sdpa" name (`engines/hf_attention.py`), side by side in each round. A round, per
attention: six conversations, each opening with its own ~1,500-token user message (the prompts
differ per round and per attention, so neither finds the other's pages in the prefix cache), arrive
together; then two more turns ("Go on.", resending the whole history, so each computes only its new
tokens), all greedy, 32 tokens a reply. Per turn: the wall time, the median TTFT and the completion
tokens per second of the six. Figures are medians over rounds (rounds kept in the JSON). Results:
benchmarks/results/hf_attention.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from .run import ROOT, median_of, model_path, torch_machine

OUT = ROOT / "benchmarks" / "results" / "hf_attention.json"
CONVERSATIONS = 6
TURNS = 3
MAX_TOKENS = 32


def opening(tokens: int, conversation: int, salt: str) -> str:
    words = " ".join(f"{salt}{(i * 7 + conversation) % 97}" for i in range(tokens // 5))  # ~5 tokens a word
    return f"{words}\nSummarise the list above, conversation {conversation}."


def one_turn(engine: Any, histories: list[list[Any]]) -> dict[str, Any]:
    from pureapi.types import GenerationRequest, Message, SamplingParams

    results: dict[int, tuple[float, int, int, int, str]] = {}

    def converse(index: int) -> None:
        ids = engine.encode_chat(histories[index])
        started = time.perf_counter()
        first = None
        text = ""
        for chunk in engine.generate(GenerationRequest(ids, SamplingParams(MAX_TOKENS, 0.0))):
            if first is None and chunk.text:
                first = time.perf_counter() - started
            text += chunk.text
        results[index] = (first or 0.0, chunk.completion_tokens, len(ids), chunk.cached_tokens, text)

    started = time.perf_counter()
    threads = [threading.Thread(target=converse, args=(i,)) for i in range(len(histories))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    for index, history in enumerate(histories):
        history += [Message("assistant", results[index][4]), Message("user", "Go on.")]
    return {
        "wall_s": round(wall, 3),
        "ttft_median_s": round(statistics.median(r[0] for r in results.values()), 3),
        "completion_tps": round(sum(r[1] for r in results.values()) / wall, 2),
        "prompt_tokens": round(statistics.mean(r[2] for r in results.values())),
        "computed_tokens": round(statistics.mean(r[2] - r[3] for r in results.values())),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", choices=["smollm2", "qwen"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from pureapi.engines import hf_attention
    from pureapi.engines.transformers import TransformersEngine
    from pureapi.models.resolve import ResolvedModel
    from pureapi.settings import Settings
    from pureapi.types import Message

    attentions = {"masked-batch": sdpa_attention_forward, "per-sequence": hf_attention.varlen_sdpa}
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": torch_machine(),
        "plan": {
            "conversations": CONVERSATIONS,
            "turns": TURNS,
            "max_tokens": MAX_TOKENS,
            "prompt_tokens": args.prompt_tokens,
            "rounds": args.rounds,
        },
        "models": {},
    }
    rows = []
    for name in args.model or ["smollm2", "qwen"]:
        gguf = model_path(name)
        engine = TransformersEngine.load(
            ResolvedModel(gguf.stem, gguf), device="cpu", cache_dir=Settings().weights_cache_dir(), max_batch_size=8
        )
        runs: dict[str, list[list[dict[str, Any]]]] = {a: [] for a in attentions}
        try:
            for round_ in range(args.rounds):
                for attention, forward in attentions.items():
                    ALL_ATTENTION_FUNCTIONS["sdpa"] = forward
                    salt = f"w{round_}{attention[0]}"
                    histories = [[Message("user", opening(args.prompt_tokens, c, salt))] for c in range(CONVERSATIONS)]
                    turns = [one_turn(engine, histories) for _ in range(TURNS)]
                    runs[attention].append(turns)
                    print(name, round_, attention, json.dumps(turns), flush=True)
        finally:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = hf_attention.varlen_sdpa
            engine.close()
        medians = {attention: median_of(rounds) for attention, rounds in runs.items()}
        report["models"][gguf.stem] = {"medians": medians, "rounds": runs}
        for t in range(TURNS):
            masked, per_seq = medians["masked-batch"][t], medians["per-sequence"][t]
            rows.append(
                f"| {gguf.stem} | {t + 1} | {per_seq['prompt_tokens']:.0f} / {per_seq['computed_tokens']:.0f} "
                f"| {masked['wall_s']:.1f} s | {per_seq['wall_s']:.1f} s | {masked['wall_s'] / per_seq['wall_s']:.2f}x "
                f"| {masked['ttft_median_s']:.2f} s | {per_seq['ttft_median_s']:.2f} s |"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        "| model | turn | prompt / computed tokens | masked batch: wall | per sequence: wall | speed-up "
        "| masked: TTFT | per sequence: TTFT |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
