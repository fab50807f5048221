"""A requests-based client for the seed API, and the interactive chat loop built on it."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import Any

import requests

DEFAULT_URL = "http://127.0.0.1:5000"


class APIError(Exception):
    """The server answered with an error, or could not be reached; the message is one line."""


class PureAPIClient:
    """Talks to a pureapi server's seed API."""

    def __init__(self, url: str = DEFAULT_URL, session_id: str | None = None, timeout: float = 600.0):
        self.url = url.rstrip("/")
        self.session_id = session_id
        self.timeout = timeout
        self.http = requests.Session()

    def _post(self, path: str, body: dict[str, Any], stream: bool = False) -> requests.Response:
        if self.session_id:
            body = {**body, "session_id": self.session_id}
        return self._check(lambda: self.http.post(self.url + path, json=body, stream=stream, timeout=self.timeout))

    def _check(self, call: Any) -> requests.Response:
        try:
            response: requests.Response = call()
        except requests.ConnectionError:
            raise APIError(f"cannot reach the pureapi server at {self.url} (is it running?)") from None
        except requests.Timeout:
            raise APIError(f"the server at {self.url} did not answer in {self.timeout:.0f}s") from None
        if response.status_code >= 400:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            raise APIError(f"server error {response.status_code}: {message}")
        return response

    def chat(self, message: str, max_tokens: int = 512, temperature: float = 0.7) -> str:
        """Send one message; return the whole reply."""
        body = {"message": message, "max_tokens": max_tokens, "temperature": temperature}
        return str(self._post("/chat", body).json()["response"])

    def chat_stream(self, message: str, max_tokens: int = 512, temperature: float = 0.7) -> Iterator[str]:
        """Send one message; yield the reply's text as it is generated."""
        body = {"message": message, "max_tokens": max_tokens, "temperature": temperature, "stream": True}
        with self._post("/chat", body, stream=True) as response:
            for line in response.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: "):
                    continue
                event = json.loads(line[len("data: ") :])
                if "error" in event:
                    raise APIError(f"server error: {event['error']}")
                if "delta" in event:
                    yield event["delta"]

    def reset(self) -> None:
        """Clear the conversation."""
        self._post("/reset", {})

    def status(self) -> dict[str, Any]:
        """The server's /status."""
        params = {"session_id": self.session_id} if self.session_id else None
        return dict(self._check(lambda: self.http.get(self.url + "/status", params=params, timeout=30)).json())


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


HELP = "Type a message to chat. Commands: reset (clear history), status, quit."


def main(argv: list[str] | None = None) -> int:
    """Interactive chat: a line chats (the reply streams), `reset`, `status`, `quit`; Ctrl-D/Ctrl-C end."""
    parser = argparse.ArgumentParser(prog="api_client_example.py", description="Chat with a pureapi server.")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server address (default {DEFAULT_URL})")
    parser.add_argument("--session", default=None, help="conversation id (default: the server's default session)")
    parser.add_argument("--max-tokens", type=int, default=512, help="reply length limit (default 512)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    args = parser.parse_args(argv)
    client = PureAPIClient(args.url, session_id=args.session)
    print(f"pureapi chat — {client.url}. {HELP}")
    try:
        while True:
            try:
                line = input("You: ").strip()
            except EOFError:
                print()
                break
            if not line:
                continue
            command = line.lower()
            try:
                if command in ("quit", "exit"):
                    break
                if command == "reset":
                    client.reset()
                    print("(conversation cleared)")
                elif command == "status":
                    s = client.status()
                    print(f"  model:        {s['model_name']}")
                    print(f"  device:       {s['device']}")
                    print(f"  conversation: {s['conversation_length']} messages")
                    print(f"  memory:       {human_bytes(int(s['memory_allocated']))}")
                elif command == "help":
                    print(HELP)
                else:
                    print("Assistant: ", end="", flush=True)
                    for piece in client.chat_stream(line, args.max_tokens, args.temperature):
                        print(piece, end="", flush=True)
                    print()
            except APIError as exc:
                print(f"\nerror: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print()
    print("bye")
    return 0
