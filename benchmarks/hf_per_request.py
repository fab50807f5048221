"""What one seeded client costs the other streams of the batched transformers engine.

    python -m benchmarks.hf_per_request --model smollm2 [--rounds 3] [--seconds 20] [--modes plain,seeded]

In this process, one transformers engine (`--max-batch-size 8`, CPU, float32). Eight clients send
sampled requests (temperature 0.7, top-p 0.9, 64 tokens) back to back for `--seconds`. Three ways,
side by side in each round (the order alternates between rounds): the eighth client is like the
other seven (`plain`); it asks for a seed, sampled in the batch with its own generator (`seeded`);
or it asks for a seed and is served as before, by `generate` with the batch paused (`seeded-paused`,
the engine's fallback forced for it). The figure: the seven others' tokens streamed per second in
the window; beside it, the batch's steps per second and the CPU time a step spends in pureapi's
processors (Steps, TopK, TopP: where a seeded row costs anything). Figures are medians over rounds
(rounds kept in the JSON), after an unrecorded warm-up.
Results: benchmarks/results/hf_per_request.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

from .run import ROOT, median_of, model_path, torch_machine

OUT = ROOT / "benchmarks" / "results" / "hf_per_request.json"
MAX_TOKENS = 64
TOPICS = ["a dragon", "the sea", "a city at night", "a robot", "a forest", "a long journey", "winter", "a library"]


class ProcessorClock:
    """Steps run, and the CPU time the generation thread spends in pureapi's batch processors (a figure
    that a busy machine disturbs far less than tokens per second)."""

    def __init__(self) -> None:
        from pureapi.engines.hf_batch_sampling import Steps, TopK, TopP

        self.steps, self.cpu_s = 0, 0.0
        for cls in (Steps, TopK, TopP):
            self._time(cls, counts_steps=cls is TopP)

    def _time(self, cls: Any, counts_steps: bool) -> None:
        original = cls.__call__

        def timed(processor: Any, *args: Any) -> Any:
            started = time.thread_time()
            try:
                return original(processor, *args)
            finally:
                self.cpu_s += time.thread_time() - started
                self.steps += counts_steps

        cls.__call__ = timed

    def read(self) -> tuple[int, float]:
        steps, cpu_s = self.steps, self.cpu_s
        self.steps, self.cpu_s = 0, 0.0
        return steps, cpu_s


def one_mode(engine: Any, clock: ProcessorClock, mode: str, seconds: float, round_: int) -> dict[str, Any]:
    from pureapi.types import GenerationRequest, Message, SamplingParams

    engine._batcher.steps_in_batch = mode != "seeded-paused"  # forced off: the seeded client takes the paused path
    plain = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.7, top_p=0.9)
    special = plain if mode == "plain" else SamplingParams(max_tokens=MAX_TOKENS, temperature=0.7, top_p=0.9, seed=42)
    prompts = [
        engine.encode_chat([Message("user", f"Write a long story about {topic} (take {round_}).")]) for topic in TOPICS
    ]
    tokens = [0] * len(TOPICS)
    done = threading.Event()

    def client(index: int, params: Any) -> None:
        while not done.is_set():
            stream = engine.generate(GenerationRequest(prompts[index], params))
            seen = 0
            for chunk in stream:
                if done.is_set():
                    stream.close()  # type: ignore[attr-defined]
                    break
                tokens[index] += chunk.completion_tokens - seen
                seen = chunk.completion_tokens

    paused_before = engine.stats["paused_runs"]
    clock.read()
    threads = [threading.Thread(target=client, args=(i, special if i == 0 else plain)) for i in range(len(TOPICS))]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    done.set()
    counted = list(tokens)
    steps, cpu_s = clock.read()
    for thread in threads:
        thread.join()
    return {
        "others_tps": round(sum(counted[1:]) / seconds, 2),
        "eighth_tps": round(counted[0] / seconds, 2),
        "paused_runs": engine.stats["paused_runs"] - paused_before,
        "steps_per_s": round(steps / seconds, 2),
        "processors_cpu_ms_per_step": round(1000 * cpu_s / max(steps, 1), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--modes", default="plain,seeded,seeded-paused", help="which of the three, comma-separated")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    from pureapi.engines.transformers import TransformersEngine
    from pureapi.models.resolve import ResolvedModel
    from pureapi.settings import Settings

    gguf = model_path(args.model)
    engine = TransformersEngine.load(
        ResolvedModel(gguf.stem, gguf), device="cpu", cache_dir=Settings().weights_cache_dir(), max_batch_size=8
    )
    modes = args.modes.split(",")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    try:
        clock = ProcessorClock()
        one_mode(engine, clock, "plain", args.seconds / 2, -1)  # warm-up, not recorded
        for round_ in range(args.rounds):
            for mode in modes if round_ % 2 == 0 else modes[::-1]:
                runs[mode].append(one_mode(engine, clock, mode, args.seconds, round_))
                print(round_, mode, json.dumps(runs[mode][-1]), flush=True)
    finally:
        engine.close()
    medians = {mode: median_of(rounds) for mode, rounds in runs.items()}
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": torch_machine(),
        "plan": {"model": gguf.stem, "clients": len(TOPICS), "max_tokens": MAX_TOKENS, "seconds": args.seconds},
        "medians": medians,
        "rounds": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    base = medians[modes[0]]["others_tps"]
    print(f"| the eighth client | the seven others' tokens/s | against {modes[0]} ", end="")
    print("| steps/s | processors, CPU ms a step |")
    print("|---|---|---|---|---|")
    for mode in modes:
        m = medians[mode]
        tps, steps, cpu = m["others_tps"], m["steps_per_s"], m["processors_cpu_ms_per_step"]
        print(f"| {mode} | {tps:.1f} | {tps / base:.2f}x | {steps:.1f} | {cpu:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
