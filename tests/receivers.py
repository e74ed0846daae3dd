"""Local HTTP servers that check what the real services check (on 127.0.0.1 only).

LangfuseReceiver  Langfuse's ingestion endpoints as SDK v5 uses them: OTLP/HTTP protobuf spans (gzip) at
                  /api/public/otel/v1/traces and JSON score batches at /api/public/scores, both behind
                  Basic auth with the project's public:secret key; decodes and keeps what it received.
AzureOpenAIServer Azure OpenAI's two URL styles: /openai/deployments/<deployment>/chat/completions with a
                  required api-version and the `api-key` header, and the v1 API /openai/v1/chat/completions
                  (model = deployment; `api-key` or `Authorization: Bearer`). Wrong key: 401, unknown
                  deployment or missing api-version: 404, like the service. Answers are fixed: the test
                  is about addressing and parsing, not about a model.
"""

from __future__ import annotations

import base64
import gzip
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class _Server:
    handler_cls: type

    def __enter__(self):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self.handler_cls)
        self.httpd.owner = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):   # keep pytest output clean
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))


def _any_value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


class _LangfuseHandler(_Handler):
    def do_POST(self):
        owner: LangfuseReceiver = self.server.owner
        body = self._body()
        owner.requests.append(self.path)
        expected = "Basic " + base64.b64encode(f"{owner.public_key}:{owner.secret_key}".encode()).decode()
        if self.headers.get("Authorization") != expected:
            return self._reply(401, {"message": "Invalid credentials"})
        if self.path == "/api/public/otel/v1/traces":
            from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            req = ExportTraceServiceRequest()
            req.ParseFromString(body)
            for rs in req.resource_spans:
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        owner.spans.append({"name": s.name, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                                            "parent_span_id": s.parent_span_id.hex(),
                                            "start_ns": s.start_time_unix_nano, "end_ns": s.end_time_unix_nano,
                                            "attributes": {a.key: _any_value(a.value) for a in s.attributes}})
            return self._reply(200, {})
        if self.path == "/api/public/scores":
            owner.scores.extend(json.loads(body))
            return self._reply(202, {"message": "Accepted"})
        return self._reply(404, {"message": f"no route {self.path}"})

    do_GET = do_POST


class LangfuseReceiver(_Server):
    handler_cls = _LangfuseHandler

    def __init__(self, public_key: str = "pk-lf-test", secret_key: str = "sk-lf-test"):
        self.public_key, self.secret_key = public_key, secret_key
        self.requests: list[str] = []
        self.spans: list[dict] = []
        self.scores: list[dict] = []

    def env(self) -> dict:
        """The environment a Langfuse SDK needs to send here (spans gzip-compressed, the SDK default)."""
        return {"LANGFUSE_PUBLIC_KEY": self.public_key, "LANGFUSE_SECRET_KEY": self.secret_key,
                "LANGFUSE_BASE_URL": self.url}

    def generations(self) -> list[dict]:
        return [s for s in self.spans if s["attributes"].get("langfuse.observation.type") == "generation"]

    def wait_for(self, predicate, timeout: float = 20.0) -> None:
        """The SDK exports from background threads; poll until what a test expects has arrived."""
        deadline = time.time() + timeout
        while time.time() < deadline and not predicate():
            time.sleep(0.1)


