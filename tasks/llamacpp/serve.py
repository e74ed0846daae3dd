"""A managed llama.cpp OpenAI-compatible server (`llama-server`) on loopback.

`ManagedLlamaServer` picks a free port (or takes the configured one), waits for `/health`, keeps the
server log in the run folder, restarts a server that died or stopped answering, and stops it cleanly
(terminate, then kill). `llama_server(...)` is the same as a `with` block for evaluations.

Run one in the foreground, restarted if it crashes, until Ctrl-C / SIGTERM (`serve_run`, `stop_run`):
    python -m tasks.llamacpp.serve run RUN_DIR            # serves what RUN_DIR/deploy/Modelfile deploys
    python -m tasks.llamacpp.serve stop RUN_DIR           # stops a server left running by deploy.keep_running
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tasks.llamacpp import build as llamacpp
from tasks.ollama.modelfile import Modelfile, deployed_artifact
from tasks.run import RunFolder, atomic_write_json


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


def get_ok(url: str, timeout: float = 2) -> bool:
    """True when a GET of `url` answers 200 within `timeout`; any connection trouble is False."""
    with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    return False


def wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    """Poll GET /health until 200; fail fast if the process exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"llama-server exited with {proc.returncode}:\n{_tail(log_path)}")
        if get_ok(url + "/health"):
            return
        time.sleep(0.3)
    raise ServerError(f"llama-server not healthy after {timeout:.0f}s:\n{_tail(log_path)}")


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


class ManagedLlamaServer:
    """One llama-server process for one model (plus an optional LoRA GGUF).

    The port is chosen once (free_port when 0) and kept across restarts, so clients keep their URL.
    """

    def __init__(self, model_path: Path, log_path: Path, alias: str = "slipway", host: str = "127.0.0.1",
                 port: int = 0, parallel: int = 2, ctx_size: int = 2048, lora_path: Path | None = None,
                 threads: int | None = None, startup_timeout: float = 120, max_restarts: int = 3):
        self.model_path, self.lora_path, self.log_path = Path(model_path), lora_path, Path(log_path)
        self.alias, self.host, self.port = alias, host, port or free_port(host)
        self.parallel, self.ctx_size, self.threads = parallel, ctx_size, threads
        self.startup_timeout, self.max_restarts = startup_timeout, max_restarts
        self.process: subprocess.Popen | None = None
        self.restarts = 0

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root_url + "/v1"

    def command(self) -> list[str]:
        cmd = [str(llamacpp.tool("llama-server")), "-m", str(self.model_path), "--host", self.host,
               "--port", str(self.port), "-a", self.alias, "-c", str(self.ctx_size * self.parallel),
               "-np", str(self.parallel), "-t", str(self.threads or os.cpu_count() or 2), "--jinja", "--no-webui"]
        if self.lora_path is not None:
            cmd += ["--lora", str(self.lora_path)]
        return cmd

    def start(self) -> "ManagedLlamaServer":
        """Spawn the server and wait for /health.

        Raises:
            ServerError: it exited or was not healthy within startup_timeout (log tail included).
        """
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            # Own session: a Ctrl-C in the terminal reaches us, and we stop the server deliberately.
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        try:
            wait_healthy(self.root_url, self.process, self.log_path, self.startup_timeout)
        except ServerError:
            self.stop()
            raise
        return self

    def healthy(self) -> bool:
        return self.process is not None and self.process.poll() is None and get_ok(self.root_url + "/health")

    def stop(self, timeout: float = 15) -> None:
        """Terminate, then kill after `timeout`; a no-op when not running."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> "ManagedLlamaServer":
        """Stop (if running) and start again on the same port.

        Raises:
            ServerError: more than max_restarts restarts, or the new process does not come up.
        """
        if self.restarts >= self.max_restarts:
            raise ServerError(f"llama-server restarted {self.restarts} times already; giving up:\n{_tail(self.log_path)}")
        self.restarts += 1
        self.stop()
        return self.start()

    def ensure_running(self) -> bool:
        """Restart the server if it died or stopped answering /health; True if it was restarted."""
        if self.healthy():
            return False
        self.restart()
        return True

    def handle(self) -> ServerHandle:
        return ServerHandle(self.base_url, self.alias, self.port, self.log_path, self.process)

    def __enter__(self) -> "ManagedLlamaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def llama_server(model_path: Path, log_path: Path, alias: str = "slipway", host: str = "127.0.0.1",
                 port: int = 0, parallel: int = 2, ctx_size: int = 2048, lora_path: Path | None = None,
                 threads: int | None = None, startup_timeout: float = 120) -> Iterator[ServerHandle]:
    """Run llama-server for the duration of the block; always stopped when the block ends.

    Raises:
        ServerError: the server exited or did not become healthy in time.
    """
    server = ManagedLlamaServer(model_path, log_path, alias, host, port, parallel, ctx_size, lora_path, threads,
                                startup_timeout)
    server.start()
    try:
        yield server.handle()
    finally:
        server.stop()


def serve_forever(server: ManagedLlamaServer, check_every: float = 5.0) -> None:
    """Run until SIGINT/SIGTERM, restarting the server when it dies; then stop it cleanly."""
    stopping = {"flag": False}

    def on_signal(signum, frame):
        stopping["flag"] = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    server.start()
    print(f"llama-server serving {server.model_path.name} at {server.base_url} (model {server.alias!r})", flush=True)
    try:
        while not stopping["flag"]:
            time.sleep(min(check_every, 0.5))
            if server.ensure_running():
                print(f"llama-server restarted ({server.restarts})", flush=True)
    finally:
        server.stop()
        print("llama-server stopped", flush=True)


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (exited, waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def stop_recorded(record_path: Path) -> bool:
    """Stop the server a deployment left running (deploy/llamacpp.json); only that pid, only if it is llama-server."""
    record = json.loads(record_path.read_text())
    pid = record.get("pid")
    if not pid or not record.get("running"):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except FileNotFoundError:
        cmdline = ""
    if Path(cmdline).name == "llama-server" and pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        for _ in range(75):
            if not pid_alive(pid):
                break
            time.sleep(0.2)
        else:
            os.kill(pid, signal.SIGKILL)
    record["running"] = False
    atomic_write_json(record_path, record)
    return True


def serve_run(run_dir: RunFolder | Path, host: str = "127.0.0.1", port: int = 0, parallel: int = 2) -> None:
    """Serve what the run's deploy/Modelfile deploys until Ctrl-C / SIGTERM, restarting a crashed server;
    the log goes to deploy/llama-server.log.

    Raises:
        ModelfileError: the Modelfile names no local GGUF to serve.
        ServerError: the server did not come up, or crashed more than its restart budget.
    """
    run = RunFolder(run_dir)
    model, lora = deployed_artifact(run, Modelfile.read(run.modelfile))
    serve_forever(ManagedLlamaServer(model, run.deploy_server_log, alias=run.name, host=host, port=port,
                                     parallel=parallel, lora_path=lora))


def stop_run(run_dir: RunFolder | Path) -> bool:
    """Stop the server the run's llama.cpp deployment left running; False when none is recorded as running."""
    return stop_recorded(RunFolder(run_dir).deploy_target_record("llamacpp"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a run's deployed GGUF with llama.cpp.")
    parser.add_argument("command", choices=["run", "stop"])
    parser.add_argument("run_dir", type=RunFolder)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command == "stop":
        print("stopped" if stop_run(args.run_dir) else "no running server recorded")
    else:
        serve_run(args.run_dir, args.host, args.port, args.parallel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
