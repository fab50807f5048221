"""A stand-in for the Hugging Face hub: a local HTTP server that huggingface_hub talks to via HF_ENDPOINT.

It answers the routes huggingface_hub uses to download: the repo metadata
(`/api/models/{repo}/revision/{rev}` and the tree listing), `HEAD` and `GET` on
`/{repo}/resolve/{rev}/{file}` with ETag, commit and size headers, and byte ranges for resume.
Repos can be made gated (401 with the hub's `X-Error-Code: GatedRepo`), and a file can be set to
drop its connection once, part-way, to exercise resume. Every request is logged for asserts.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

from .models import sha256_of

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Repo:
    """Files of one repo: name -> local file served as its content."""

    files: dict[str, Path]
    gated: bool = False


@dataclass
class Hub:
    """The stand-in's state: its repos, its request log, and the files to drop once."""

    repos: dict[str, Repo] = field(default_factory=dict)
    log: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range header)
    drop_once: dict[str, int] = field(default_factory=dict)  # file name -> bytes sent before the drop
    url: str = ""

    def downloads(self, name: str) -> list[str | None]:
        """Range headers of the GETs of a file (None: from the start)."""
        return [rng for method, path, rng in self.log if method == "GET" and path.endswith("/" + name)]


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    etags: dict[Path, str] = {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
            pass

        def _json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _gated(self, repo: Repo) -> bool:
            if repo.gated and not self.headers.get("Authorization"):
                msg = "Access to model is restricted. You must have access to it and be authenticated."
                self._json(401, {"error": msg}, {"X-Error-Code": "GatedRepo", "X-Error-Message": msg})
                return True
            return False

        def _not_found(self) -> None:
            msg = "Repository not found"
            self._json(401, {"error": msg}, {"X-Error-Code": "RepoNotFound", "X-Error-Message": msg})

        def _route(self) -> None:
            path = unquote(urlparse(self.path).path)
            hub.log.append((self.command, path, self.headers.get("Range")))
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"]:
                return self._api(parts[2:])
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._file("/".join(parts[:2]), "/".join(parts[4:]))
            self._json(404, {"error": "no such route"})

        def _api(self, parts: list[str]) -> None:
            repo_id = "/".join(parts[:2])
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._not_found()
            if self._gated(repo):
                return
            sizes = {name: p.stat().st_size for name, p in repo.files.items()}
            if len(parts) >= 3 and parts[2] == "tree":
                body: object = [
                    {"type": "file", "path": n, "size": s, "oid": COMMIT[:40]} for n, s in sorted(sizes.items())
                ]
                return self._json(200, body)
            siblings = [{"rfilename": n, "size": s} for n, s in sorted(sizes.items())]
            body = {"id": repo_id, "modelId": repo_id, "sha": COMMIT, "private": False, "siblings": siblings}
            self._json(200, body)

        def _file(self, repo_id: str, name: str) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._not_found()
            if self._gated(repo):
                return
            local = repo.files.get(name)
            if local is None:
                msg = "Entry not found"
                return self._json(404, {"error": msg}, {"X-Error-Code": "EntryNotFound", "X-Error-Message": msg})
            size = local.stat().st_size
            if local not in etags:  # hash each file once, not on every request
                etags[local] = sha256_of(local)
            etag = etags[local]
            start = 0
            rng = self.headers.get("Range")
            if rng and self.command == "GET" and rng.startswith("bytes="):
                start = int(rng[6:].split("-")[0] or 0)
            self.send_response(206 if start else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{etag}"')
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(size))
            self.send_header("X-Repo-Commit", COMMIT)
            self.end_headers()
            if self.command == "HEAD":
                return
            cut = hub.drop_once.pop(name, None) if not start else None
            with local.open("rb") as fh:
                fh.seek(start)
                sent = 0
                while block := fh.read(1 << 16):
                    if cut is not None and sent + len(block) > cut:
                        self.wfile.write(block[: cut - sent])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)  # the dropped connection, mid-file
                        return
                    self.wfile.write(block)
                    sent += len(block)

        do_GET = _route
        do_HEAD = _route

    return Handler


@contextmanager
def stand_in_hub(repos: dict[str, Repo]) -> Iterator[Hub]:
    """Run the stand-in on 127.0.0.1 (a free port) for the duration of the block."""
    hub = Hub(repos=repos)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="stand-in-hub", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
