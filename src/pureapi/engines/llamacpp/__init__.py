"""The llama.cpp engine: GGUF models on CPU with slots, continuous batching and prefix reuse."""

from .engine import LlamaCppEngine

__all__ = ["LlamaCppEngine"]
