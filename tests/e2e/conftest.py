"""Real servers shared by the modules of this package: each starts once, for every module that asks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import Server, start_server


@pytest.fixture(scope="package")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The default command, `python pure_model_api.py` (embedded SmolLM2), on a free port."""
    tmp = tmp_path_factory.mktemp("smol")
    server = start_server([], tmp / "sessions.db", tmp / "server.log")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="package")
def qwen(tmp_path_factory: pytest.TempPathFactory, qwen_gguf: Path) -> Iterator[Server]:
    """The same entry point serving the Qwen2.5-Coder GGUF."""
    tmp = tmp_path_factory.mktemp("qwen")
    server = start_server(["--model", str(qwen_gguf)], tmp / "sessions.db", tmp / "server.log")
    yield server
    assert server.stop() == 0
