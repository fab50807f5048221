#!/usr/bin/env python
"""Seed interactive client: `python api_client_example.py [--url http://127.0.0.1:5000]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # also works from a plain checkout

from pureapi.client import main

if __name__ == "__main__":
    raise SystemExit(main())
