"""pureapi: a self-hosted chat API server for Qwen- and Llama-family models."""

__version__ = "0.1.0"
