"""`pure_model_api.py --model qwen` on a machine without a GPU: the Qwen2.5-7B GGUF build, from the hub.

The stand-in hub serves a real Qwen2 model (Qwen2.5-Coder-0.5B, split in two parts the way Qwen
publishes its larger files) under the 7B's repo and file names, so the whole path runs: catalogue,
build choice, fit check, download of both parts, llama.cpp loading the split set from its first part.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from ..conftest import start_server
from ..hub import Repo, stand_in_hub
from .conftest import Cli, split_gguf

pytestmark = pytest.mark.real

QWEN_GGUF = "Qwen/Qwen2.5-7B-Instruct-GGUF"


@pytest.fixture(scope="module")
def qwen_split(qwen_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    parts = split_gguf(qwen_gguf, tmp_path_factory.mktemp("split") / "qwen2.5-7b-instruct-q4_k_m.gguf", 2)
    return {p.name: p for p in parts}


def test_qwen_on_cpu_resolves_to_the_gguf_build_downloads_and_answers(
    qwen_split: dict[str, Path], tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    with stand_in_hub({QWEN_GGUF: Repo(files=qwen_split)}) as hub:
        cli.url = hub.url
        for key, value in cli.env().items():
            monkeypatch.setenv(key, value)
        server = start_server(
            ["--model", "qwen", "--ctx-size", "512", "--parallel", "1"], tmp_path / "s.db", tmp_path / "log"
        )
        try:
            status = requests.get(server.url + "/status", timeout=30).json()
            reply = requests.post(
                server.url + "/chat", json={"message": "Say hi", "max_tokens": 8, "temperature": 0}, timeout=120
            )
        finally:
            assert server.stop() == 0
    assert status["model_name"] == f"{QWEN_GGUF}:Q4_K_M"
    assert status["devices"][0]["name"] == "ram" and status["devices"][0]["free_bytes"] > 0
    assert reply.status_code == 200 and reply.json()["response"].strip()
    assert sorted(n for n in qwen_split if hub.downloads(n)) == sorted(qwen_split)  # both parts came down
    assert len(list(cli.home.rglob("*.gguf"))) == 2
