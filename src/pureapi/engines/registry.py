"""Engine registry: name -> loader, and the `auto` choice, instead of an if/elif ladder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..errors import ModelLoadError
from ..models import hardware
from ..models.resolve import (
    CPU_CONTEXT_CAP,
    ResolvedModel,
    build_need,
    check_fit,
    choose_build,
    fetch_build,
    pool_windows,
)
from ..settings import Settings, default_cache_dir
from .base import Engine


def _transformers(settings: Settings, model: ResolvedModel) -> Engine:
    from .transformers import TransformersEngine

    return TransformersEngine.load(
        model,
        device=settings.device,
        ctx_size=settings.ctx_size,
        max_queue=settings.max_queue,
        cache_dir=settings.weights_cache_dir(),
        max_batch_size=settings.concurrency("transformers"),
        kv_cache_mb=settings.kv_cache_mb,
    )


def _llamacpp(settings: Settings, model: ResolvedModel) -> Engine:
    from .preflight import shared_verdicts, start_check

    # A build that crashes on this CPU kills a child process, not the server (once per build): the
    # server loads the model after the child did, while the child decodes, and decodes only after it.
    check = start_check(
        model.path,
        flash_attn=settings.flash_attn == "on",
        threads=None,  # one thread: which instructions run does not depend on how many (see preflight._child)
        verdicts=[shared_verdicts(), default_cache_dir() / "preflight"],
    )
    try:
        check.loaded()
        engine = _load_llamacpp(settings, model)
    except BaseException:
        check.cancel()
        raise
    try:
        check.decoded()
    except BaseException:
        engine.close()
        raise
    return engine


def _load_llamacpp(settings: Settings, model: ResolvedModel) -> Engine:
    from .llamacpp import LlamaCppEngine

    return LlamaCppEngine.load(
        model,
        n_threads=settings.cpu_threads,
        ctx_size=settings.ctx_size,
        n_parallel=settings.parallel,  # None: as many as the KV pool has room for (loader.default_slots)
        kv_pool=settings.kv_pool,
        max_queue=settings.max_queue,
        flash_attn=settings.flash_attn == "on",
        kv_cache_mb=settings.kv_cache_mb,
        state_dir=settings.kv_state_dir(),
        kv_disk_mb=settings.kv_disk_mb,
    )


def _vllm(settings: Settings, model: ResolvedModel) -> Engine:
    from .vllm import VLLMEngine, converted_folder

    folder = converted_folder(model.path, settings.weights_cache_dir()) if model.is_gguf else model.path
    return VLLMEngine.load(
        folder,
        name=model.name,
        ctx_size=settings.ctx_size,
        slots=settings.parallel or 8,
        tensor_parallel_size=settings.vllm_tensor_parallel,
        gpu_memory_utilization=settings.vllm_gpu_memory,
        max_queue=settings.max_queue,
    )


def _remote(settings: Settings, model: ResolvedModel) -> Engine:
    from .remote import RemoteEngine

    if not settings.upstream:
        raise ModelLoadError("--engine remote needs --upstream URL (an OpenAI-compatible server)")
    engine = RemoteEngine.connect(
        settings.upstream,
        key=settings.upstream_key,
        model=settings.upstream_model,
        context_length=settings.ctx_size,
        timeout=settings.upstream_timeout,
    )
    engine.slots = settings.parallel or engine.slots  # else the upstream's own default
    return engine


def _fake(settings: Settings, model: ResolvedModel) -> Engine:
    from .fake import FakeEngine

    return FakeEngine(context_length=settings.ctx_size or 4096, max_queue=settings.max_queue)


ENGINES: dict[str, Callable[[Settings, ResolvedModel], Engine]] = {
    "transformers": _transformers,
    "llamacpp": _llamacpp,
    "vllm": _vllm,
    "remote": _remote,
    "fake": _fake,
}


def choose_engine(settings: Settings, model: ResolvedModel) -> str:
    """The engine `--engine auto` picks: the one the model's build is for, else by file type and device.

    On a CPU, llama.cpp runs the quantized weights several times faster than transformers runs
    them dequantized to float32, and starts in a fraction of a second instead of converting.
    """
    if settings.engine != "auto":
        return settings.engine
    if model.engine is not None:
        return model.engine
    if model.is_gguf and not _cuda_in_play(settings.device):
        return "llamacpp"
    return "transformers"


def _cuda_in_play(device: str) -> bool:
    # Asked of the driver, not of torch: a CUDA torch import costs ~0.5 GB where the answer is no.
    if device == "cpu":
        return False
    if device.startswith("cuda"):
        return True
    return bool(hardware.gpus())


def _kv_windows(settings: Settings) -> int:
    """The windows of KV the fit check counts: llama.cpp's slots share a pool of `pool_windows` by default."""
    if settings.kv_pool:
        return -(-settings.kv_pool // (settings.ctx_size or CPU_CONTEXT_CAP))
    return pool_windows(settings.parallel)


def resolve(settings: Settings) -> ResolvedModel:
    """Resolve --model to local files: choose the build for this machine, check it fits, then download.

    The fit check runs before a byte of weights is downloaded or read, so a model too big for the
    machine is one line and exit 1 instead of the OOM killer.
    """
    if settings.engine in ("fake", "remote"):  # no local weights: the remote engine asks its upstream
        return ResolvedModel(name=f"{settings.engine}-model", path=settings.weights_cache_dir())
    hw = hardware.detect(want_gpus=settings.device != "cpu")
    build = choose_build(
        settings.model, hw, engine=settings.engine, device=settings.device, quant=settings.quant, ctx=settings.ctx_size
    )
    limits: dict[str, Any] = {
        "ctx": settings.ctx_size,
        "slots": _kv_windows(settings),
        "max_memory": settings.max_memory_bytes(),
    }
    if settings.fit_check == "on":
        check_fit(build, hw, **limits)
    model = fetch_build(build)
    if settings.fit_check == "on" and build_need(build, settings.ctx_size, _kv_windows(settings)) is None:
        # A repo outside the catalogue is sized from its files once they are here, before loading.
        check_fit(replace(build, local=model.path), hw, **limits)
    return model


def load_engine(settings: Settings, model: ResolvedModel) -> Engine:
    """Load the engine chosen for the model."""
    return ENGINES[choose_engine(settings, model)](settings, model)
