"""Turn what the user typed after --model into a build for this machine, check it fits, fetch it.

`choose_build` decides without touching the network or the weights: which repo and files, which
engine, on which device. `check_fit` compares its memory need with what is free. Only then does
`fetch_build` download (or find in the cache) and return the local files.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import ModelLoadError
from . import fit
from .catalogue import CATALOGUE, DEFAULT_QUANT, EMBEDDED, CatalogueModel, lookup
from .hardware import Hardware

GGUF_MAGIC = b"GGUF"
CPU_CONTEXT_CAP = 8192  # the engines' default per-conversation window on CPU
# llama.cpp's slots share one KV pool of this many windows by default (fewer with fewer slots): the
# memory four slots of a full window each took before the pool was unified.
POOL_WINDOWS = 4


def pool_windows(slots: int | None) -> int:
    """How many windows llama.cpp's KV pool holds by default for that many slots (None: the default count)."""
    return min(slots or POOL_WINDOWS, POOL_WINDOWS)


@dataclass(frozen=True)
class ResolvedModel:
    """A model on local disk: a .gguf file, or a Hugging Face model folder."""

    name: str  # what /status and /v1/models report
    path: Path  # the .gguf file (a split set's first part) or the model folder
    engine: str | None = None  # the engine its build is for, when the catalogue chose one

    @property
    def is_gguf(self) -> bool:
        return self.path.is_file() and self.path.suffix.lower() == ".gguf"


@dataclass(frozen=True)
class Build:
    """What --model resolves to on this machine, before anything is downloaded."""

    name: str
    engine: str  # "llamacpp" or "transformers"
    device: str  # "cpu", "cuda" (all GPUs) or "cuda:N"
    repo: str | None = None  # hub repo to download from; None for a local or embedded file
    patterns: tuple[str, ...] = ()
    quant: str | None = None
    local: Path | None = None
    entry: CatalogueModel | None = None

    @property
    def gguf(self) -> bool:
        return self.engine == "llamacpp"

    def label(self) -> str:
        """'Qwen/Qwen2.5-7B-Instruct-GGUF (Q4_K_M)' for messages and `pureapi models`."""
        where = self.repo or (str(self.local) if self.local else self.name)
        return f"{where} ({self.quant})" if self.quant else where


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


def _gpu_free(hw: Hardware, device: str) -> int:
    """Free GPU memory the build may use: one GPU for cuda:N, all of them (spread) otherwise."""
    if device.startswith("cuda:"):
        index = int(device.split(":", 1)[1])
        return next((g.free for g in hw.gpus if g.index == index), 0)
    return sum(g.free for g in hw.gpus)


def _fits_gpu(entry: CatalogueModel, hw: Hardware, device: str, ctx: int | None) -> bool:
    if not hw.gpus:
        return False
    # The transformers cache grows with the conversation: plan for the window it will be asked for.
    window = min(ctx or CPU_CONTEXT_CAP, entry.context)
    n = fit.need(entry.hf_bytes(), entry.kv_bytes_per_token(), window, 1)
    return n.total <= _gpu_free(hw, device)


def _gguf_engine(engine: str, device: str) -> str:
    # A .gguf on CUDA goes to transformers (dequantized onto the GPU), as before; llama.cpp here is a CPU build.
    if engine != "auto":
        return engine
    return "transformers" if device.startswith("cuda") else "llamacpp"


