"""A test double for the Ollama server's HTTP API, at the protocol level only.

Ollama cannot run on the test machines, so the deployment code (the official `ollama` client) is tested
against this real HTTP server on 127.0.0.1. It implements the documented endpoints the client calls
(docs/api.md), with the checks that matter for deployment, and nothing more:

  HEAD /api/blobs/sha256:<hex>   200 if stored, else 404
  POST /api/blobs/sha256:<hex>   hashes the body; stores it and answers 201 only when the sha256 matches
                                 the digest in the URL, else 400 {"error": "digest mismatch ..."}
  POST /api/create               {model, from | files, adapters, template, system, parameters, license,
                                 messages, stream}: every digest must be a stored blob, GGUF files must
                                 start with the GGUF magic, at most one adapter, which must be a GGUF LoRA
  POST /api/show                 modelfile, template, system, parameters, details, model_info (read from
                                 the stored GGUF's metadata with the `gguf` package)
  POST /api/chat                 it does NOT run a model. With `upstream` (a llama-server root URL) it
                                 renders the stored TEMPLATE as Ollama does, with Go's text/template (never
                                 the code under test: tests/ollama_reference_render.py)
                                 and asks that server's /completion for the answer, using the stored stop
                                 strings and the request's options; without one it answers 501.
  GET  /api/tags, DELETE /api/delete
  GET  /api/version              {"version": <the version it plays>}; from 0.34.1 on, /api/create refuses
                                 any `adapters` (ollama/ollama#14969) with 400, as the real server does

What it does not reproduce: model pulling, quantization at create time, the real scheduler and
runners, tool calls, images, streaming progress beyond one status line per step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import tempfile
import threading
import urllib.request
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


ADAPTERS_REFUSED_FROM = (0, 34, 1)


class _State:
    def __init__(self, root: Path, upstream: str | None, version: str = "0.33.0"):
        self.version = version
        self.blobs = root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.models: dict[str, dict] = {}
        self.upstream = upstream
        self.requests: list[tuple[str, str, int]] = []   # (method, path, status): what the client did
        self.lock = threading.Lock()

    def blob(self, digest: str) -> Path:
        return self.blobs / digest.replace(":", "-")


def _name(model: str) -> str:
    return model if ":" in model else model + ":latest"


def _gguf_info(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    info = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or (field.types and field.types[0] == gguf.GGUFValueType.ARRAY):
            continue
        info[key] = field.contents()
    return info


def _format_parameters(params: dict) -> str:
    lines = []
    for key, value in params.items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"{key:<30} " + (json.dumps(v) if isinstance(v, str) else str(v)))
    return "\n".join(lines)


class _Handler(BaseHTTPRequestHandler):
    state: _State
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:   # keep pytest output clean
        pass

    # ------------------------------------------------------------------ helpers
    def _send(self, status: int, body: dict | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        with self.state.lock:
            self.state.requests.append((self.command, self.path, status))

    def _body_chunks(self) -> Iterator[bytes]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return
                yield self.rfile.read(size)
                self.rfile.readline()
        remaining = int(self.headers.get("Content-Length", 0))
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk

    def _json(self) -> dict:
        return json.loads(b"".join(self._body_chunks()) or b"{}")

    # ------------------------------------------------------------------ routes
    def do_HEAD(self) -> None:
        m = re.fullmatch(r"/api/blobs/(.+)", self.path)
        if not m:
            return self._send(404)
        self._send(200 if self.state.blob(m.group(1)).exists() else 404)

    def do_GET(self) -> None:
        if self.path == "/":
            return self._send(200, {"status": "Ollama API test double"})
        if self.path == "/api/version":
            return self._send(200, {"version": self.state.version})
        if self.path == "/api/tags":
            return self._send(200, {"models": [{"name": n, "model": n, "modified_at": m["modified_at"],
                                                "size": m["size"], "digest": m["digest"]}
                                               for n, m in self.state.models.items()]})
        self._send(404, {"error": "not found"})

    def do_DELETE(self) -> None:
        if self.path != "/api/delete":
            return self._send(404, {"error": "not found"})
        name = _name(self._json().get("model", ""))
        if self.state.models.pop(name, None) is None:
            return self._send(404, {"error": f"model '{name}' not found"})
        self._send(200)

    def do_POST(self) -> None:
        m = re.fullmatch(r"/api/blobs/(.+)", self.path)
        if m:
            return self._upload(m.group(1))
        routes = {"/api/create": self._create, "/api/show": self._show, "/api/chat": self._chat}
        if self.path not in routes:
            return self._send(404, {"error": "not found"})
        try:
            body = self._json()
        except json.JSONDecodeError as exc:
            return self._send(400, {"error": f"invalid JSON: {exc}"})
        routes[self.path](body)

    def _upload(self, digest: str) -> None:
        if not DIGEST.match(digest):
            list(self._body_chunks())
            return self._send(400, {"error": f"invalid digest format {digest!r}"})
        target = self.state.blob(digest)
        sha = hashlib.sha256()
        with tempfile.NamedTemporaryFile(dir=self.state.blobs, delete=False) as tmp:
            for chunk in self._body_chunks():
                sha.update(chunk)
                tmp.write(chunk)
        got = "sha256:" + sha.hexdigest()
        if got != digest:
            Path(tmp.name).unlink()
            return self._send(400, {"error": f"digest mismatch, expected \"{digest}\", got \"{got}\""})
        existed = target.exists()
        Path(tmp.name).replace(target)
        self._send(200 if existed else 201)

    def _create(self, body: dict) -> None:
        model = body.get("model")
        if not model:
            return self._send(400, {"error": "model is required"})
        files, adapters = body.get("files") or {}, body.get("adapters") or {}
        if not files and not body.get("from"):
            return self._send(400, {"error": "neither 'from' or 'files' was specified"})
        if adapters and tuple(int(p) for p in self.state.version.split(".")[:3]) >= ADAPTERS_REFUSED_FROM:
            return self._send(400, {"error": "ADAPTER is no longer supported: creating LoRA adapter models was "
                                             "removed; merge the adapter into the model instead"})
        if len(adapters) > 1:
            return self._send(400, {"error": "only one adapter is currently supported"})
        base_info: dict = {}
        for kind, entries in (("file", files), ("adapter", adapters)):
            for filename, digest in entries.items():
                blob = self.state.blob(digest) if DIGEST.match(str(digest)) else None
                if blob is None or not blob.exists():
                    return self._send(400, {"error": f"{kind} {filename}: blob {digest} not found; upload it first"})
                if filename.endswith(".gguf") and blob.read_bytes()[:4] != b"GGUF":
                    return self._send(400, {"error": f"{kind} {filename}: not a GGUF file"})
                info = _gguf_info(blob)
                if kind == "adapter" and info.get("general.type") != "adapter":
                    return self._send(400, {"error": f"adapter {filename}: not a GGUF adapter"})
                if kind == "file":
                    base_info = info
        if body.get("from"):
            source = self.state.models.get(_name(body["from"]))
            if source is None:
                return self._send(400, {"error": f"base model '{body['from']}' not found (this double cannot pull)"})
            base_info = source["model_info"]
        name = _name(model)
        record = {k: body.get(k) for k in ("from", "files", "adapters", "template", "system", "license", "messages")}
        record.update(parameters=body.get("parameters") or {}, model_info=base_info,
                      modified_at=datetime.now(timezone.utc).isoformat(),
                      size=sum(self.state.blob(d).stat().st_size for d in [*files.values(), *adapters.values()]),
                      digest=hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest())
        if body.get("from") and not record["template"]:
            record["template"] = self.state.models[_name(body["from"])]["template"]
        self.state.models[name] = record
        self._send(200, {"status": "success"})

    def _modelfile(self, name: str, m: dict) -> str:
        lines = ["# Modelfile generated by \"ollama show\"", f"FROM {m['from'] or name}"]
        lines += [f"ADAPTER {d}" for d in (m["adapters"] or {}).values()]
        if m["template"]:
            lines.append(f'TEMPLATE """{m["template"]}"""')
        if m["system"]:
            lines.append(f'SYSTEM """{m["system"]}"""')
        for key, value in m["parameters"].items():
            lines += [f"PARAMETER {key} {json.dumps(v) if isinstance(v, str) else v}"
                      for v in (value if isinstance(value, list) else [value])]
        return "\n".join(lines) + "\n"

    def _show(self, body: dict) -> None:
        name = _name(body.get("model", ""))
        m = self.state.models.get(name)
        if m is None:
            return self._send(404, {"error": f"model '{name}' not found"})
        info = m["model_info"]
        arch = info.get("general.architecture", "")
        self._send(200, {"modelfile": self._modelfile(name, m), "parameters": _format_parameters(m["parameters"]),
                         "template": m["template"] or "", "system": m["system"] or "", "license": m["license"] or "",
                         "details": {"format": "gguf", "family": arch, "families": [arch],
                                     "parameter_size": info.get("general.size_label", ""),
                                     "quantization_level": str(info.get("general.file_type", ""))},
                         "model_info": info, "capabilities": ["completion"],
                         "modified_at": m["modified_at"]})

    def _chat(self, body: dict) -> None:
        # Rendered by Go's text/template as Ollama drives it (precomputed or live), never by tasks.ollama.
        from ollama_reference_render import reference_prompt

        name = _name(body.get("model", ""))
        m = self.state.models.get(name)
        if m is None:
            return self._send(404, {"error": f"model '{name}' not found"})
        if not self.state.upstream:
            return self._send(501, {"error": "this test double has no model runner (start it with upstream=)"})
        options = {**m["parameters"], **(body.get("options") or {})}
        try:
            # `"tools": []` (what the ollama client may send for no tools) renders as no tools: Go's
            # text/template takes an empty slice as false in `{{ if .Tools }}`, so it keys like None.
            prompt = reference_prompt(m["template"] or "{{ .Prompt }}", body.get("messages") or [], m["system"],
                                      body.get("tools") or None, body.get("think"))
        except (LookupError, ValueError) as exc:
            return self._send(500, {"error": f"template: {exc}"})
        stop = options.get("stop", [])
        request = {"prompt": prompt, "n_predict": options.get("num_predict", 128), "stop": stop if isinstance(stop, list) else [stop],
                   "temperature": options.get("temperature", 0.8), "top_k": options.get("top_k", 40),
                   "repeat_penalty": options.get("repeat_penalty", 1.1), "cache_prompt": False}
        req = urllib.request.Request(self.state.upstream + "/completion", data=json.dumps(request).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            out = json.loads(resp.read())
        self._send(200, {"model": name, "created_at": datetime.now(timezone.utc).isoformat(),
                         "message": {"role": "assistant", "content": out["content"]}, "done": True,
                         "done_reason": "length" if out.get("stop_type") == "limit" else "stop",
                         "prompt_eval_count": out.get("tokens_evaluated"), "eval_count": out.get("tokens_predicted")})


@contextlib.contextmanager
def ollama_api_server(upstream: str | None = None, version: str = "0.33.0") -> Iterator[tuple[str, _State]]:
    """Serve the double on a free 127.0.0.1 port, playing Ollama `version`; yields (base URL, state)."""
    root = Path(tempfile.mkdtemp(prefix="ollama-api-double-"))
    state = _State(root, upstream, version)
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(root, ignore_errors=True)
