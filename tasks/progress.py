"""Progress a person can see in the Prefect UI: one progress artifact per long stage, updated in place.

    bar = ProgressBar("training", run.name, total=40)   # key training-<run>, 0 %
    bar.update(12, "step 12/40 · loss 1.93 · 410 tok/s · ETA 2m 10s")
    bar.finish("40 steps · final loss 0.71")

Updates may come from any thread (an endpoint runner reports from its pool): the bar keeps the API client
of the thread that made it, so workers without Prefect's context still reach the same API. Updates are
throttled (at most one API call per `min_interval_s`, and the last one always goes through),
so a stage that reports every row does not flood the API. Outside a flow or task run (a worker process,
a notebook, a unit test) the bar does nothing: progress then lives in the log lines and status files the
stages already write.
"""

from __future__ import annotations

import logging
import threading
import time
from uuid import UUID

from tasks.names import artifact_key

log = logging.getLogger("slipway.progress")


def in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


class ProgressBar:
    """A Prefect progress artifact (`<stage>-<run>` key) for `total` units of work."""

    def __init__(self, stage: str, run_name: str, total: int, description: str = "",
                 min_interval_s: float = 2.0):
        self.stage, self.total, self.min_interval_s = stage, max(int(total), 1), min_interval_s
        self.key = artifact_key(stage, run_name)
        self.id: UUID | None = None
        self._last = 0.0
        self._lock = threading.Lock()
        self._client = None
        if in_prefect_run():
            from prefect.artifacts import create_progress_artifact
            from prefect.client.orchestration import get_client

            self.id = create_progress_artifact(progress=0.0, key=self.key, description=description or stage)
            self._client = get_client(sync_client=True).__enter__()

    def update(self, done: int, description: str | None = None, force: bool = False) -> None:
        """Set the bar to done/total (clamped) with a one-line description."""
        if self._client is None:
            return
        from prefect.client.schemas.actions import ArtifactUpdate

        with self._lock:
            now = time.monotonic()
            if not force and done < self.total and now - self._last < self.min_interval_s:
                return
            self._last = now
            progress = round(100.0 * min(max(done, 0), self.total) / self.total, 2)
            try:
                self._client.update_artifact(artifact_id=self.id, artifact=ArtifactUpdate(
                    data=progress, **({"description": description} if description else {})))
            except Exception as exc:   # progress is for people; a hiccup of the API must not fail the stage
                log.warning("progress artifact %s not updated: %s", self.key, exc)

    def finish(self, description: str | None = None) -> None:
        """Set the bar to 100 % and release its API client."""
        self.update(self.total, description, force=True)
        self.close()

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.__exit__(None, None, None)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