def choose_build(
    spec: str,
    hw: Hardware,
    *,
    engine: str = "auto",
    device: str = "auto",
    quant: str | None = None,
    ctx: int | None = None,
) -> Build:
    """Pick the build of `spec` for this hardware: bf16 transformers on a GPU that holds it, GGUF otherwise."""
    if device == "auto":
        device = "cuda" if hw.gpus else "cpu"
    if spec in EMBEDDED:
        return Build(name=spec, engine=_gguf_engine(engine, device), device=device, local=embedded_path(spec))
    entry = lookup(spec)
    if entry is None:
        return _uncatalogued(spec, engine, device, quant)
    wants_hf = engine in ("transformers", "vllm") or (
        engine == "auto" and device.startswith("cuda") and _fits_gpu(entry, hw, device, ctx)
    )
    if wants_hf and entry.hf_repo:
        from .download import HF_PATTERNS

        chosen = "vllm" if engine == "vllm" else "transformers"
        return Build(entry.name, chosen, device, entry.hf_repo, tuple(HF_PATTERNS), entry=entry)
    if entry.gguf_repo is None:  # the embedded model, asked for by its HF id: its packaged GGUF
        return choose_build(entry.aliases[0], hw, engine=engine, device=device)
    quant = quant or DEFAULT_QUANT
    if quant not in entry.quants:
        raise ModelLoadError(f"model '{spec}': no {quant} build; --quant takes one of {', '.join(entry.quants)}")
    return Build(
        name=f"{entry.gguf_repo}:{quant}",
        engine="llamacpp" if engine == "auto" else engine,
        device="cpu" if engine == "auto" else device,
        repo=entry.gguf_repo,
        patterns=(entry.gguf_glob(quant),),
        quant=quant,
        entry=entry,
    )


def _uncatalogued(spec: str, engine: str, device: str, quant: str | None) -> Build:
    local = Path(os.path.expanduser(spec))
    if local.suffix.lower() == ".gguf" or local.exists():
        if local.is_dir():
            if not (local / "config.json").is_file():
                raise ModelLoadError(f"model folder {local}: no config.json (not a Hugging Face model folder)")
            return Build(local.name, "transformers" if engine == "auto" else engine, device, local=local)
        check_gguf(local)
        return Build(local.stem, _gguf_engine(engine, device), device, local=local)
    if spec.count("/") != 1 or spec.startswith(("/", ".")):
        raise ModelLoadError(f"model '{spec}': not an alias, a local path or a Hugging Face id (org/name)")
    if spec.lower().endswith("-gguf"):  # a GGUF repo outside the catalogue: take the --quant file(s)
        q = quant or DEFAULT_QUANT
        patterns = (f"*{q}*.gguf", f"*{q.lower()}*.gguf")
        return Build(f"{spec}:{q}", _gguf_engine(engine, device), device, spec, patterns, quant=q)
    from .download import HF_PATTERNS

    return Build(spec, "transformers" if engine == "auto" else engine, device, spec, tuple(HF_PATTERNS))


