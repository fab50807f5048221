"""An engine that forwards generation to an OpenAI-compatible upstream (vLLM, llama-server, another pureapi).

pureapi keeps the sessions, the Responses state, auth, limits and the seed API; the upstream does the
batching on its GPUs. Only the upstream's tokenizer and chat template can turn a conversation into tokens,
so `encode_chat` returns a ChatPrompt (the messages, sent as they are) with the count the upstream gives
at `POST /tokenize` (vLLM's: messages in, count out). An upstream without one gets an estimate, marked as
such, deliberately high (3 bytes per token) so that the history window errs on the side of dropping an old
turn rather than overflowing the upstream's context.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import requests

from ..errors import (
    BadGateway,
    BadRequest,
    Cancelled,
    EngineError,
    GatewayTimeout,
    ModelLoadError,
    Overloaded,
)
from ..structured import JSON_OBJECT
from ..tools import HERMES
from ..types import ChatPrompt, Chunk, GenerationRequest, Message, TokenLogprob, TopLogprob
from ._template import continues
from .base import Engine
from .remote_tools import UpstreamCalls, upstream_choice

BYTES_PER_TOKEN = 3  # below the ~4 of English text in BPE vocabularies: the estimate stays high
TOKENS_PER_MESSAGE = 8  # the chat template's role markers
CONNECT_TIMEOUT = 10.0

log = logging.getLogger(__name__)


class RemoteEngine(Engine):
    """Generation by an upstream's /v1/chat/completions, streamed; closing the stream closes the upstream's."""

    name = "remote"

    def __init__(
        self,
        upstream: str,
        *,
        key: str | None = None,
        model: str | None = None,
        context_length: int = 8192,
        slots: int = 16,
        timeout: float = 300.0,
    ):
        self.upstream = upstream.rstrip("/")
        if not self.upstream.endswith("/v1"):
            self.upstream += "/v1"
        self.key = key
        self.model_name = model or ""
        self.device = f"remote ({self.upstream})"
        self.context_length = context_length
        self.raw_prompts = False  # the upstream is sent chat messages, never token ids
        self.tool_format = HERMES  # the upstream's calls are written back in it (remote_tools)
        self.slots = slots  # generations the upstream runs at once, as far as admission here is concerned
        self.timeout = timeout
        self._http = requests.Session()
        # The upstream's POST /tokenize (its root, beside /v1), found on first use; None: it has none.
        # Request threads may race to probe it: each reaches the same answer, so no lock.
        self._tokenize: str | None = self.upstream[: -len("/v1")] + "/tokenize"
        self._probed = False

    @classmethod
    def connect(
        cls, upstream: str, *, key: str | None, model: str | None, context_length: int | None, timeout: float
    ) -> RemoteEngine:
        """Ask the upstream for its model (and its context, where it says, as vLLM does); one-line errors."""
        engine = cls(upstream, key=key, model=model, timeout=timeout)
        try:
            r = engine._http.get(engine.upstream + "/models", headers=engine._headers(), timeout=CONNECT_TIMEOUT)
        except requests.RequestException as exc:
            raise ModelLoadError(f"upstream {engine.upstream}: cannot reach it ({type(exc).__name__})") from None
        if r.status_code != 200:
            raise ModelLoadError(f"upstream {engine.upstream}: GET /models answered {r.status_code}: {_message(r)}")
        models = r.json().get("data") or []
        if not models:
            raise ModelLoadError(f"upstream {engine.upstream}: serves no model")
        chosen = next((m for m in models if m.get("id") == model), None) if model else models[0]
        if chosen is None:
            names = ", ".join(str(m.get("id")) for m in models)
            raise ModelLoadError(f"upstream {engine.upstream}: no model '{model}' (it serves {names})")
        engine.model_name = str(chosen["id"])
        engine.context_length = context_length or int(chosen.get("max_model_len") or 8192)
        return engine

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def encode_chat(
        self, messages: Sequence[Message], tools: list[dict[str, Any]] | None = None, prefix: str = ""
    ) -> ChatPrompt:
        kept, functions = tuple(messages), tuple(tools or ())
        if self.counts_tokens() and self._tokenize is not None:
            return ChatPrompt(kept, self._count(self._tokenize, kept, functions), tools=functions, prefix=prefix)
        return ChatPrompt(kept, estimate_tokens(kept, functions), estimated=True, tools=functions, prefix=prefix)

    def counts_tokens(self) -> bool:
        """Whether prompt sizes are the upstream's counts (it has /tokenize) or estimates; asks it once."""
        if not self._probed:
            try:
                self._count(self._tokenize or "", (Message("user", "Hi"),))
            except _NoCount:
                log.warning("upstream %s has no POST /tokenize: prompt sizes are estimates", self.upstream)
                self._tokenize = None
            self._probed = True
        return self._tokenize is not None

    def _count(self, url: str, messages: tuple[Message, ...], tools: tuple[dict[str, Any], ...] = ()) -> int:
        """The upstream's token count for the conversation rendered with its template and generation prompt."""
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": [_wire(m) for m in messages],
            "add_generation_prompt": True,
        }
        if tools:
            body["tools"] = list(tools)
        r = self._post(url, body, stream=False)
        if r.status_code in (404, 405, 501):
            raise _NoCount(f"upstream {self.upstream} has no POST /tokenize ({r.status_code})")
        if r.status_code != 200:
            with r:
                raise _mapped(r, self.upstream)
        try:
            count = r.json()["count"]
        except (ValueError, KeyError, TypeError):
            count = None
        if not isinstance(count, int) or count < 0:
            raise _NoCount(f"upstream {self.upstream}: POST /tokenize answered without a count")
        return count

    def memory_allocated(self) -> int:
        return 0

    def generate(self, request: GenerationRequest) -> Iterator[Chunk]:
        prompt = request.chat
        if prompt is None:
            raise EngineError("remote engine: it takes chat messages (a ChatPrompt), not token ids")
        response = self._post(self.upstream + "/chat/completions", self._body(prompt, request), stream=True)
        if response.status_code != 200:
            with response:
                raise _mapped(response, self.upstream)
        return self._read(response, request, 0 if prompt.estimated else prompt.tokens)

    def _post(self, url: str, body: dict[str, Any], *, stream: bool) -> requests.Response:
        """POST to the upstream; a silent one is a 504, an unreachable one a 502."""
        try:
            return self._http.post(
                url, json=body, headers=self._headers(), stream=stream, timeout=(CONNECT_TIMEOUT, self.timeout)
            )
        except requests.Timeout:
            raise GatewayTimeout(f"upstream {self.upstream} did not answer within {self.timeout:g}s") from None
        except requests.RequestException as exc:
            raise BadGateway(f"upstream {self.upstream} is unreachable ({type(exc).__name__})") from None

    def _body(self, prompt: ChatPrompt, request: GenerationRequest) -> dict[str, Any]:
        p = request.params
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": [_wire(m) for m in prompt.messages],
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        # Stop strings are applied here (SessionService), so the upstream's reply is cut the same way.
        optional = {
            "seed": p.seed,
            "presence_penalty": p.presence_penalty or None,
            "frequency_penalty": p.frequency_penalty or None,
            "top_k": p.top_k or None,  # vLLM's and llama.cpp's extensions
            "min_p": p.min_p or None,
            "repetition_penalty": p.repeat_penalty if p.repeat_penalty != 1.0 else None,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        if prompt.tools:
            body["tools"] = list(prompt.tools)
            body["tool_choice"] = upstream_choice(prompt.prefix, p.json_schema)
        # Structured output and logprobs are the upstream's to do (vLLM and llama-server both do them); a
        # forced call's schema is not sent: the upstream holds the call to the function's own parameters.
        schema = None if prompt.prefix else p.json_schema
        if schema == JSON_OBJECT:
            body["response_format"] = {"type": "json_object"}
        elif schema is not None:
            spec = {"name": "reply", "schema": schema, "strict": True}
            body["response_format"] = {"type": "json_schema", "json_schema": spec}
        if p.logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = p.logprobs
        if continues(prompt.messages):  # a prefill: vLLM's pair of fields (pureapi takes them too)
            body.update(continue_final_message=True, add_generation_prompt=False)
        return body

    def _read(self, response: requests.Response, request: GenerationRequest, counted: int) -> Iterator[Chunk]:
        """The upstream's SSE as chunks; usage is the upstream's (it counts), else our count, never an estimate
        (0 then: an upstream that neither tokenizes nor reports usage leaves the prompt's size unknown)."""
        completion = 0
        finish: str | None = None
        prompt_tokens, cached = counted, 0
        calls = UpstreamCalls()
        try:
            for line in response.iter_lines(decode_unicode=False):
                if request.cancel.is_set():
                    raise Cancelled("generation cancelled")
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise BadGateway(f"upstream failed mid-reply: {_error_text(event['error'])}")
                usage = event.get("usage")
                if usage:
                    prompt_tokens = int(usage.get("prompt_tokens", prompt_tokens))
                    completion = int(usage.get("completion_tokens", completion))
                    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {}
                    calls.feed(delta.get("tool_calls") or [])
                    text = delta.get("content") or ""
                    logprobs = _logprobs(choice.get("logprobs"))
                    if text or logprobs:
                        completion += 1
                        yield Chunk(text, None, prompt_tokens, completion, cached, logprobs=logprobs)
                    finish = choice.get("finish_reason") or finish
        except requests.Timeout:
            raise GatewayTimeout(f"upstream {self.upstream} went silent for {self.timeout:g}s mid-reply") from None
        except (requests.RequestException, ValueError) as exc:
            raise BadGateway(f"upstream {self.upstream} broke off the reply ({type(exc).__name__})") from None
        finally:
            # Closing the connection is how the upstream learns that its client went away: it stops generating.
            response.close()
        if finish is None:
            raise BadGateway(f"upstream {self.upstream} ended the reply without a finish reason")
        if finish == "tool_calls":
            finish = "stop"  # the API layers name a reply that ended in calls themselves
        yield Chunk(calls.text(bool(request.chat and request.chat.prefix)), finish, prompt_tokens, completion, cached)

    def close(self) -> None:
        self._http.close()


class _NoCount(BadGateway):
    """The upstream has no token counting endpoint (or one that answers something else)."""


def estimate_tokens(messages: Sequence[Message], tools: Sequence[dict[str, Any]] = ()) -> int:
    """A high guess at a conversation's token count, for an upstream that cannot count: 3 bytes a token."""
    text = sum(len(m.content.encode()) + sum(len(c.arguments) for c in m.tool_calls) for m in messages)
    text += len(json.dumps(list(tools)).encode()) if tools else 0
    return text // BYTES_PER_TOKEN + TOKENS_PER_MESSAGE * len(messages) + 1


def _wire(message: Message) -> dict[str, Any]:
    """A message in OpenAI's shape, with the tool calls and the call id a conversation with tools carries."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _logprobs(data: Any) -> list[TokenLogprob] | None:
    """An upstream chunk's choices[].logprobs (OpenAI's shape) as ours; None when it has none."""
    content = (data or {}).get("content") if isinstance(data, dict) else None
    if not content:
        return None

    def top(entry: dict[str, Any]) -> TopLogprob:
        token = str(entry["token"])
        raw = entry.get("bytes")
        return TopLogprob(token, float(entry["logprob"]), bytes(raw) if raw is not None else token.encode())

    out = []
    for entry in content:
        own = top(entry)
        out.append(TokenLogprob(own.token, own.logprob, own.bytes, [top(c) for c in entry.get("top_logprobs") or []]))
    return out


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def _message(response: requests.Response) -> str:
    try:
        return _error_text(response.json().get("error")) if response.content else response.reason
    except ValueError:
        return response.text[:200] or response.reason


def _mapped(response: requests.Response, upstream: str) -> Exception:
    """An upstream's refusal as our error: its 4xx about the request stay 400s, the rest are the gateway's."""
    status, text = response.status_code, _message(response)
    if status in (429, 503):
        return Overloaded(f"upstream {upstream} is busy ({status}): {text}")
    if status == 504:
        return GatewayTimeout(f"upstream {upstream} timed out: {text}")
    if status in (400, 413, 422):
        return BadRequest(f"upstream {upstream} rejected the request: {text}")
    if status in (401, 403):
        return BadGateway(f"upstream {upstream} refused pureapi's key ({status}): {text}")
    return BadGateway(f"upstream {upstream} answered {status}: {text}")
