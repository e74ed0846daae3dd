"""llama-server's thread count follows the CPUs the process may use, not the machine's count."""

import os
import subprocess
import sys

import pytest

from tasks.recipe import REPO_ROOT


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity (Linux)")
def test_server_threads_follow_a_narrowed_cpu_set(tmp_path):
    # A child pinned to one CPU (as `taskset -c 0` would): its server command asks for one thread.
    code = ("import os; from pathlib import Path; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from tasks.llamacpp.serve import ManagedLlamaServer, usable_cpus; "
            "s = ManagedLlamaServer(Path('m.gguf'), Path('log'), 'm', port=0); cmd = s.command(); "
            "print(usable_cpus(), cmd[cmd.index('-t') + 1])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "1"]
