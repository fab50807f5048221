"""Fixtures for the download tests: small GGUF and HF files, and a runner for `pureapi` in a child.

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import, so every download runs in a
child process with its environment pointing at the stand-in hub and a throwaway cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def write_gguf(path: Path, *, layers: int = 2, tensor_bytes: int = 1 << 20, split_parts: int = 1) -> list[Path]:
    """A small valid GGUF (llama metadata, four f32 tensors of `tensor_bytes` each), optionally split."""
    import numpy as np
    from gguf import GGUFWriter

    kwargs = {"split_max_tensors": max(1, 4 // split_parts)} if split_parts > 1 else {}
    writer = GGUFWriter(path, "llama", **kwargs)  # type: ignore[arg-type]
    writer.add_block_count(layers)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_embedding_length(256)
    writer.add_context_length(2048)
    for i in range(4):
        writer.add_tensor(f"blk.{i}.weight", np.full(tensor_bytes // 4, i, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if split_parts == 1:
        return [path]
    return sorted(path.parent.glob(path.stem + "-*-of-*.gguf"))


def write_hf_folder(folder: Path) -> dict[str, Path]:
    """A tiny Hugging Face model folder's files (config, tokenizer, weights), enough to be downloaded."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(os.urandom(200_000))
    (folder / "pytorch_model.bin").write_bytes(os.urandom(1000))  # a duplicate format nobody should fetch
    return {p.name: p for p in folder.iterdir()}


@dataclass
class Run:
    """A finished `pureapi` child."""

    rc: int
    out: str
    err: str


@dataclass
class Cli:
    """Runs `python -m pureapi ...` against a hub URL and a cache folder."""

    home: Path
    url: str = ""

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
        env.update(
            HF_ENDPOINT=self.url,
            HF_HOME=str(self.home),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_ETAG_TIMEOUT="30",
            HF_HUB_DOWNLOAD_TIMEOUT="30",
            PYTHONPATH=str(ROOT / "src"),
            CUDA_VISIBLE_DEVICES="",
        )
        env.update(extra)
        return env

    def run(self, *args: str, timeout: float = 300, **extra: str) -> Run:
        proc = subprocess.run(
            [sys.executable, "-m", "pureapi", *args],
            capture_output=True,
            text=True,
            env=self.env(**extra),
            cwd=ROOT,
            timeout=timeout,
        )
        return Run(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    """A CLI runner with a throwaway Hugging Face cache."""
    return Cli(home=tmp_path / "hf-home")


def split_gguf(source: Path, target: Path, parts: int) -> list[Path]:
    """Split a real GGUF into `parts` files the way llama.cpp's gguf-split does (split.* keys, -0000N-of-0000M)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(source)
    arch = str(reader.fields["general.architecture"].contents())
    per_part = -(-len(reader.tensors) // parts)
    writer = GGUFWriter(target, arch, split_max_tensors=per_part)
    for name, fld in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = fld.types[0]
        sub = fld.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, fld.contents(), vtype, sub_type=sub)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sorted(target.parent.glob(target.stem + "-*-of-*.gguf"))
