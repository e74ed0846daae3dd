"""A managed llama.cpp OpenAI-compatible server (`llama-server`) on loopback.

Picks a free port, waits for `/health`, keeps the server log in the run folder, and always stops the
process (terminate, then kill) when the block ends, also on errors.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tasks import llamacpp


class ServerError(RuntimeError):
    """The server did not come up; the message carries the tail of its log."""


@dataclass
class ServerHandle:
    base_url: str   # OpenAI base URL, ending in /v1
    model: str      # the alias to pass as `model`
    port: int
    log_path: Path
    process: subprocess.Popen


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    """Poll GET /health until 200; fail fast if the process exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"llama-server exited with {proc.returncode}:\n{_tail(log_path)}")
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.3)
    raise ServerError(f"llama-server not healthy after {timeout:.0f}s:\n{_tail(log_path)}")


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


@contextlib.contextmanager
def llama_server(model_path: Path, log_path: Path, alias: str = "slipway", host: str = "127.0.0.1",
                 port: int = 0, parallel: int = 2, ctx_size: int = 2048, lora_path: Path | None = None,
                 threads: int | None = None, startup_timeout: float = 120) -> Iterator[ServerHandle]:
    """Run llama-server for the duration of the block.

    Raises:
        ServerError: the server exited or did not become healthy in time.
    """
    port = port or free_port(host)
    cmd = [str(llamacpp.tool("llama-server")), "-m", str(model_path), "--host", host, "--port", str(port),
           "-a", alias, "-c", str(ctx_size * parallel), "-np", str(parallel),
           "-t", str(threads or os.cpu_count() or 2), "--jinja", "--no-webui"]
    if lora_path is not None:
        cmd += ["--lora", str(lora_path)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"http://{host}:{port}", proc, log_path, startup_timeout)
        yield ServerHandle(f"http://{host}:{port}/v1", alias, port, log_path, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
