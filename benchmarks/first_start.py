"""Time to ready of a first start: a fresh HOME and cache, so no start-up check verdict is remembered.

    python -m benchmarks.first_start [--starts 5] [--source NAME=PATH ...] [--forget NAME ...]

Each start runs `pure_model_api.py` (the embedded SmolLM2, llama.cpp engine) of a source tree with
HOME and XDG_CACHE_HOME in a new temporary folder, and times it from launch until GET /health
answers 200. Sources alternate start by start (this checkout is `after` unless --source names
others), so a busy machine weighs on each alike. Before each start of a source named by --forget,
the verdicts kept beside the install (`<sys.prefix>/share/pureapi/preflight`) are deleted too: the
first start of a newly installed build. Prints each start and the median per source; results:
benchmarks/results/first_start.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .run import ROOT, free_port, stop_server, wait_ready

OUT = ROOT / "benchmarks" / "results" / "first_start.json"


def first_start(source: Path) -> float:
    """Seconds from launch to a 200 from /health, with nothing remembered from earlier starts."""
    with tempfile.TemporaryDirectory(prefix="first-start-") as home:
        env = {**os.environ, "HOME": home, "XDG_CACHE_HOME": str(Path(home, "cache"))}
        env["PYTHONPATH"] = str(source / "src")
        port = free_port()
        cmd = [sys.executable, str(source / "pure_model_api.py"), "--port", str(port)]
        cmd += ["--db", str(Path(home, "sessions.db")), "--log-level", "warning"]
        proc = subprocess.Popen(cmd, env=env, cwd=source, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            return wait_ready(f"http://127.0.0.1:{port}", proc, "/health", timeout=120)
        finally:
            stop_server(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--source", action="append", default=[], help="NAME=PATH of a checkout to time")
    parser.add_argument("--forget", action="append", default=[], help="a source NAME started as on a new install")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    sources = dict(s.split("=", 1) for s in args.source) or {"after": str(ROOT)}
    runs: dict[str, list[float]] = {name: [] for name in sources}
    for i in range(args.starts):
        for name, path in sources.items():
            if name in args.forget:
                shutil.rmtree(Path(sys.prefix, "share", "pureapi", "preflight"), ignore_errors=True)
            seconds = first_start(Path(path))
            runs[name].append(round(seconds, 3))
            print(i, name, f"{seconds:.2f} s", flush=True)
    medians = {name: round(statistics.median(times), 3) for name, times in runs.items()}
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "starts": args.starts,
        "python": sys.executable,
        "forget": args.forget,
        "medians": medians,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, median in medians.items():
        print(f"{name}: median {median:.2f} s over {args.starts} first starts ({runs[name]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
