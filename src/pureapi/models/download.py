"""Downloads from the Hugging Face hub: only the files a build needs, into the standard cache.

huggingface_hub does the work: progress bars on stderr, resume of an interrupted file from its
`.incomplete` part, the shared cache (HF_HOME / HF_HUB_CACHE), HF_TOKEN for gated repos,
HF_HUB_OFFLINE and HF_ENDPOINT. This module picks the files and turns its errors into one line
that says what to do.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

from ..errors import ModelLoadError

# What the transformers engine reads from a model repo (not the .bin/.pth/.gguf duplicates).
HF_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def fetch(repo_id: str, patterns: list[str], *, local_only: bool = False) -> Path:
    """Download (or find in the cache) the files of `repo_id` matching `patterns`; returns the snapshot folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_only or _offline()))
    except GatedRepoError:
        raise ModelLoadError(
            f"model repo '{repo_id}' is gated: accept its license at https://huggingface.co/{repo_id} "
            "while logged in, then set HF_TOKEN to a token of that account (or run `hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        hint = "" if os.environ.get("HF_TOKEN") else "; if it is private or gated, set HF_TOKEN"
        raise ModelLoadError(f"model repo '{repo_id}' not found on the hub{hint}") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if _offline() else "the hub cannot be reached"
        if local_only and not _offline():
            why = "only the cache was searched"
        raise ModelLoadError(
            f"model repo '{repo_id}': not in the local Hugging Face cache and {why} "
            f"(run `pureapi pull` on a connected machine, or copy the cache)"
        ) from None
    except HfHubHTTPError as exc:
        raise ModelLoadError(f"model repo '{repo_id}': download failed ({exc})".splitlines()[0]) from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model repo '{repo_id}': download failed ({exc})".splitlines()[0]) from None


def fetch_gguf(repo_id: str, patterns: list[str], *, local_only: bool = False) -> Path:
    """Download one quantization's GGUF file(s) and return the file llama.cpp loads (a split set's first part)."""
    folder = fetch(repo_id, patterns, local_only=local_only)
    found = sorted(p for p in folder.rglob("*.gguf") if _matches(p.relative_to(folder), patterns))
    if not found:
        raise ModelLoadError(f"model repo '{repo_id}' has no file matching {' or '.join(patterns)}")
    return found[0]


def _matches(relative: Path, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(relative.as_posix(), pattern) for pattern in patterns)


def is_cached(repo_id: str, patterns: list[str]) -> bool:
    """Whether files for `patterns` are in the local cache already (no network)."""
    try:
        folder = fetch(repo_id, patterns, local_only=True)
    except ModelLoadError:
        return False
    return any(p.is_file() and _matches(p.relative_to(folder), patterns) for p in folder.rglob("*"))
