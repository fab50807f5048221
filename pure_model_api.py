#!/usr/bin/env python
"""Seed entry point: `python pure_model_api.py --model ... --device ... --host ... --port ...`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # also works from a plain checkout

from pureapi.cli import run_serve

if __name__ == "__main__":
    raise SystemExit(run_serve(prog="pure_model_api.py"))
