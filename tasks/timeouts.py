"""Stage deadlines: every stage that waits on the outside world stops after the recipe's timeout and says
which stage timed out, after how long, and which recipe field sets the limit.

Subprocesses (training, the llama.cpp converter and quantizer) are killed at their deadline by the code that
started them; `stage_deadline` bounds the other stages (evaluation, export, deployment) from the thread
that runs them: an alarm interrupts the stage when it runs in the main thread (a flow run from the CLI or a
worker), otherwise the stage is failed as soon as it returns past its deadline. Single HTTP calls have their
own client timeouts (endpoint Blocks' `timeout_s`, `eval.request_timeout_s` for served models).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Iterator


class StageTimeout(TimeoutError):
    """A stage ran past its timeout; the message names the stage, the limit and the recipe field."""

    def __init__(self, stage: str, seconds: float, setting: str, detail: str = ""):
        self.stage, self.seconds, self.setting = stage, seconds, setting
        super().__init__(f"stage {stage!r} timed out after {seconds:g}s ({setting}: {seconds:g})"
                         + (f": {detail}" if detail else ""))


@contextlib.contextmanager
def stage_deadline(stage: str, seconds: float | None, setting: str) -> Iterator[None]:
    """Fail the block with `StageTimeout` once it has run `seconds` (None or 0: no limit).

    Raises:
        StageTimeout: the block ran past its deadline.
    """
    if not seconds:
        yield
        return
    if threading.current_thread() is not threading.main_thread() or signal.getitimer(signal.ITIMER_REAL)[0]:
        began = time.monotonic()   # no alarm here (another thread, or an alarm already set): check at the end
        yield
        if time.monotonic() - began > seconds:
            raise StageTimeout(stage, seconds, setting, "it finished late and its result is not used")
        return

    def on_alarm(signum, frame):
        raise StageTimeout(stage, seconds, setting)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