class _AzureHandler(_Handler):
    def do_POST(self):
        owner: AzureOpenAIServer = self.server.owner
        url = urlparse(self.path)
        query = parse_qs(url.query)
        body = json.loads(self._body() or b"{}")
        owner.requests.append({"path": url.path, "query": query, "body": body,
                               "headers": {k.lower(): v for k, v in self.headers.items()}})
        parts = url.path.strip("/").split("/")
        if parts[:2] == ["openai", "deployments"] and parts[3:] == ["chat", "completions"] and len(parts) == 5:
            deployment = parts[2]
            if query.get("api-version") != [owner.api_version]:
                return self._reply(404, {"error": {"code": "404", "message": "Resource not found"}})
            if self.headers.get("api-key") != owner.api_key:
                return self._unauthorized()
        elif parts == ["openai", "v1", "chat", "completions"]:
            deployment = body.get("model")
            key = self.headers.get("api-key") or (self.headers.get("Authorization") or "").removeprefix("Bearer ")
            if key != owner.api_key:
                return self._unauthorized()
        else:
            return self._reply(404, {"error": {"code": "404", "message": "Resource not found"}})
        if deployment not in owner.deployments:
            return self._reply(404, {"error": {"code": "DeploymentNotFound",
                                               "message": f"The API deployment {deployment} does not exist."}})
        return self._reply(200, owner.answer(deployment, body))

    def _unauthorized(self):
        return self._reply(401, {"error": {"code": "401", "message": "Access denied due to invalid subscription "
                                           "key or wrong API endpoint."}})


class AzureOpenAIServer(_Server):
    handler_cls = _AzureHandler

    def __init__(self, api_key: str = "azure-test-key", api_version: str = "2024-10-21",
                 deployments: tuple[str, ...] = ("gpt-4o-mini",)):
        self.api_key, self.api_version, self.deployments = api_key, api_version, deployments
        self.requests: list[dict] = []

    @staticmethod
    def answer(deployment: str, body: dict) -> dict:
        """A chat.completion: a tool call when tools were offered, else a JSON text answer."""
        message: dict = {"role": "assistant", "content": '{"city": "Lisbon"}'}
        if body.get("tools"):
            tool = body["tools"][0]["function"]["name"]
            message = {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": tool, "arguments": json.dumps({"city": "Lisbon", "day": "today"})}}]}
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()), "model": deployment,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 42, "completion_tokens": 7, "total_tokens": 49}}


class _ChatHandler(_Handler):
    def do_POST(self):
        owner: FlakyChatServer = self.server.owner
        body = json.loads(self._body() or b"{}")
        key = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        prompt = (body.get("messages") or [{}])[-1].get("content", "")
        with owner.lock:
            owner.calls[prompt] = owner.calls.get(prompt, 0) + 1
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._reply(404, {"error": {"message": f"no route {self.path}"}})
        if key != owner.api_key:   # OpenAI's wording, which repeats the presented key
            return self._reply(401, {"error": {"message": f"Incorrect API key provided: {key}",
                                               "type": "invalid_request_error"}})
        time.sleep(owner.delay_s)
        if prompt in owner.fail_prompts:   # a broken backend that echoes the request's credentials
            return self._reply(500, {"error": {"message": f"backend failed for request with key {key}",
                                               "type": "server_error"}})
        return self._reply(200, {
            "id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()), "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": owner.answer},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}})


class FlakyChatServer(_Server):
    """An OpenAI-compatible chat endpoint at /v1 that fails chosen prompts on every attempt (HTTP 500) and, like
    some real servers, puts the presented API key into its error messages (401 for a wrong key, and the
    500s). `calls` counts requests per prompt, so retries are visible; `delay_s` makes every answer slow."""

    handler_cls = _ChatHandler

    def __init__(self, api_key: str, fail_prompts: set[str] = frozenset(), answer: str = "ok", delay_s: float = 0):
        self.api_key, self.fail_prompts, self.answer, self.delay_s = api_key, set(fail_prompts), answer, delay_s
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()


class _HubHandler(_Handler):
    def do_POST(self):
        owner: EchoingHubServer = self.server.owner
        self._body()
        token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        owner.requests.append((self.command, self.path, token))
        # The Hub's 401 body, plus the presented token, as a misbehaving proxy in front of it might add.
        return self._reply(401, {"error": f"Invalid credentials in Authorization header (got {token})"})

    do_GET = do_PUT = do_POST


class EchoingHubServer(_Server):
    """A Hugging Face Hub endpoint that refuses every request with 401 and quotes the token back."""

    handler_cls = _HubHandler

    def __init__(self):
        self.requests: list[tuple[str, str, str]] = []
