"""Opening a GGUF model's llama.cpp context for the scheduler, and the folder its KV states spill to."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ...errors import ModelLoadError
from ...models.resolve import CPU_CONTEXT_CAP, ResolvedModel, check_gguf, pool_windows
from ..base import model_fingerprint
from .model import LlamaModel
from .state_files import StateFiles

log = logging.getLogger(__name__)

SLOT_SHARE = 2048  # tokens of the pool each default slot can count on: a multi-turn chat
MAX_DEFAULT_SLOTS = 16


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_window(model: LlamaModel) -> int:
    """One conversation's window without --ctx-size: the model's trained context, capped on a CPU."""
    return int(min(model.n_ctx_train() or 2048, CPU_CONTEXT_CAP))


def default_slots(pool: int, window: int) -> int:
    """Slots when --parallel is not given: as many as the pool holds conversations of SLOT_SHARE tokens
    (or of a smaller window), at most MAX_DEFAULT_SLOTS; 16 at the default pool of 4 windows of 8192.

    A slot costs no memory until it holds tokens, and decoding more sequences at once gains up to 16
    of them on a 2-core CPU (llama-batched-bench, README); the share keeps the pool from being split
    so thin that conversations of ordinary length wait for each other's cells.
    """
    return max(1, min(MAX_DEFAULT_SLOTS, pool // min(window, SLOT_SHARE)))


def open_context(
    resolved: ResolvedModel,
    ctx_size: int | None,
    n_parallel: int | None,
    kv_pool: int | None,
    n_batch: int,
    n_threads: int | None,
    flash_attn: bool,
) -> tuple[LlamaModel, Any, int]:
    """The model, a context of n_parallel sequences (slots) sharing one pool of KV cells, and the window.

    The window (one conversation's context) is ctx_size, else the model's trained context capped on
    CPU; the pool is kv_pool cells, else `pool_windows(n_parallel)` windows; a window is never
    larger than the pool. n_parallel defaults to `default_slots`.
    """
    path = resolved.path
    if not resolved.is_gguf:
        raise ModelLoadError(f"model {path}: the llamacpp engine needs a .gguf file")
    check_gguf(path)
    model = LlamaModel(path)
    llc = model.llc
    window = ctx_size or default_window(model)
    pool = kv_pool or window * pool_windows(n_parallel)
    window = min(window, pool)
    n_parallel = n_parallel or default_slots(pool, window)
    params = llc.llama_context_default_params()
    params.n_ctx = pool
    params.n_seq_max = n_parallel
    params.n_batch = params.n_ubatch = n_batch
    params.n_threads = params.n_threads_batch = n_threads or cpu_count()
    params.flash_attn_type = llc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llc.LLAMA_FLASH_ATTN_TYPE_DISABLED
    # One KV stream that every slot draws cells from (llama-server's default): a slot costs no memory
    # until it holds tokens, and a batch of any slots is one ubatch, one pass over the weights.
    params.kv_unified = True
    ctx = llc.llama_init_from_model(model.ptr, params)
    if not ctx:
        model.free()
        raise ModelLoadError(f"model file {path}: llama.cpp cannot create a context of {pool} KV cells")
    return model, ctx, window


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
