"""Engine registry: name -> loader, and the `auto` choice, instead of an if/elif ladder."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ModelLoadError
from ..models.resolve import ResolvedModel, resolve_model
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
    )


def _llamacpp(settings: Settings, model: ResolvedModel) -> Engine:
    from .llamacpp import LlamaCppEngine
    from .preflight import check_llamacpp

    # A build that crashes on this CPU kills a child process here, not the server (once per build).
    check_llamacpp(
        model.path,
        flash_attn=settings.flash_attn == "on",
        threads=settings.cpu_threads,
        verdicts=default_cache_dir() / "preflight",
    )
    parallel = settings.parallel or min(4, settings.threads)
    return LlamaCppEngine.load(
        model,
        n_threads=settings.cpu_threads,
        # --ctx-size is one conversation's window; llama.cpp's n_ctx is the total over all slots.
        n_ctx=settings.ctx_size * parallel if settings.ctx_size else None,
        n_parallel=parallel,
        max_queue=settings.max_queue,
        flash_attn=settings.flash_attn == "on",
        kv_cache_mb=settings.kv_cache_mb,
        state_dir=settings.kv_state_dir(),
        kv_disk_mb=settings.kv_disk_mb,
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
    engine.slots = settings.parallel or engine.slots
    return engine


def _fake(settings: Settings, model: ResolvedModel) -> Engine:
    from .fake import FakeEngine

    return FakeEngine(context_length=settings.ctx_size or 4096, max_queue=settings.max_queue)


ENGINES: dict[str, Callable[[Settings, ResolvedModel], Engine]] = {
    "transformers": _transformers,
    "llamacpp": _llamacpp,
    "remote": _remote,
    "fake": _fake,
}


def choose_engine(settings: Settings, model: ResolvedModel) -> str:
    """The engine `--engine auto` picks: llama.cpp for a GGUF file unless CUDA is in play, else transformers.

    On a CPU, llama.cpp runs the quantized weights several times faster than transformers runs
    them dequantized to float32, and starts in a fraction of a second instead of converting.
    """
    if settings.engine != "auto":
        return settings.engine
    if model.is_gguf and not _cuda_in_play(settings.device):
        return "llamacpp"
    return "transformers"


def _cuda_in_play(device: str) -> bool:
    if device == "cpu":
        return False
    if device.startswith("cuda"):
        return True
    import torch

    return bool(torch.cuda.is_available())


def resolve(settings: Settings) -> ResolvedModel:
    """Resolve --model to local files (fast checks and downloads happen here, before serving)."""
    if settings.engine in ("fake", "remote"):  # no local weights: the remote engine asks its upstream
        return ResolvedModel(name=f"{settings.engine}-model", path=settings.weights_cache_dir())
    return resolve_model(settings.model)


def load_engine(settings: Settings, model: ResolvedModel) -> Engine:
    """Load the engine chosen for the model."""
    return ENGINES[choose_engine(settings, model)](settings, model)
