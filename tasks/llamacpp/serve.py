"""A managed llama.cpp OpenAI-compatible server (`llama-server`), on loopback unless told otherwise.

`ManagedLlamaServer` takes the configured port or lets llama-server bind a free one itself (`--port 0`, the
port read back from its log: no port is picked in advance, so a concurrent run's server cannot take it
first), waits for `/health`, keeps the server log in the run folder, restarts a server that died or
stopped answering, and stops it cleanly (terminate, then kill). `llama_server(...)` is the same as a
`with` block for evaluations.

The serving boundary:
  * bound to anything but loopback, the server requires an API key (a Prefect `Secret` block named by
    deploy.api_key_block); the key reaches llama-server through `--api-key-file` (a 0600 file in a private
    temp folder that exists only while the server starts), never on the command line, in deploy.json or a log;
  * `parallel` (slots) and the context per slot are bounded (MAX_PARALLEL, MAX_CTX_SIZE);
  * the health check restarts a server only after `unhealthy_after` failed probes in a row (or at once
    when the process died), and the restart budget is given back after `healthy_reset_s` of health;
  * the server dies with the process that started it (PR_SET_PDEATHSIG), so a killed flow leaves no
    orphan; only a deployment with deploy.keep_running outlives its flow, on purpose.
  * with deploy.constrain_output, every generation follows the task type's GBNF answer grammar
    (`--grammar-file`, the run folder's copy written by `answer_grammar`): the deployed server and every
    llama.cpp evaluation of the run answer under the same rule.

Run one in the foreground, restarted if it crashes, until Ctrl-C / SIGTERM (`serve_run`, `stop_run`):
    python -m tasks.llamacpp.serve run RUN_DIR            # serves what RUN_DIR/deploy/Modelfile deploys
    python -m tasks.llamacpp.serve stop RUN_DIR           # stops a server left running by deploy.keep_running
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from tasks.llamacpp import build as llamacpp
from tasks.ollama.modelfile import Modelfile, deployed_artifact
from tasks.recipe import DeployConfig, Recipe, RecipeError, is_loopback
from tasks.run import RunFolder, atomic_write_json, atomic_write_text
from tasks.tasktypes import task_type

MAX_PARALLEL = 64
MAX_CTX_SIZE = 131072
PR_SET_PDEATHSIG = 1


class ServerError(RuntimeError):
    """The server did not come up; the message carries the tail of its log."""


@dataclass
class ServerHandle:
    base_url: str   # OpenAI base URL, ending in /v1
    model: str      # the alias to pass as `model`
    port: int
    log_path: Path
    process: subprocess.Popen


_LISTENING = re.compile(r"listening on https?://\S+:(\d+)\s*$", re.MULTILINE)


def wait_bound_port(proc: subprocess.Popen, log_path: Path, offset: int, timeout: float) -> int:
    """The port a llama-server started with `--port 0` bound, from its `listening on http://host:port` log
    line (written after `offset`, where this start's output begins); fail fast if the process exits.

    Raises:
        ServerError: the process exited, or named no port within `timeout`.
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(log_path, "rb") as log:
            log.seek(offset)
            found = _LISTENING.search(log.read().decode(errors="replace"))
        if found:
            return int(found.group(1))
        if proc.poll() is not None:
            raise ServerError(f"llama-server exited with {proc.returncode}:\n{_tail(log_path)}")
        time.sleep(0.1)
    raise ServerError(f"llama-server named no listening port after {timeout:.0f}s:\n{_tail(log_path)}")


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


def die_with_parent() -> Callable[[], None]:
    """A `preexec_fn` that makes the child receive SIGTERM when the thread that started it exits (Linux
    PR_SET_PDEATHSIG), and exit at once if that parent is already gone."""
    parent = os.getpid()
    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl   # loaded here: the child only calls it

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:   # the parent died before prctl took effect
            os._exit(1)

    return preexec


@dataclass
class HealthPolicy:
    """When to restart: after `unhealthy_after` failed probes in a row (a busy server may miss one), and
    the restart count is forgiven once the server has been healthy for `healthy_reset_s`."""

    unhealthy_after: int = 3
    healthy_reset_s: float = 300.0
    failures: int = 0
    healthy_since: float | None = None

    def observe(self, ok: bool, now: float) -> bool:
        """Record one probe; True when the server should be restarted now."""
        if ok:
            self.failures = 0
            self.healthy_since = self.healthy_since if self.healthy_since is not None else now
            return False
        self.failures += 1
        self.healthy_since = None
        return self.failures >= self.unhealthy_after

    def budget_reset(self, now: float) -> bool:
        """True when the server has been healthy long enough to forgive earlier restarts."""
        return self.healthy_since is not None and now - self.healthy_since >= self.healthy_reset_s

    def restarted(self) -> None:
        self.failures, self.healthy_since = 0, None


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


def usable_cpus() -> int:
    """CPUs this process may run on (a `taskset` or cgroup cpuset narrows them; os.cpu_count() does not see
    that): several runs sharing a host each give their servers only their own cores, as llama.cpp threads
    spin-wait and slow to a crawl when more of them than cores share a machine."""
    try:
        return len(os.sched_getaffinity(0)) or 2
    except AttributeError:   # no sched_getaffinity (macOS)
        return os.cpu_count() or 2


class ManagedLlamaServer:
    """One llama-server process for one model (plus an optional LoRA GGUF).

    Port 0: llama-server binds a free one at the first start (so two runs never race for a port picked
    in advance); that port is then kept across restarts, so clients keep their URL.
    """

    def __init__(self, model_path: Path, log_path: Path, alias: str = "slipway", host: str = "127.0.0.1",
                 port: int = 0, parallel: int = 2, ctx_size: int = 2048, lora_path: Path | None = None,
                 threads: int | None = None, startup_timeout: float = 120, max_restarts: int = 3,
                 api_key: str | None = None, outlive_parent: bool = False, health: HealthPolicy | None = None,
                 grammar_file: Path | None = None):
        """
        Raises:
            ServerError: a non-loopback host without an API key, or parallel / ctx_size out of bounds.
        """
        if not is_loopback(host) and not api_key:
            raise ServerError(f"refusing to serve on {host}: a llama-server reachable from other machines needs "
                              "an API key (deploy.api_key_block)")
        if not 1 <= parallel <= MAX_PARALLEL or not 256 <= ctx_size <= MAX_CTX_SIZE:
            raise ServerError(f"parallel must be 1..{MAX_PARALLEL} and ctx_size 256..{MAX_CTX_SIZE} "
                              f"(got {parallel}, {ctx_size})")
        self.model_path, self.lora_path, self.log_path = Path(model_path), lora_path, Path(log_path)
        self.grammar_file = grammar_file   # every generation constrained to it (deploy.constrain_output)
        self.alias, self.host, self.port = alias, host, port   # 0 until the first start binds one
        self.parallel, self.ctx_size, self.threads = parallel, ctx_size, threads
        self.startup_timeout, self.max_restarts = startup_timeout, max_restarts
        self._api_key, self.outlive_parent = api_key, outlive_parent
        self.health = health or HealthPolicy()
        self._key_dir: Path | None = None
        self.process: subprocess.Popen | None = None
        self.restarts = 0

    @property
    def key_file(self) -> Path | None:
        return self._key_dir / "api-key" if self._key_dir else None

    def _write_key_file(self) -> None:
        """The key in a 0600 file in a 0700 folder of our own (read by llama-server at start)."""
        if self._api_key is None or self._key_dir is not None:
            return
        self._key_dir = Path(tempfile.mkdtemp(prefix="slipway-llama-key-"))
        fd = os.open(self._key_dir / "api-key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self._api_key + "\n")

    def _remove_key_file(self) -> None:
        if self._key_dir is not None:
            shutil.rmtree(self._key_dir, ignore_errors=True)
            self._key_dir = None

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root_url + "/v1"

    def command(self) -> list[str]:
        cmd = [str(llamacpp.tool("llama-server")), "-m", str(self.model_path), "--host", self.host,
               "--port", str(self.port), "-a", self.alias, "-c", str(self.ctx_size * self.parallel),
               "-np", str(self.parallel), "-t", str(self.threads or usable_cpus()), "--jinja", "--no-webui"]
        if self.lora_path is not None:
            cmd += ["--lora", str(self.lora_path)]
        if self.grammar_file is not None:
            cmd += ["--grammar-file", str(self.grammar_file)]
        if self._api_key is not None:   # the file exists only while the server starts (see start)
            cmd += ["--api-key-file", str(self.key_file or "<removed after start>")]
        return cmd

    def start(self) -> "ManagedLlamaServer":
        """Spawn the server and wait for /health.

        Raises:
            ServerError: it exited or was not healthy within startup_timeout (log tail included).
        """
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._write_key_file()
        with open(self.log_path, "a") as log:
            offset = log.tell()   # where this start's output begins (a restart appends to the same log)
            # Own session: a Ctrl-C in the terminal reaches us, and we stop the server deliberately; and
            # it dies with us unless it is meant to outlive the flow (deploy.keep_running).
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True,
                                            preexec_fn=None if self.outlive_parent else die_with_parent())
        try:
            if not self.port:
                self.port = wait_bound_port(self.process, self.log_path, offset, self.startup_timeout)
            wait_healthy(self.root_url, self.process, self.log_path, self.startup_timeout)
        except ServerError:
            self.stop()
            raise
        finally:
            self._remove_key_file()   # llama-server has read it; a restart writes it again
        return self

    def healthy(self) -> bool:
        return self.process is not None and self.process.poll() is None and get_ok(self.root_url + "/health")

    def stop(self, timeout: float = 15) -> None:
        """Terminate, then kill after `timeout`, and remove the key file; a no-op when not running."""
        proc, self.process = self.process, None
        try:
            if proc is None or proc.poll() is not None:
                return
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        finally:
            self._remove_key_file()

    def restart(self) -> "ManagedLlamaServer":
        """Stop (if running) and start again on the same port.

        Raises:
            ServerError: more than max_restarts restarts, or the new process does not come up.
        """
        if self.restarts >= self.max_restarts:
            raise ServerError(f"llama-server restarted {self.restarts} times already; giving up:\n{_tail(self.log_path)}")
        self.restarts += 1
        self.stop()
        self.health.restarted()
        return self.start()

    def ensure_running(self) -> bool:
        """Restart the server if it died or stopped answering /health; True if it was restarted (the eval
        path: its calls already failed, so one probe decides)."""
        if self.healthy():
            return False
        self.restart()
        return True

    def check(self, now: float | None = None) -> bool:
        """One health probe of a long-running server (serve_forever): restart a dead process at once, an
        unanswering one after `health.unhealthy_after` failed probes in a row; give the restart budget back
        after `health.healthy_reset_s` of health. True when it restarted the server."""
        now = time.monotonic() if now is None else now
        dead = self.process is None or self.process.poll() is not None
        ok = not dead and get_ok(self.root_url + "/health")
        if self.health.observe(ok, now) or dead:
            self.restart()
            return True
        if self.restarts and self.health.budget_reset(now):
            self.restarts = 0
        return False

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


def answer_grammar(run_dir: RunFolder | Path, deploy: DeployConfig, task: str) -> Path | None:
    """deploy.constrain_output: the task type's GBNF grammar, written (atomically, the same text every time)
    to the run folder for `llama-server --grammar-file`; None when the run serves unconstrained.

    Raises:
        RecipeError: constrain_output for a task type without a grammar (check_recipe refuses it earlier).
    """
    if not deploy.constrain_output:
        return None
    grammar = task_type(task).grammar
    if grammar is None:
        raise RecipeError(f"deploy.constrain_output: task {task!r} has no answer grammar")
    path = RunFolder(run_dir).answer_grammar
    text = grammar()
    if not path.exists() or path.read_text() != text:
        atomic_write_text(path, text)
    return path


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
        next_check = time.monotonic() + check_every
        while not stopping["flag"]:
            time.sleep(0.5)
            if time.monotonic() < next_check:
                continue
            next_check = time.monotonic() + check_every
            if server.check():
                print(f"llama-server restarted ({server.restarts}/{server.max_restarts})", flush=True)
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
    recipe = Recipe.model_validate_json(run.recipe_json.read_text())
    deploy = recipe.deploy
    serve_forever(ManagedLlamaServer(model, run.deploy_server_log, alias=run.name, host=host, port=port,
                                     parallel=parallel, ctx_size=deploy.ctx_size, lora_path=lora,
                                     api_key=load_api_key(deploy.api_key_block),
                                     grammar_file=answer_grammar(run, deploy, recipe.task)))


def load_api_key(block_name: str | None) -> str | None:
    """The serving API key from a Prefect `Secret` block (None: no key)."""
    if not block_name:
        return None
    from prefect.blocks.system import Secret

    return str(Secret.load(block_name).get())


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
