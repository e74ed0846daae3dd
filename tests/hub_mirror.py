"""A local Hugging Face Hub mirror for tests: serves model folders over the Hub's documented HTTP API, the
part `huggingface_hub.snapshot_download` uses:

  GET  /api/models/{repo}/revision/{rev}          repo info: {"id", "sha", "siblings"}
  GET  /api/models/{repo}/tree/{rev}?recursive=1  file listing: [{"type": "file", "path", "size", "oid"}]
  HEAD /{repo}/resolve/{rev}/{file}               X-Repo-Commit, ETag, Content-Length
  GET  /{repo}/resolve/{rev}/{file}               the bytes

Errors as the Hub sends them: 404 + `X-Error-Code: RepoNotFound` / `RevisionNotFound`, 403 + `X-Error-Code:
GatedRepo` (a repo listed in `gated`, for any token). Every request is recorded in `requests`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class HubMirror:
    def __init__(self, repos: dict[str, Path], gated: set[str] = frozenset()):
        self.repos = repos
        self.gated = set(gated)
        self.requests: list[tuple[str, str]] = []
        self.commit = {repo: hashlib.sha1(repo.encode()).hexdigest() for repo in repos}

    def _files(self, repo: str) -> dict[str, Path]:
        root = self.repos[repo]
        return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}

    def handler(mirror):  # noqa: N805 - the handler class closes over the mirror
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _error(self, status: int, code: str):
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Type", "application/json")
                body = json.dumps({"error": code}).encode()
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, obj):
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _repo_rev(self, parts: list[str]):
                repo = "/".join(parts[:2])
                if repo not in mirror.repos:
                    return self._error(404, "RepoNotFound")
                rev = unquote(parts[3]) if len(parts) > 3 else "main"
                if rev not in ("main", mirror.commit[repo]):
                    return self._error(404, "RevisionNotFound")
                return repo

            def do_GET(self):
                self._serve()

            def do_HEAD(self):
                self._serve()

            def _serve(self):
                url = urlparse(self.path)
                mirror.requests.append((self.command, url.path))
                parts = [p for p in url.path.split("/") if p]
                if parts[:2] == ["api", "models"]:
                    # /api/models/{org}/{name}/revision/{rev} or /tree/{rev}
                    repo = self._repo_rev(parts[2:4] + parts[4:6])
                    if repo is None:
                        return
                    files = mirror._files(repo)
                    if parts[4] == "revision":
                        return self._json({"id": repo, "sha": mirror.commit[repo], "private": False,
                                           "gated": "auto" if repo in mirror.gated else False,
                                           "siblings": [{"rfilename": f} for f in files]})
                    return self._json([{"type": "file", "path": f, "size": p.stat().st_size,
                                        "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for f, p in files.items()])
                # /{org}/{name}/resolve/{rev}/{file...}
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._error(404, "EntryNotFound")
                repo = self._repo_rev(parts[:2] + [parts[2], parts[3]])
                if repo is None:
                    return
                if repo in mirror.gated:
                    return self._error(403, "GatedRepo")
                path = mirror._files(repo).get("/".join(parts[4:]))
                if path is None:
                    return self._error(404, "EntryNotFound")
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("X-Repo-Commit", mirror.commit[repo])
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(data)

        return Handler


@contextlib.contextmanager
def hub_mirror(repos: dict[str, Path], gated: set[str] = frozenset()):
    """Serve `repos` ({"org/name": folder}) on a free local port; yields (endpoint URL, HubMirror)."""
    mirror = HubMirror(repos, gated)
    server = ThreadingHTTPServer(("127.0.0.1", 0), mirror.handler())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", mirror
    finally:
        server.shutdown()
        server.server_close()
