"""The read-only side of a llama.cpp model: GGUF metadata, the vocabulary and the chat template.

Everything here may be called from any thread: llama.cpp's vocabulary and metadata do not change
after loading (llama.cpp's own server tokenizes on its HTTP threads too).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2

from ...errors import BadRequest, ModelLoadError
from ...tools import detect_format
from ...types import Message
from .._template import ChatTemplate, render_segments

_backend_lock = threading.Lock()  # llama_backend_init and llama_log_set are process-global, not thread-safe
_log_callback: Any = None  # kept referenced: llama.cpp calls it from C for the life of the process


def import_llama_cpp() -> Any:
    """Import llama_cpp once, initialise its backend and silence its logging."""
    global _log_callback
    try:
        import llama_cpp as llc
    except ImportError:
        raise ModelLoadError("the llamacpp engine needs llama-cpp-python: pip install llama-cpp-python") from None
    with _backend_lock:
        if _log_callback is None:
            _log_callback = llc.llama_log_callback(lambda level, text, user_data: None)
            llc.llama_log_set(_log_callback, ctypes.c_void_p(0))
            llc.llama_backend_init()
    return llc


class LlamaModel:
    """A loaded GGUF model (weights on the CPU) with its tokenizer and sandboxed chat template."""

    def __init__(self, path: Path):
        llc = self.llc = import_llama_cpp()
        params = llc.llama_model_default_params()
        params.n_gpu_layers = 0
        self.ptr = llc.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise ModelLoadError(f"model file {path}: llama.cpp cannot load it (damaged or unsupported GGUF)")
        self.vocab = llc.llama_model_get_vocab(self.ptr)
        self._pieces: dict[int, bytes] = {}  # token -> bytes; a benign race fills it from several threads
        source = self.meta("tokenizer.chat_template")
        if not source:
            self.free()
            raise ModelLoadError(f"model file {path}: it has no chat template (tokenizer.chat_template)")
        self.tool_format = detect_format(source)
        try:
            self.template = ChatTemplate(
                source,
                bos_token=self._token_text(llc.llama_vocab_bos(self.vocab)),
                eos_token=self._token_text(llc.llama_vocab_eos(self.vocab)),
            )
        except jinja2.TemplateError as exc:
            self.free()
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelLoadError(f"model file {path}: its chat template does not compile ({reason})") from None

    def free(self) -> None:
        """Release the weights."""
        if self.ptr:
            self.llc.llama_model_free(self.ptr)
            self.ptr = None

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as a string, or None when absent."""
        size = 1 << 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self.llc.llama_model_meta_val_str(self.ptr, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    def n_ctx_train(self) -> int:
        """The context length the model was trained with."""
        return int(self.llc.llama_model_n_ctx_train(self.ptr))

    def kv_bytes_per_token(self) -> int:
        """Bytes of f16 K and V cache one token takes across all layers."""
        llc, m = self.llc, self.ptr
        arch = self.meta("general.architecture") or ""
        k_dim = int(self.meta(f"{arch}.attention.key_length") or llc.llama_model_n_embd(m) // llc.llama_model_n_head(m))
        v_dim = int(self.meta(f"{arch}.attention.value_length") or k_dim)
        return int(llc.llama_model_n_layer(m)) * int(llc.llama_model_n_head_kv(m)) * (k_dim + v_dim) * 2

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, end of turn, ...)."""
        return bool(self.llc.llama_vocab_is_eog(self.vocab, token))

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token; control tokens are empty unless special."""
        if not special and token in self._pieces:
            return self._pieces[token]
        buf = ctypes.create_string_buffer(64)
        n = self.llc.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.llc.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        piece = buf.raw[:n]
        if not special:
            self._pieces[token] = piece
        return piece

    def _token_text(self, token: int) -> str:
        return self.piece(token, special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    def tokenize(self, text: str, parse_special: bool = False, add_special: bool = False) -> list[int]:
        """Tokenize; parse_special=False keeps `<|im_start|>` as plain text, add_special adds BOS/EOS
        where the vocabulary asks for them."""
        data = text.encode("utf-8")
        size = len(data) + 8
        buf = (self.llc.llama_token * size)()
        n = self.llc.llama_tokenize(self.vocab, data, len(data), buf, size, add_special, parse_special)
        if n < 0:
            size = -n
            buf = (self.llc.llama_token * size)()
            n = self.llc.llama_tokenize(self.vocab, data, len(data), buf, size, add_special, parse_special)
        return list(buf[:n])

    @property
    def n_vocab(self) -> int:
        """The number of token ids."""
        return int(self.llc.llama_vocab_n_tokens(self.vocab))

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of the given tokens, control tokens left out."""
        return b"".join(self.piece(t) for t in ids).decode("utf-8", errors="replace")

    def turn_opening(self) -> list[int]:
        """The tokens the chat template puts between an assistant's reply and the next user message's
        text (ChatML: `<|im_end|>`, `\\n`, `<|im_start|>`, `user`, `\\n`): how a conversation's next
        prompt goes on after a reply that ended at end of turn. Empty if the template gives none."""
        probe = [Message("user", "a"), Message("assistant", "b"), Message("user", "c")]
        try:
            segments = render_segments(lambda msgs, gen: self.template.render(msgs, None, gen), probe)
        except jinja2.TemplateError:
            return []
        contents = [i for i, (is_user_text, _) in enumerate(segments) if is_user_text]
        if len(contents) != len(probe):
            return []
        ids: list[int] = []
        for _, text in segments[contents[1] + 1 : contents[2]]:  # tokenized as encode_chat does
            ids.extend(self.tokenize(text, parse_special=True))
        return ids

    def encode_chat(
        self, messages: Sequence[Message], tools: list[dict[str, Any]] | None = None, prefix: str = ""
    ) -> list[int]:
        """Render the chat template; template text may hold special tokens, message content never does."""
        try:
            segments = render_segments(lambda msgs, gen: self.template.render(msgs, tools, gen), messages)
        except jinja2.TemplateError as exc:
            raise BadRequest(f"the model's chat template rejected the messages: {exc}", param="messages") from None
        ids: list[int] = []
        for is_user_text, text in [*segments, (False, prefix)]:
            ids.extend(self.tokenize(text, parse_special=not is_user_text))
        return ids