def _hf_folder_need(folder: Path, device: str, ctx: int | None) -> fit.Need | None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    if device == "cpu" and config.get("torch_dtype", config.get("dtype")) in ("bfloat16", "float16"):
        weights *= 2  # the transformers engine runs float32 on CPU
    heads = int(config.get("num_attention_heads", 1))
    head_dim = int(config.get("head_dim") or int(config.get("hidden_size", 0)) // max(heads, 1))
    per_token = 2 * int(config.get("num_hidden_layers", 0)) * int(config.get("num_key_value_heads", heads)) * head_dim
    window = ctx or min(int(config.get("max_position_embeddings", 2048)), CPU_CONTEXT_CAP)
    return fit.need(weights, per_token * (4 if device == "cpu" else 2), window, 1)


def build_need(build: Build, ctx: int | None, slots: int, quant: str | None = None) -> fit.Need | None:
    """The memory a build needs for `slots` conversations of `ctx` tokens (None when it cannot be told)."""
    if build.entry is not None:
        e = build.entry
        window = min(ctx or CPU_CONTEXT_CAP, e.context)
        if build.gguf:
            return fit.need(e.gguf_bytes(quant or build.quant or DEFAULT_QUANT), e.kv_bytes_per_token(), window, slots)
        return fit.need(e.hf_bytes(), e.kv_bytes_per_token(), window, 1)
    if build.local is None:
        return None  # an uncatalogued hub repo: sized once downloaded
    if build.local.is_dir():
        return _hf_folder_need(build.local, build.device, ctx)
    from . import gguf

    try:
        shape = gguf.shape(build.local)
    except (OSError, ValueError):
        return None  # the engine reports the damage when it loads
    window = ctx or min(shape.context or 2048, CPU_CONTEXT_CAP)
    if not build.gguf:  # dequantized by transformers: float32 on CPU, bf16 on a GPU
        return fit.need(shape.size * (8 if build.device == "cpu" else 4), shape.kv_bytes_per_token(), window, 1)
    return fit.need(shape.size, shape.kv_bytes_per_token(), window, slots)


def _free(build: Build, hw: Hardware, max_memory: int | None) -> tuple[int, str]:
    if build.device.startswith("cuda") and not build.gguf:
        free, where = _gpu_free(hw, build.device), (build.device if ":" in build.device else "GPU memory")
    else:
        free, where = hw.ram_free, "RAM"
    if max_memory is not None and max_memory < free:
        return max_memory, f"{where} (--max-memory)"
    return free, where


def check_fit(build: Build, hw: Hardware, *, ctx: int | None, slots: int, max_memory: int | None = None) -> None:
    """Refuse, in one line, a build that cannot fit in the free memory; suggest what would."""
    n = build_need(build, ctx, slots)
    if n is None:
        return
    free, where = _free(build, hw, max_memory)
    if n.total <= free:
        return
    fit.check(f"model {build.label()}", n, free, where, _alternatives(build, ctx, slots, free))


def _alternatives(build: Build, ctx: int | None, slots: int, free: int) -> list[str]:
    found: list[str] = []
    entry = build.entry
    if build.gguf and entry is not None and build.quant is not None:
        smaller = [q for q in entry.quants if entry.gguf_bytes(q) < entry.gguf_bytes(build.quant)]
        for q in sorted(smaller, key=entry.gguf_bytes, reverse=True):
            need = build_need(build, ctx, slots, quant=q)
            if need is not None and need.total <= free:
                found.append(f"--quant {q} ({fit.human(need.total)})")
                break
    if build.gguf and slots > 1:
        need = build_need(build, ctx, 1)
        if need is not None and need.total <= free:
            found.append(f"--parallel 1 ({fit.human(need.total)})")
    if entry is not None and not build.gguf and entry.gguf_repo is not None:
        gguf_build = replace(build, engine="llamacpp", device="cpu", quant=DEFAULT_QUANT)
        need = build_need(gguf_build, ctx, slots)
        if need is not None:
            found.append(f"--engine llamacpp (the {DEFAULT_QUANT} GGUF, {fit.human(need.total)} of RAM)")
    # The largest other model whose default GGUF build fits.
    fitting = []
    for other in CATALOGUE:
        if other is entry:
            continue
        try:
            if other.gguf_repo is None:
                other_build = Build(other.name, "llamacpp", "cpu", local=embedded_path(other.aliases[0]))
            else:
                other_build = Build(other.name, "llamacpp", "cpu", other.gguf_repo, quant=DEFAULT_QUANT, entry=other)
            need = build_need(other_build, ctx, slots)
        except ModelLoadError:  # the embedded model's package is missing
            continue
        if need is not None and need.total <= free:
            fitting.append((need.total, other.aliases[0]))
    if fitting:
        total, alias = max(fitting)
        found.append(f"--model {alias} ({fit.human(total)})")
    return found


def fetch_build(build: Build) -> ResolvedModel:
    """Download the build's files (or find them in the cache) and return them on local disk."""
    from . import download

    if build.local is not None:
        return ResolvedModel(name=build.local.stem if build.local.is_file() else build.name, path=build.local)
    assert build.repo is not None
    if build.gguf or (build.quant is not None):
        path = download.fetch_gguf(build.repo, list(build.patterns))
        check_gguf(path)
        return ResolvedModel(name=build.name, path=path, engine=build.engine)
    return ResolvedModel(name=build.name, path=download.fetch(build.repo, list(build.patterns)), engine=build.engine)


def resolve_model(spec: str, quant: str | None = None) -> ResolvedModel:
    """Resolve an alias, a local path or a Hugging Face id to local files, for a CPU (no fit check)."""
    from .hardware import detect

    return fetch_build(choose_build(spec, detect(want_gpus=False), device="cpu", quant=quant))
