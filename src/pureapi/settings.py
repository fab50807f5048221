"""Settings in one typed object: the CLI flags, `--help` and the PUREAPI_* env vars come from it."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, Field, field_validator, model_validator

ENV_PREFIX = "PUREAPI_"


def default_cache_dir() -> Path:
    """The per-user cache directory (converted weights, start-up check verdicts)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("pureapi", appauthor=False))


def default_data_dir() -> Path:
    """The per-user data directory (sessions database, converted-weights cache)."""
    import platformdirs

    return Path(platformdirs.user_data_dir("pureapi", appauthor=False))


# llama.cpp's default depends on the model's window (llamacpp.loader.default_slots): 16 at the default.
DEFAULT_PARALLEL = {"llamacpp": 16, "transformers": 8, "remote": 16}

# Old flag names that keep working: alias -> field.
ALIASES = {"max_batch_size": "parallel"}

# --help shows the flags in these groups, in this order; every field is in exactly one.
GROUPS: dict[str, list[str]] = {
    "model": ["model", "engine", "quant", "device", "ctx_size", "parallel", "fit_check", "max_memory", "cache_dir"],
    "server": ["host", "port", "threads", "max_queue", "max_body_bytes", "log_level", "log_format"],
    "conversations and state": ["db", "max_rounds", "session_ttl", "response_ttl", "kv_cache_mb", "kv_cache_scope"],
    "keys, tenants and access": [
        "api_key",
        "admin_key",
        "api_key_file",
        "tenant_max_concurrent",
        "tenant_tokens_per_minute",
        "cors_origins",
        "allowed_hosts",
        "metrics_public",
    ],
    "llama.cpp engine": ["kv_pool", "cpu_threads", "flash_attn", "kv_disk_mb"],
    "remote engine (an OpenAI-compatible upstream)": ["upstream", "upstream_key", "upstream_model", "upstream_timeout"],
    "vLLM engine (in process)": ["vllm_tensor_parallel", "vllm_gpu_memory"],
}


