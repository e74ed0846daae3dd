"""The prompt Ollama builds for /api/chat, as the Ollama API test double (tests/ollama_api_server.py) gets
it: NOT from tasks.ollama (the code under test) but from Go's own text/template driven as Ollama drives
it (tests/ollama/gorender/main.go). Renders are precomputed in tests/ollama/vectors/double-renders.jsonl
(so the suite needs no Go); where Go is installed, a render missing from the file is made live.
"""

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent / "ollama"
RENDERER = HERE / "gorender" / "main.go"
RENDERS = HERE / "vectors" / "double-renders.jsonl"


def render_key(template: str, messages: list[dict], system: str | None, tools: list | None = None,
               think: bool | str | None = None) -> str:
    chat = [{k: m[k] for k in ("role", "content", "tool_name", "tool_calls", "tool_call_id", "thinking") if m.get(k)}
            for m in messages]
    extra = [{"tools": tools, "think": think}] if tools is not None or think is not None else []
    return hashlib.sha256(json.dumps([template, system or "", chat, *extra], sort_keys=True).encode()).hexdigest()


def go_render(cases: list[dict]) -> list[dict]:
    """Render {"template", "messages", "system"[, "tools", "think"]} cases with Go; each answer has "output"
    or "error"."""
    proc = subprocess.run(["go", "run", str(RENDERER)], input="".join(json.dumps(c) + "\n" for c in cases),
                          capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"go run {RENDERER} failed:\n{proc.stderr[-2000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines()]


def reference_prompt(template: str, messages: list[dict], system: str | None, tools: list | None = None,
                     think: bool | str | None = None) -> str:
    """Ollama's prompt for this chat (and the request's `tools` and `think`).

    Raises:
        LookupError: no precomputed render and no Go to make one (the message says how to add it).
        ValueError: Ollama would refuse the template (the Go error).
    """
    key = render_key(template, messages, system, tools, think)
    known = {}
    if RENDERS.exists():
        known = {r["key"]: r for r in map(json.loads, RENDERS.read_text().splitlines())}
    row = known.get(key)
    if row is None:
        if not shutil.which("go"):
            raise LookupError(f"no reference render {key[:12]} for this template/chat in {RENDERS} and no Go "
                              "to make one: run `python tests/ollama/vectors/make_vectors.py` where Go is installed")
        row = go_render([{"template": template, "messages": messages, "system": system or "", "tools": tools,
                          "think": think}])[0]
    if "error" in row:
        raise ValueError(row["error"])
    return row["output"]
