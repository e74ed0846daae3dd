"""The serving boundary: a llama-server off loopback needs an API key (read from a file, never on the command
line), slots and context are bounded, the health check restarts only after several failed probes and forgives
restarts after a healthy period, and the server dies with the process that started it."""

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import REPO
from tasks.llamacpp.serve import HealthPolicy, ManagedLlamaServer, ServerError, pid_alive
from tasks.recipe import DeployConfig

KEY = "sk-serve-7e3b1d5c9a"


def test_an_off_loopback_server_without_a_key_is_refused(tmp_path):
    with pytest.raises(ServerError, match="refusing to serve on 0.0.0.0: .* needs an API key"):
        ManagedLlamaServer(tmp_path / "m.gguf", tmp_path / "log", host="0.0.0.0")
    with pytest.raises(ValueError, match="host '0.0.0.0' is reachable from other machines.*api_key_block"):
        DeployConfig(host="0.0.0.0")
    assert DeployConfig(host="0.0.0.0", api_key_block="serving-key").api_key_block == "serving-key"
    assert DeployConfig(host="::1").host == "::1"   # loopback needs no key
    with pytest.raises(ServerError, match="parallel must be 1..64"):
        ManagedLlamaServer(tmp_path / "m.gguf", tmp_path / "log", parallel=500)
    with pytest.raises(ValueError):
        DeployConfig(parallel=65)


def test_restarts_only_after_several_failed_probes_and_the_budget_comes_back():
    policy = HealthPolicy(unhealthy_after=3, healthy_reset_s=60)
    assert [policy.observe(ok, t) for t, ok in enumerate([True, False, False, True, False, False])] == [False] * 6
    assert policy.observe(False, 6) is True   # the third failed probe in a row
    policy.restarted()
    assert not policy.budget_reset(10)
    policy.observe(True, 10)
    assert not policy.budget_reset(69) and policy.budget_reset(70)


def _get(url: str, key: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.integration
def test_the_key_reaches_the_server_by_file_only(tmp_path):
    from tasks.models.bootstrap import embedded_gguf_path

    server = ManagedLlamaServer(embedded_gguf_path(), tmp_path / "server.log", api_key=KEY, parallel=1)
    with server:
        argv = open(f"/proc/{server.process.pid}/cmdline", "rb").read().decode()
        assert KEY not in argv and "--api-key-file" in argv and KEY not in " ".join(server.command())
        assert not list(tmp_path.glob("**/api-key")) and server.key_file is None   # gone once it started
        assert _get(server.root_url + "/v1/chat/completions") == 401
        body = b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":1}'
        req = urllib.request.Request(server.base_url + "/chat/completions", data=body,
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200
    assert KEY not in (tmp_path / "server.log").read_text()


@pytest.mark.integration
def test_the_server_dies_with_the_process_that_started_it(tmp_path):
    """A flow process killed with SIGKILL cannot stop its server; the kernel does (PR_SET_PDEATHSIG)."""
    script = ("import sys, time\n"
              "from pathlib import Path\n"
              "from tasks.llamacpp.serve import ManagedLlamaServer\n"
              "from tasks.models.bootstrap import embedded_gguf_path\n"
              f"s = ManagedLlamaServer(embedded_gguf_path(), Path({str(tmp_path / 'log')!r}), parallel=1).start()\n"
              "print(s.process.pid, flush=True)\n"
              "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(parent.stdout.readline())
        assert pid_alive(server_pid)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 20
        while pid_alive(server_pid) and time.time() < deadline:
            time.sleep(0.2)
        assert not pid_alive(server_pid), "llama-server outlived the process that started it"
    finally:
        if parent.poll() is None:
            parent.kill()


@pytest.mark.integration
def test_each_server_binds_a_free_port_itself_and_keeps_it_across_a_restart(tmp_path):
    """No port is picked in advance (a window in which a concurrent run's server could take it): llama-server
    binds port 0, the manager reads the port from its log, and a restart asks for that same port."""
    import json

    from tasks.models.bootstrap import embedded_gguf_path

    servers = [ManagedLlamaServer(embedded_gguf_path(), tmp_path / f"{name}.log", alias=name, parallel=1)
               for name in ("one", "two")]
    assert [s.port for s in servers] == [0, 0]
    with servers[0], servers[1]:
        ports = [s.port for s in servers]
        assert 0 not in ports and ports[0] != ports[1]
        for server in servers:
            args = server.process.args
            assert args[args.index("--port") + 1] == "0"   # bound by llama-server, not chosen beforehand
            with urllib.request.urlopen(server.base_url + "/models", timeout=30) as resp:
                assert [m["id"] for m in json.load(resp)["data"]] == [server.alias]   # its own server answers
        servers[0].restart()
        args = servers[0].process.args
        assert servers[0].port == ports[0] and args[args.index("--port") + 1] == str(ports[0])
        assert _get(servers[0].root_url + "/health") == 200
