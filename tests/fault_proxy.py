"""TEST TOOL ONLY: a real HTTP proxy on 127.0.0.1 that forwards to an upstream OpenAI-compatible server and
injects the faults real providers produce, so retry, accounting and secret handling are tested against
real sockets.

    with FaultProxy("http://127.0.0.1:8080", fault_rate=0.3, seed=1, hang_s=8) as proxy:
        ...  # point a client at proxy.url; proxy.stats counts requests, forwards and injected faults

Per request, with probability `fault_rate` (seeded, in arrival order) it answers instead of forwarding:
  * 429 with `Retry-After: <retry_after>` and an OpenAI-style error body,
  * 500 with an OpenAI-style error body,
  * a hang: holds the connection open without answering until the client gives up (or `hang_s` passes;
    set it above the client's timeout), then closes it.
When a client disconnects while its request is upstream, the proxy closes the upstream connection too, as
a gateway does: llama-server then stops generating for it instead of burning CPU on an abandoned answer.
With `echo_key_401=True` every request is answered 401 with the presented API key in the message, as some
servers do; the code under test must not repeat it anywhere. With `azure_paths=True` it also accepts Azure
OpenAI's URL forms (`/openai/deployments/<name>/chat/completions?api-version=...`, `/openai/v1/...`) and
forwards them to the upstream's `/v1/...`; `proxy.paths` counts the paths clients used.
"""

from __future__ import annotations

import http.client
import json
import random
import re
import select
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("429", "500", "timeout")
_HOP_BY_HOP = {"host", "connection", "keep-alive", "transfer-encoding", "content-length", "accept-encoding"}


class FaultProxy:
    def __init__(self, upstream: str, *, fault_rate: float = 0.3, seed: int = 0, faults: tuple = FAULTS,
                 retry_after: float = 1, hang_s: float = 10.0, echo_key_401: bool = False,
                 azure_paths: bool = False):
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.fault_rate, self.faults, self.retry_after, self.hang_s = fault_rate, faults, retry_after, hang_s
        self.echo_key_401, self.azure_paths = echo_key_401, azure_paths
        self.stats: Counter = Counter()
        self.paths: Counter = Counter()
        self.keys_seen: set[tuple[str, str]] = set()   # (header, key) pairs answered with a 401
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        """OpenAI base URL of the proxy."""
        return self.root + "/v1"

    def reset_stats(self) -> None:
        with self._lock:
            self.stats.clear()
            self.paths.clear()

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()  # wakes hanging handlers
        self._server.shutdown()
        self._server.server_close()

    def _decide(self, path: str) -> str | None:
        with self._lock:
            self.stats["requests"] += 1
            self.paths[path.split("?")[0]] += 1
            if self.echo_key_401:
                return "401"
            if self._rng.random() < self.fault_rate:
                fault = self._rng.choice(self.faults)
                self.stats[f"fault_{fault}"] += 1
                return fault
            self.stats["forwarded"] += 1
            return None

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _send(self, status: int, data: bytes, headers: dict) -> None:
                try:
                    self.send_response(status)
                    for name, value in {**headers, "Content-Length": str(len(data))}.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    with proxy._lock:
                        proxy.stats["client_gone"] += 1

            def _send_json(self, status: int, body: dict, headers: dict | None = None) -> None:
                self._send(status, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})})

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy._decide(self.path)
                if fault == "429":
                    self._send_json(429, {"error": {"message": "Rate limit reached (injected)",
                                                    "type": "rate_limit_error"}},
                                    {"Retry-After": f"{proxy.retry_after:g}"})
                elif fault == "500":
                    self._send_json(500, {"error": {"message": "Internal error (injected)", "type": "server_error"}})
                elif fault == "timeout":
                    self._wait_for_client_to_leave(proxy.hang_s)
                    self.close_connection = True
                elif fault == "401":
                    header = "authorization" if self.headers.get("Authorization") else "api-key"
                    key = (self.headers.get(header) or "").removeprefix("Bearer ")
                    with proxy._lock:
                        proxy.keys_seen.add((header, key))
                    self._send_json(401, {"error": {"message": f"Incorrect API key provided: {key}",
                                                    "type": "invalid_request_error"}})
                else:
                    self._forward(body)

            def _client_gone(self) -> bool:
                readable, _, _ = select.select([self.connection], [], [], 0)
                if not readable:
                    return False
                try:
                    return self.connection.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    return True

            def _wait_for_client_to_leave(self, limit_s: float, until: threading.Event | None = None) -> bool:
                """Wait up to limit_s (or until `until` is set); True when the client hung up first."""
                waited = 0.0
                while waited < limit_s and not proxy._stop.is_set() and not (until and until.is_set()):
                    if self._client_gone():
                        with proxy._lock:
                            proxy.stats["client_gone"] += 1
                        return True
                    proxy._stop.wait(0.2)
                    waited += 0.2
                return False

            def _forward(self, body: bytes) -> None:
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=600)
                path = self.path
                if proxy.azure_paths:
                    path = re.sub(r"^/openai(/deployments/[^/]+|/v1)", "/v1", path.split("?")[0])
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                answer: dict = {}
                done = threading.Event()

                def call() -> None:
                    try:
                        conn.request(self.command, path, body=body or None, headers=headers)
                        resp = conn.getresponse()
                        answer.update(status=resp.status, data=resp.read(),
                                      content_type=resp.getheader("Content-Type", "application/json"))
                    except (OSError, http.client.HTTPException) as exc:
                        answer["error"] = exc
                    finally:
                        done.set()

                threading.Thread(target=call, daemon=True).start()
                if self._wait_for_client_to_leave(600, until=done) and not done.is_set():
                    if conn.sock is not None:  # the upstream sees the disconnect and cancels the generation
                        conn.sock.shutdown(socket.SHUT_RDWR)
                    done.wait(10)
                    conn.close()
                    return
                done.wait()
                conn.close()
                if "error" in answer:  # upstream gone: what a gateway says
                    with proxy._lock:
                        proxy.stats["upstream_error"] += 1
                    self._send_json(502, {"error": {"message": f"upstream error: {type(answer['error']).__name__}"}})
                    return
                self._send(answer["status"], answer["data"], {"Content-Type": answer["content_type"]})

            do_GET = do_POST = _handle

        return Handler
