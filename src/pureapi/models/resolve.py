"""Turn what the user typed after --model into a local file or folder, downloading if needed."""

from __future__ import annotations

import importlib.util
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError
from .registry import ALIASES, EMBEDDED

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ResolvedModel:
    """A model on local disk: a .gguf file, or a Hugging Face model folder."""

    name: str  # what /status and /v1/models report
    path: Path  # the .gguf file or the model folder

    @property
    def is_gguf(self) -> bool:
        return self.path.is_file() and self.path.suffix.lower() == ".gguf"


def embedded_path(alias: str) -> Path:
    """Locate an embedded model file without importing its package (which pulls in heavy deps)."""
    package, filename, _sha = EMBEDDED[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"embedded model '{alias}' needs the package {package}: pip install -r requirements_pure_api.txt"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / filename
        if candidate.is_file():
            return candidate
    raise ModelLoadError(f"embedded model '{alias}': {filename} is missing from the {package} package")


def check_gguf(path: Path) -> None:
    """Fail with one line when a .gguf file is missing, unreadable, or has no valid GGUF header.

    Deeper damage (a truncated tensor section) surfaces when the engine loads the file.
    """
    if not path.exists():
        raise ModelLoadError(f"model file {path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"model file {path}: not a regular file")
    try:
        with path.open("rb") as fh:
            header = fh.read(24)
    except OSError as exc:
        raise ModelLoadError(f"model file {path}: cannot read it ({exc.strerror})") from None
    if header[:4] != GGUF_MAGIC:
        raise ModelLoadError(f"model file {path}: not a GGUF file (it does not start with 'GGUF')")
    if len(header) < 24:
        raise ModelLoadError(f"model file {path}: truncated (the GGUF header is incomplete)")
    version, n_tensors, n_kv = struct.unpack("<IQQ", header[4:24])
    if version not in (2, 3) or n_tensors == 0 or n_tensors > 1_000_000 or n_kv > 1_000_000:
        raise ModelLoadError(f"model file {path}: damaged GGUF header (version {version}, {n_tensors} tensors)")


def resolve_model(spec: str) -> ResolvedModel:
    """Resolve an alias, a local path or a Hugging Face id to local files."""
    if spec in EMBEDDED:
        path = embedded_path(spec)
        return ResolvedModel(name=path.stem, path=path)
    hf_id = ALIASES.get(spec, spec)
    local = Path(os.path.expanduser(hf_id))
    if local.suffix.lower() == ".gguf" or local.exists():
        if local.is_dir():
            if not (local / "config.json").is_file():
                raise ModelLoadError(f"model folder {local}: no config.json (not a Hugging Face model folder)")
            return ResolvedModel(name=local.name, path=local)
        check_gguf(local)
        return ResolvedModel(name=local.stem, path=local)
    if hf_id.count("/") != 1 or hf_id.startswith(("/", ".")):
        raise ModelLoadError(f"model '{spec}': not an alias, a local path or a Hugging Face id (org/name)")
    return ResolvedModel(name=hf_id, path=download(hf_id))


def download(repo_id: str) -> Path:
    """Fetch a model snapshot from the Hugging Face hub (cached; progress bars on stderr)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise ModelLoadError(
            f"model '{repo_id}': not in the local Hugging Face cache and the hub cannot be reached (offline?)"
        ) from None
    except HfHubHTTPError as exc:
        raise ModelLoadError(f"model '{repo_id}': download failed ({exc})".splitlines()[0]) from None
    except OSError as exc:
        raise ModelLoadError(f"model '{repo_id}': download failed ({exc})".splitlines()[0]) from None
