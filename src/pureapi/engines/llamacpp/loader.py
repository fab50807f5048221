"""Opening a GGUF model's llama.cpp context for the scheduler, and the folder its KV states spill to."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ...errors import ModelLoadError
from ...models.resolve import CPU_CONTEXT_CAP, ResolvedModel, check_gguf
from ..base import model_fingerprint
from .model import LlamaModel
from .state_files import StateFiles

log = logging.getLogger(__name__)


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def open_context(
    resolved: ResolvedModel, n_ctx: int | None, n_parallel: int, n_batch: int, n_threads: int | None, flash_attn: bool
) -> tuple[LlamaModel, Any]:
    """The model and a context of n_parallel sequences (slots), each owning n_ctx / n_parallel KV cells."""
    path = resolved.path
    if not resolved.is_gguf:
        raise ModelLoadError(f"model {path}: the llamacpp engine needs a .gguf file")
    check_gguf(path)
    model = LlamaModel(path)
    llc = model.llc
    if n_ctx is None:
        n_ctx = min(model.n_ctx_train() or 2048, CPU_CONTEXT_CAP) * n_parallel
    params = llc.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_seq_max = n_parallel
    params.n_batch = params.n_ubatch = n_batch
    params.n_threads = params.n_threads_batch = n_threads or cpu_count()
    params.flash_attn_type = llc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llc.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.kv_unified = False  # one KV stream per slot: each slot owns n_ctx / n_parallel cells
    ctx = llc.llama_init_from_model(model.ptr, params)
    if not ctx:
        model.free()
        raise ModelLoadError(f"model file {path}: llama.cpp cannot create a {n_ctx}-token context")
    return model, ctx


def state_files(
    path: Path, model: LlamaModel, flash_attn: bool, state_dir: Path | None, kv_disk_mb: int
) -> StateFiles | None:
    """The disk folder for KV states, or None (not asked for, or not usable: then RAM only)."""
    if state_dir is None or kv_disk_mb <= 0:
        return None
    # KV bytes fit only this model file, llama.cpp build and attention kernel.
    key = model_fingerprint(path, model.llc.__version__, flash_attn)
    try:
        return StateFiles(state_dir / key, kv_disk_mb * 1024 * 1024)
    except OSError as exc:
        log.warning("KV states stay in RAM only: cannot use %s (%s)", state_dir, exc)
        return None
