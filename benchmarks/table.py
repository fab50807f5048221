"""Print the README's benchmark table from benchmarks/results/*.json: `python -m benchmarks.table`."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def rows(report: dict) -> list[str]:  # type: ignore[type-arg]
    out = []
    raw = report.get("llama_bench", {}).get("decode_tps")
    for name, r in report["servers"].items():
        conc = {c["clients"]: c for c in r["concurrency"]}
        conv = r["conversations"]["ttft_per_turn"]
        computed = (r["conversations"].get("prompt_computed_per_turn_conv0") or [None])[-1]
        sent = r["conversations"]["prompt_tokens_per_turn_conv0"][-1]
        turn10 = f"{computed} of {sent}" if computed is not None and sent else "not reported"
        decode = r["single_stream"]["decode_tps"]
        ratio = f" ({decode / raw:.2f}×)" if raw else ""
        raw_rounds = [b["decode_tps"] for b in report.get("llama_bench_rounds", [])]
        if raw_rounds and len(raw_rounds) == len(r.get("rounds", [])):
            # The machine drifts between rounds: compare each round with its own llama-bench run.
            per_round = [run["single_stream"]["decode_tps"] / b for run, b in zip(r["rounds"], raw_rounds, strict=True)]
            ratio = f" ({statistics.median(per_round):.2f}×)"
        paced_conv = r.get("conversations_paced") or {}
        paced, paced_computed = paced_conv.get("ttft_per_turn"), paced_conv.get("prompt_computed_per_turn_conv0")
        paced_cell = f"{paced[0] * 1000:.0f} → {paced[-1] * 1000:.0f} ({paced[-1] / paced[0]:.2f}×)" if paced else ""
        if paced_computed and paced_computed[-1] is not None:
            paced_cell += f"; {paced_computed[-1]} computed"
        fails = sum(c["failures"] for run in r.get("rounds", [r]) for c in run["concurrency"])  # all rounds
        out.append(
            f"| {report['model']} | {name} | {r['time_to_ready_s']:.2f} | {decode:.1f}{ratio} "
            f"| {r['single_stream']['ttft'] * 1000:.0f} "
            f"| {conc[1]['aggregate_tps']:.0f} / {conc[4]['aggregate_tps']:.0f} / {conc[8]['aggregate_tps']:.0f} "
            f"| {conc[8]['p50_latency']:.2f} / {conc[8]['p95_latency']:.2f} "
            f"| {conv[0] * 1000:.0f} → {conv[-1] * 1000:.0f} ({conv[-1] / conv[0]:.2f}×) | {turn10} | {paced_cell} "
            f"| {r['peak_rss_mb']:.0f} | {fails} |"
        )
    return out


def main() -> None:
    print(
        "| model | server | ready (s) | decode tok/s (× llama-bench) | TTFT (ms) | aggregate tok/s at 1 / 4 / 8 "
        "| latency p50 / p95 at 8 (s) | conversation TTFT turn 1 → 10 (ms) "
        "| turn 10 prompt tokens computed | same, 0.5 s pauses: turn 1 → 10 (ms); turn 10 computed "
        "| peak RSS (MB) | failed requests |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for path in sorted(RESULTS.glob("*.json")):
        report = json.loads(path.read_text())
        for line in rows(report):
            print(line)
        if "llama_bench" in report:
            lb = report["llama_bench"]
            print(f"| {report['model']} | llama-bench (raw) | | {lb['decode_tps']:.1f} | | | | | | | | |")


if __name__ == "__main__":
    main()
