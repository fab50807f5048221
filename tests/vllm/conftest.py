"""A real vLLM server (its own venv, SmolLM2) for the tests of pureapi in front of it; skipped without one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import Server, start_server
from ..vllm_server import VLLMServer, smollm2_hf, vllm_python


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test here needs vLLM (each module is marked `vllm`): skipped, with the way to run it, without it."""
    python = vllm_python()
    for item in items:
        if Path(item.path).parent != Path(__file__).parent:
            continue
        if python is None:
            item.add_marker(pytest.mark.skip(reason="no vLLM: set PUREAPI_VLLM_PYTHON or run `make test-vllm`"))


@pytest.fixture(scope="session")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    """One vLLM server for the session (tests that restart it leave it running again)."""
    python = vllm_python()
    assert python is not None  # the tests that use it are skipped otherwise
    server = VLLMServer(python, smollm2_hf(), tmp_path_factory.mktemp("vllm") / "vllm.log")
    server.start()
    yield server
    server.stop()


def start_front(vllm: VLLMServer, db: Path, log: Path) -> Server:
    """pureapi with the remote engine in front of vLLM."""
    return start_server(["--engine", "remote", "--upstream", vllm.url + "/v1"], db, log, 120)


@pytest.fixture
def front(vllm: VLLMServer, tmp_path: Path) -> Iterator[Server]:
    server = start_front(vllm, tmp_path / "front.db", tmp_path / "front.log")
    yield server
    server.stop()
