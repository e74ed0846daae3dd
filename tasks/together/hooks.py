"""Flow-run state hooks for remote training: a cancelled flow run cancels the Together job it created.

A worker that cancels a flow run kills its process and then runs the flow's on_cancellation hooks, which
see only the flow run. The engine's submit task left a Prefect Variable `together-job-<flow run id>` (for
the finetune flow run and the remote-training subflow run) pointing at the run folder; the job id and
recipe are read back from there.
"""

from __future__ import annotations

import logging

from tasks.recipe import Recipe
from tasks.run import RunFolder, read_json

log = logging.getLogger("slipway.together")


def cancel_remote_job(flow, flow_run, state) -> None:
    """on_cancellation hook: cancel the flow run's Together job, if it created one."""
    from prefect.variables import Variable

    from tasks.together.engine import cancel_job

    pointer = Variable.get(f"together-job-{flow_run.id}", default=None)
    if not pointer:
        return
    run = RunFolder(pointer["run_dir"])
    recipe = Recipe.model_validate_json(run.recipe_json.read_text())
    job = read_json(run.remote_job, missing_ok=True) or {"id": pointer["job_id"]}
    status = cancel_job(recipe, job["id"])
    log.warning("flow run %s cancelled: Together job %s is now %s", flow_run.id, job["id"], status)