class Settings(BaseModel):
    """Everything `pureapi serve` can be told; each field is a flag and an env var."""

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, values: Any) -> Any:
        if isinstance(values, dict):
            for alias, name in ALIASES.items():
                if alias in values:
                    value = values.pop(alias)
                    values.setdefault(name, value)
        return values

    model: str = Field(
        "smollm2",
        description="Model: an alias (smollm2, qwen, llama, ...), a Hugging Face id, "
        "a local HF model folder or a .gguf file. Default: the embedded SmolLM2-135M-Instruct.",
    )
    engine: Literal["auto", "transformers", "llamacpp", "vllm", "remote", "fake"] = Field(
        "auto",
        description="Inference engine; auto picks the best one for the model and device; vllm runs vLLM in "
        "process (pip install 'pureapi[vllm]'); remote forwards generation to --upstream.",
    )
    upstream: str | None = Field(
        None,
        description="Remote engine: base URL of an OpenAI-compatible server (vLLM, llama-server, pureapi), "
        "for example http://gpu-box:8000/v1.",
    )
    upstream_key: str | None = Field(None, description="Remote engine: API key sent to the upstream.")
    upstream_model: str | None = Field(
        None, description="Remote engine: the upstream's model to use. Default: the first it lists."
    )
    upstream_timeout: float = Field(
        300.0, gt=0, le=86_400, description="Remote engine: seconds the upstream may stay silent before a 504."
    )
    # --engine vllm (vLLM's AsyncLLM in process); --parallel sets its concurrent sequences, --ctx-size its window.
    vllm_tensor_parallel: int = Field(
        1, ge=1, le=1024, description="vLLM engine: GPUs each model replica is split across (tensor parallel)."
    )
    vllm_gpu_memory: float = Field(
        0.9, gt=0, le=1, description="vLLM engine: share of each GPU's memory vLLM takes (weights and KV cache)."
    )
    quant: str | None = Field(
        None,
        description="GGUF quantization to download for a catalogue model or a -GGUF repo (Q4_K_M, Q5_K_M, Q8_0, "
        "...). Default: Q4_K_M.",
    )
    fit_check: Literal["on", "off"] = Field(
        "on",
        description="Before loading, estimate weights + KV cache (--ctx-size x --parallel) against free RAM or "
        "GPU memory and refuse in one line what cannot fit; off: try anyway.",
    )
    max_memory: str | None = Field(
        None,
        description="Memory the model may use (8GB, 7.5GiB, 512MiB): caps what the fit check counts as free. "
        "Default: all the free RAM or GPU memory.",
    )
    device: str = Field("auto", description="auto (CUDA if available, else CPU), cpu, cuda or cuda:N.")
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(5000, ge=0, le=65535, description="Port to bind.")
    db: Path | None = Field(
        None, description="SQLite file for sessions. Default: sessions.db in the user data directory."
    )
    threads: int = Field(
        32,
        ge=1,
        le=1024,
        description="WSGI worker threads (one process; the model lives once); raised to max_queue + twice the "
        "engine's slots + 16 if lower, so that generations in flight never hold every thread.",
    )
    max_rounds: int = Field(20, ge=1, le=10_000, description="Rounds (user message + reply) kept per session.")
    ctx_size: int | None = Field(
        None, ge=64, description="Context window in tokens. Default: the model's own, capped at 8192 on CPU."
    )
    max_queue: int = Field(16, ge=1, le=1000, description="Generations allowed to wait for the model; more get 503.")
    parallel: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Concurrent generations, on every engine: llama.cpp's slots (decoded together in one batch, "
        "drawing KV cells from one --kv-pool, each up to a --ctx-size window), the transformers engine's "
        "continuous batch (1: one at a time with generate, no KV kept between requests), or the requests the "
        "remote engine sends upstream at once. Default: llama.cpp as many slots as the KV pool holds "
        "conversations of min(--ctx-size, 2048) tokens, at most 16 (16 at default flags); 8 on transformers; "
        "16 on remote. Alias: --max-batch-size.",
    )
    kv_pool: int | None = Field(
        None,
        ge=64,
        description="llama.cpp engine: KV cells (tokens) all slots share. Default: --ctx-size x min(--parallel, 4). "
        "A slot costs no memory until it holds tokens; when the conversations together outgrow the pool, idle "
        "slots' KV is saved to the prompt cache and dropped, then the newest generations wait for an older one "
        "to end.",
    )
    cpu_threads: int | None = Field(
        None, ge=1, le=1024, description="llama.cpp engine: CPU threads that compute. Default: the number of cores."
    )
    flash_attn: Literal["on", "off"] = Field(
        "on",
        description="llama.cpp engine: flash attention. on: faster at short contexts, and a conversation's "
        "logits do not depend on what shares its batch; off: faster prefill deep into long conversations.",
    )
    kv_cache_mb: int = Field(
        256,
        ge=0,
        le=1_000_000,
        description="MiB of RAM for KV kept after a generation ends, found again by its tokens, so that a "
        "conversation's next turn (a session's, or a stateless client's that resends the history) reuses it "
        "instead of computing it again (least recently used dropped first); 0 keeps none. llama.cpp keeps the "
        "states of slots another prompt took; transformers keeps finished requests' pages, beside the running "
        "batch's (--parallel x 1024 tokens on a CPU).",
    )
    kv_disk_mb: int = Field(
        1024,
        ge=0,
        le=100_000_000,
        description="llama.cpp engine: MiB of disk beside the sessions database (<db>.kv/) for KV states: "
        "those the RAM cache drops, and all of them at shutdown, so a conversation's next turn after an "
        "eviction or a restart is restored instead of prefilled again (oldest dropped first); 0 disables.",
    )
    kv_cache_scope: Literal["key", "global"] = Field(
        "key",
        description="Who shares cached KV when API keys are set. key: only requests of the same tenant (another "
        "tenant cannot tell from response times what was cached; the transformers engine, whose batch shares "
        "pages across keys, refuses to start with several keys unless --max-batch-size 1); global: all.",
    )
    response_ttl: int = Field(
        30 * 24 * 3600,
        ge=0,
        description="Seconds a stored response (POST /v1/responses with store) is kept; expired ones cannot be "
        "retrieved or continued. 0 keeps them forever. Conversations are kept until deleted.",
    )
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest accepted request body.")
    cache_dir: Path | None = Field(
        None, description="Where converted GGUF weights are cached. Default: the user cache directory."
    )
    api_key: list[str] = Field(
        default_factory=list,
        description="Require 'Authorization: Bearer KEY' on every route but /health and the chat page's files; "
        "repeat the flag (or comma-separate in the env var) for several keys. Each key is a tenant that sees "
        "only its own sessions, responses and conversations, named key-<hash of the key>.",
    )
    admin_key: list[str] = Field(
        default_factory=list,
        description="Like --api-key, with the admin role: GET /v1/tenants, and acting for another tenant with "
        "the X-Tenant header.",
    )
    api_key_file: Path | None = Field(
        None,
        description="File of API keys, one 'name:key' a line, optionally followed by admin, max_concurrent=N, "
        "tokens_per_minute=N; '#' comments. Re-read on SIGHUP. Keeps keys out of ps and shell history.",
    )
    tenant_max_concurrent: int = Field(
        0, ge=0, le=100_000, description="Generations one tenant (API key) may have in flight at once; 0: no limit."
    )
    tenant_tokens_per_minute: int = Field(
        0,
        ge=0,
        description="Tokens (prompt + reply) one tenant may use per minute, over a sliding minute; 0: no limit.",
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins allowed to call the API from a browser (CORS); none by default."
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Extra Host header names accepted; when bound to loopback only localhost names are by default "
        "(a DNS-rebinding defence).",
    )
    session_ttl: float = Field(
        0,
        ge=0,
        description="Seconds a session may stay idle before it is deleted (checked in the background); 0 keeps "
        "sessions forever.",
    )
    metrics_public: bool = Field(
        False, description="Serve /metrics without an API key (for a Prometheus that holds none)."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text for people, or one JSON object a line for machines."
    )

    @field_validator("max_memory")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None:
            from .models.fit import parse_size

            parse_size(value)  # raises ValueError with the accepted forms
        return value

    def concurrency(self, engine: str) -> int:
        """Concurrent generations on an engine: --parallel, else the engine's default."""
        return self.parallel or DEFAULT_PARALLEL.get(engine, 4)

    def max_memory_bytes(self) -> int | None:
        """--max-memory in bytes."""
        from .models.fit import parse_size

        return None if self.max_memory is None else parse_size(self.max_memory)

    def db_path(self) -> Path:
        """The sessions database path, defaulted."""
        return self.db if self.db is not None else default_data_dir() / "sessions.db"

    def kv_state_dir(self) -> Path | None:
        """Folder for sessions' saved KV states: beside the sessions database (none for an in-memory one)."""
        db = self.db_path()
        return None if str(db) == ":memory:" else db.with_suffix(".kv")

    def weights_cache_dir(self) -> Path:
        """Folder for converted weights, defaulted."""
        return self.cache_dir if self.cache_dir is not None else default_cache_dir() / "converted"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per Settings field, in GROUPS; env vars PUREAPI_<FIELD> override the built-in default."""
    aliases_of = {name: [a for a, n in ALIASES.items() if n == name] for name in Settings.model_fields}
    for title, names in GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            field = Settings.model_fields[name]
            annotation = field.annotation
            kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
            default = _env(name, field.get_default(call_default_factory=True))
            shown = "******" if name in ("api_key", "admin_key", "upstream_key") and default else default
            help_text = f"{field.description} (default: {shown}; env {ENV_PREFIX}{name.upper()})"
            if get_origin(annotation) is Literal:
                kwargs["choices"] = list(get_args(annotation))
            if get_origin(annotation) is list:
                kwargs["action"] = "append"
            if annotation is bool:
                kwargs["action"] = "store_true"
            group.add_argument(_flag(name), *map(_flag, aliases_of[name]), help=help_text, **kwargs)


def _env(name: str, default: Any = None) -> Any:
    """A field's environment variable, or an old alias's; else the default."""
    for key in [name, *(a for a, n in ALIASES.items() if n == name)]:
        value = os.environ.get(ENV_PREFIX + key.upper())
        if value is not None and value != "":
            return value
    return default


def settings_from_args(ns: argparse.Namespace) -> Settings:
    """Build validated Settings from env vars, then parsed flags (flags win)."""
    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        env = _env(name)
        if env is not None:
            is_list = get_origin(Settings.model_fields[name].annotation) is list
            values[name] = [v.strip() for v in env.split(",") if v.strip()] if is_list else env
    values.update({k: v for k, v in vars(ns).items() if k in Settings.model_fields})
    return Settings.model_validate(values)
