"""training.engine 'together': a LoRA fine-tune on Together AI through the official `together` 3.x client,
leaving the run folder a local run leaves (lora/ with the adapter and the training tokenizer,
metrics/training-stats.json and loss-curve.png), so merge, export, evaluation, gates and deployment do not
care where training happened. flows/together_training.py wires these tasks:

    write_together_files   data/together-{train,val}.jsonl: the splits in Together's format, checked with
                           Slipway's own validator (tasks/data/formats.py) first: the client's is shallow
    upload_training_files  files.upload (the 302 handshake); a file Together already holds with the same
                           sha256 is reused (409 -> retrieve), never uploaded twice; remote/files.json
    submit_job             the price estimate, then fine_tuning.create with the recipe's settings; the job id
                           is in remote/job.json the moment it exists, so a re-run (resume_from) re-attaches
                           instead of paying for a second job
    wait_for_job           status and new events into the Prefect log and a progress artifact until the job
                           ends; a failed job fails the task with the remote error; a cancelled flow run
                           (or a timeout) cancels the remote job
    download_adapter       fine_tuning.content(checkpoint='adapter'): the .tar.zst (or .tar.gz) unpacked into
                           lora/ atomically, its adapter_config.json checked against the recipe (base model,
                           rank, alpha), the training tokenizer saved beside it; training stats with the
                           billed tokens and price

Retries, in two layers: each API call is retried by the client on 429 (after Retry-After), 5xx, timeouts
and dropped connections (CLIENT_RETRIES times, exponential backoff), every such retry forwarded into the
Prefect log as a warning; a call that still fails fails its task, which Prefect retries with backoff
(IO_RETRIES: visible as task-run retries in the UI). Anything else (a 400, a refused file, a failed job)
fails at once. A task makes several calls (create alone makes three), so per-call retries are what lets
a run through a 30% fault rate; the task retries cover an outage longer than one call's retries. The API key comes from a TogetherCredentials block or TOGETHER_API_KEY;
it is handed to the client and nowhere else (no log line, artifact or file carries it).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.tasks import exponential_backoff

from tasks.data.formats import Conversation, validate_file, write_record
from tasks.recipe import Recipe, TogetherConfig
from tasks.run import RunFolder, atomic_dir, atomic_write_json, atomic_write_jsonl, read_json, read_jsonl, stage_timer

TERMINAL_OK = "completed"
TERMINAL_FAILED = ("error", "user_error", "cancelled")
TOGETHER_DEFAULT_URL = "https://api.together.ai"


class RemoteTrainingError(RuntimeError):
    """The remote job failed, was cancelled, or produced an adapter that does not match the recipe."""


def _logger():
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("slipway.together")


# --- client ------------------------------------------------------------------------------------------------
def credentials(cfg: TogetherConfig) -> tuple[str, str]:
    """(api key, API root): the recipe's block, else TOGETHER_API_KEY / TOGETHER_BASE_URL.

    Raises:
        RemoteTrainingError: no key anywhere (the message says where to put one, never a key).
    """
    key, base_url = None, None
    if cfg.credentials_block:
        from blocks.together import TogetherCredentials

        block = TogetherCredentials.load(cfg.credentials_block)
        key, base_url = block.api_key.get_secret_value(), block.base_url
    key = key or os.environ.get("TOGETHER_API_KEY")
    if not key:
        raise RemoteTrainingError("no Together API key: save a TogetherCredentials block and name it in "
                                  "together.credentials_block, or set TOGETHER_API_KEY")
    return key, cfg.base_url or base_url or os.environ.get("TOGETHER_BASE_URL") or TOGETHER_DEFAULT_URL


CLIENT_RETRIES = 4


class _RetriesToRunLog(logging.Handler):
    """The client logs "Retrying request to /v1/... in 0.9 seconds" at INFO; show it in the Prefect log."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Retrying request"):
            _logger().warning("together client: %s (429/5xx/timeout)", record.getMessage())


_client_log = logging.getLogger("together._base_client")
if not any(isinstance(h, _RetriesToRunLog) for h in _client_log.handlers):
    _client_log.addHandler(_RetriesToRunLog())
    _client_log.setLevel(logging.INFO)


def make_client(cfg: TogetherConfig):
    """The official client; its per-call retries are logged into the Prefect log (above)."""
    from together import Together

    key, base_url = credentials(cfg)
    return Together(api_key=key, base_url=base_url, max_retries=CLIENT_RETRIES, timeout=120)


def is_transient(exc: BaseException) -> bool:
    """429, 5xx, timeouts and dropped connections: worth retrying. 4xx and remote job failures are not."""
    import httpx
    import together

    if isinstance(exc, (together.RateLimitError, together.InternalServerError, together.APITimeoutError,
                        together.APIConnectionError, httpx.TransportError)):
        return True
    return isinstance(exc, together.APIStatusError) and (exc.status_code == 429 or exc.status_code >= 500)


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry only what `is_transient` says."""
    try:
        state.result()
    except Exception as exc:   # noqa: BLE001  the state's own exception, re-raised to be classified
        return is_transient(exc)
    return False


IO_RETRIES = dict(retries=6, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5,
                  retry_condition_fn=retry_transient)


# --- tasks -------------------------------------------------------------------------------------------------
def to_together_rows(rows: list[dict]) -> list[dict]:
    """Chat rows as Together's conversational format: `messages` only (scorer fields dropped)."""
    return [write_record(Conversation(messages=r["messages"]), "together", where=f"row {i}")
            for i, r in enumerate(rows, start=1)]


@task(name="together-write-files")
def write_together_files(run_dir: Path, recipe: Recipe) -> dict[str, str]:
    """data/together-train.jsonl (and -val when evaluations are asked for), validated by Slipway's rules.

    Raises:
        tasks.data.formats.FormatError: a row Together would refuse, naming file, line and rule.
    """
    run = RunFolder(run_dir)
    out = {}
    for split in ("train", "val"):
        rows = read_jsonl(run.split(split))
        if split == "val" and (not rows or recipe.together.n_evals == 0):
            continue
        path = atomic_write_jsonl(run.split(f"together-{split}"), to_together_rows(rows))
        count = validate_file(path, "together")
        _logger().info("%s: %d rows pass Together's format rules", run.relative(path), count)
        out[split] = str(path)
    return out


def _upload(client, path: Path) -> tuple[dict, bool]:
    """Upload one file; a file Together already holds with the same sha256 is reused. (file, reused)."""
    from together.lib.resources.files import FileAlreadyExistsError

    try:
        f = client.files.upload(path, purpose="fine-tune", check=True, raise_if_already_exists=True)
        reused = False
    except FileAlreadyExistsError as exc:
        f, reused = client.files.retrieve(exc.file_id), True
    report = f.validation_report
    if f.processing_status in ("FAILED", "INVALID_FORMAT") or (report is not None and not report.valid):
        raise RemoteTrainingError(f"Together refused {path.name}: {report.error if report else f.processing_status}")
    return {"id": f.id, "filename": f.filename, "bytes": f.bytes, "status": f.processing_status}, reused


@task(name="together-upload", **IO_RETRIES)
def upload_training_files(run_dir: Path, recipe: Recipe, files: dict[str, str]) -> dict[str, dict]:
    """Upload the Together files (reusing same-checksum ones); remote/files.json; returns {split: file}."""
    run, logger = RunFolder(run_dir), _logger()
    client = make_client(recipe.together)
    uploaded = {}
    for split, path in files.items():
        info, reused = _upload(client, Path(path))
        logger.info("%s file %s (%d bytes) %s", split, info["id"], info["bytes"],
                    "already on Together (same sha256): reused" if reused else "uploaded")
        uploaded[split] = info | {"reused": reused}
    atomic_write_json(run.remote_files, uploaded)
    return uploaded


def create_params(recipe: Recipe, files: dict[str, dict]) -> dict:
    """fine_tuning.create keyword arguments from the recipe (whole epochs, LoRA, answers-only loss)."""
    t, lora, tg = recipe.training, recipe.lora, recipe.together
    return dict(training_file=files["train"]["id"], validation_file=files.get("val", {}).get("id", ""),
                model=tg.model, n_epochs=int(t.epochs), n_checkpoints=tg.n_checkpoints,
                n_evals=tg.n_evals if "val" in files else 0, batch_size=t.batch_size, learning_rate=t.learning_rate,
                lr_scheduler_type=t.lr_scheduler, warmup_ratio=t.warmup_ratio, max_seq_length=t.max_length,
                lora=True, lora_r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                lora_trainable_modules=",".join(lora.target_modules), train_on_inputs=tg.train_on_inputs,
                suffix=tg.suffix, random_seed=t.seed)


def _record_for_cancellation(run: RunFolder, job_id: str) -> None:
    """Point the flow runs (this subflow's and the finetune flow's) at the job, so an on_cancellation hook,
    which only sees the flow run, can find and cancel it (tasks/together/hooks.py)."""
    from prefect.context import FlowRunContext
    from prefect.runtime import flow_run
    from prefect.variables import Variable

    if FlowRunContext.get() is None:
        return
    try:
        ids = {flow_run.id, flow_run.root_flow_run_id} - {None}
        for flow_run_id in ids:
            Variable.set(f"together-job-{flow_run_id}", {"run_dir": str(run), "job_id": job_id}, overwrite=True)
    except Exception as exc:   # noqa: BLE001  best effort: the run folder keeps the id either way
        _logger().warning("could not record the job for cancellation hooks: %s", type(exc).__name__)


@task(name="together-submit", **IO_RETRIES)
def submit_job(run_dir: Path, recipe: Recipe, files: dict[str, dict]) -> dict:
    """The price estimate, then the job; or the job this run already created (remote/job.json)."""
    run, logger = RunFolder(run_dir), _logger()
    client = make_client(recipe.together)
    record = read_json(run.remote_job, missing_ok=True)
    if record:
        job = client.fine_tuning.retrieve(record["id"])
        logger.info("re-attached to %s (%s), created by an earlier attempt of this run", job.id, job.status)
        _record_for_cancellation(run, job.id)
        return record
    params = create_params(recipe, files)
    estimate = client.fine_tuning.estimate_price(
        training_file=params["training_file"], model=params["model"], n_epochs=params["n_epochs"],
        n_evals=params["n_evals"], **({"validation_file": params["validation_file"]} if params["validation_file"]
                                      else {}))
    price = estimate.model_dump()
    if price.get("estimation_available"):
        logger.info("Together's estimate: $%.4f for %s training tokens (allowed to proceed: %s)",
                    price.get("estimated_total_price") or 0, price.get("estimated_train_token_count"),
                    price.get("allowed_to_proceed"))
        if price.get("allowed_to_proceed") is False:
            raise RemoteTrainingError(f"Together says the account cannot pay for this job (estimate "
                                      f"${price.get('estimated_total_price')}, limit ${price.get('user_limit')})")
    intent = read_json(run.remote_intent, missing_ok=True)
    job = _adopt_lost_job(client, intent, params) if intent else None
    if job is None:
        atomic_write_json(run.remote_intent, {"training_file": params["training_file"], "model": params["model"],
                                              "suffix": params["suffix"], "at": time.time()})
        job = client.fine_tuning.create(**params)
    record = {"id": job.id, "model": params["model"], "output_name": getattr(job, "output_name", None),
              "created_at": datetime.now(timezone.utc).isoformat(), "estimate": price,
              "params": {k: v for k, v in params.items() if k not in ("training_file", "validation_file")}}
    atomic_write_json(run.remote_job, record)
    logger.info("created Together job %s on %s", job.id, params["model"])
    _record_for_cancellation(run, job.id)
    return record


def _adopt_lost_job(client, intent: dict, params: dict):
    """A create whose answer was lost (timeout after the server acted) left a job: find it instead of
    creating a second one. Matches training file, model and suffix, created after the intent."""
    for job in client.fine_tuning.list().data:
        created = job.created_at.timestamp() if job.created_at else 0
        if (_field(job, "training_file") == intent["training_file"] and job.model == intent["model"]
                and _field(job, "suffix") == intent["suffix"] and created >= intent["at"] - 5):
            _logger().info("adopted %s: created by an earlier attempt whose answer was lost", job.id)
            return job
    return None


def _field(obj, name: str):
    """A response field the client's type may or may not declare (newer API fields arrive as extras)."""
    value = getattr(obj, name, None)
    return value if value is not None else (getattr(obj, "model_extra", None) or {}).get(name)


def _job_error(job, events: list) -> str:
    extra = getattr(job, "model_extra", None) or {}
    errors = [e.message for e in events if e.type == "job_error" or getattr(e, "level", None) == "error"]
    return extra.get("error") or (errors[-1] if errors else f"job ended {job.status}")


def cancel_job(recipe: Recipe, job_id: str) -> str:
    """Ask Together to cancel the job; returns its status afterwards."""
    client = make_client(recipe.together)
    return client.fine_tuning.cancel(job_id).status


def _iso(value) -> str | None:
    """A timestamp field as ISO text, whether the client parsed it into a datetime or kept the string."""
    return value.isoformat() if isinstance(value, datetime) else value


def _pause(seconds: float) -> None:
    """The wait between polls (where a stop signal usually lands)."""
    time.sleep(seconds)


_EVENTS_LOGGED: dict[str, int] = {}   # per job: events already in the log (a retried wait does not repeat them)


def _poll(client, recipe: Recipe, job_id: str, logger, progress_id, deadline: float) -> dict:
    """Read status and events every together.poll_seconds until the job ends; the finished job's facts."""
    while True:
        job = client.fine_tuning.retrieve(job_id)
        events = client.fine_tuning.list_events(job_id).data
        for event in events[_EVENTS_LOGGED.get(job_id, 0):]:
            logger.info("[together %s] %s: %s", job_id, event.type, event.message)
        _EVENTS_LOGGED[job_id] = len(events)
        total, done = _field(job, "total_steps"), _field(job, "steps_completed")
        if progress_id and total:
            update_progress_artifact(artifact_id=progress_id, progress=min(100.0, 100.0 * (done or 0) / total))
        if job.status == TERMINAL_OK:
            if progress_id:
                update_progress_artifact(artifact_id=progress_id, progress=100.0)
            return {"id": job_id, "status": job.status, "token_count": job.token_count,
                    "output_name": job.x_model_output_name, "created_at": _iso(job.created_at),
                    "updated_at": _iso(_field(job, "updated_at")), "total_price": _field(job, "total_price"),
                    "steps": done or total}
        if job.status in TERMINAL_FAILED:
            raise RemoteTrainingError(f"Together job {job_id} {job.status}: {_job_error(job, events)}")
        if time.time() > deadline:
            cancel_job(recipe, job_id)
            raise RemoteTrainingError(f"Together job {job_id} still {job.status} after "
                                      f"{recipe.together.timeout_minutes:g} minutes: cancelled it")
        _pause(recipe.together.poll_seconds)


# Names of what Prefect raises in a flow run that is being stopped (a worker's SIGTERM, a cancelled run).
_STOP_SIGNALS = ("TerminationSignal", "CancelledError", "Abort", "KeyboardInterrupt", "SystemExit")


@task(name="together-wait", **IO_RETRIES)
def wait_for_job(run_dir: Path, recipe: Recipe, job_record: dict) -> dict:
    """Poll the job until it ends: new events into the log, progress into an artifact.

    Raises:
        RemoteTrainingError: the job failed (with Together's error message) or was cancelled, or it
            ran past together.timeout_minutes (then it is cancelled first).
    """
    run, logger, cfg = RunFolder(run_dir), _logger(), recipe.together
    client = make_client(cfg)
    job_id = job_record["id"]
    from prefect.context import TaskRunContext

    progress_id = (create_progress_artifact(progress=0.0, description=f"Together job {job_id}")
                   if TaskRunContext.get() else None)   # called as a plain function (tests): no artifact
    deadline = time.time() + cfg.timeout_minutes * 60
    try:
        with stage_timer(run, "train-remote"):
            return _poll(client, recipe, job_id, logger, progress_id, deadline)
    except BaseException as exc:
        if type(exc).__name__ in _STOP_SIGNALS:   # the flow run is being stopped: stop paying for the job
            logger.warning("stopping (%s): cancelling Together job %s", type(exc).__name__, job_id)
            cancel_job(recipe, job_id)
        raise


def _members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Regular files only, flattened to their base names (archives put the adapter at the top or in one folder)."""
    out = []
    for m in tar.getmembers():
        if m.isfile() and not m.name.startswith("/") and ".." not in Path(m.name).parts:
            out.append(m)
    return out


def unpack_adapter(archive: Path, dest: Path) -> list[str]:
    """Unpack a .tar.zst (or .tar.gz / .tar) into `dest`, files flattened to their names."""
    data = archive.read_bytes()
    if data[:4] == b"\x28\xb5\x2f\xfd":   # zstd frame magic
        import zstandard

        data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    names = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for member in _members(tar):
            name = Path(member.name).name
            (dest / name).write_bytes(tar.extractfile(member).read())
            names.append(name)
    return names


def check_adapter(adapter_dir: Path, recipe: Recipe) -> dict:
    """adapter_config.json must name the recipe's Together base model, rank and alpha.

    Raises:
        RemoteTrainingError: a missing file or a mismatch, naming both values.
    """
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.exists() or not any(adapter_dir.glob("adapter_model.*")):
        raise RemoteTrainingError(f"the downloaded archive has no adapter_config.json + adapter_model.*: "
                                  f"{sorted(p.name for p in adapter_dir.iterdir())}")
    config = json.loads(config_path.read_text())
    want = {"base_model_name_or_path": recipe.together.model, "r": recipe.lora.r, "lora_alpha": recipe.lora.alpha}
    wrong = {k: (config.get(k), v) for k, v in want.items() if config.get(k) != v}
    if wrong:
        raise RemoteTrainingError("the downloaded adapter does not match the recipe: " + "; ".join(
            f"{k} is {got!r}, the recipe says {exp!r}" for k, (got, exp) in wrong.items()))
    return config


@task(name="together-download", **IO_RETRIES)
def download_adapter(run_dir: Path, recipe: Recipe, base_dir: Path, job: dict) -> dict:
    """Download, unpack and check the adapter into lora/ (atomically, with the training tokenizer); write
    metrics/training-stats.json and loss-curve.png from the job's metrics; returns the training stats."""
    from tasks.train.worker import plot_loss, prepare_tokenizer
    from transformers import AutoTokenizer

    run, logger = RunFolder(run_dir), _logger()
    client = make_client(recipe.together)
    with stage_timer(run, "download-adapter"):
        response = client.fine_tuning.content(ft_id=job["id"], checkpoint="adapter")
        suffix = ".tar.gz" if "x-tar" in (response.headers.get("content-type") or "").lower() else ".tar.zst"
        archive = run.remote_archive(f"adapter{suffix}")
        part = archive.with_name(archive.name + ".part")
        part.parent.mkdir(parents=True, exist_ok=True)
        response.write_to_file(part)
        os.replace(part, archive)
        with atomic_dir(run.lora_dir) as tmp:
            names = unpack_adapter(archive, tmp)
            config = check_adapter(tmp, recipe)
            # The adapter's tokenizer is the base's with the recipe's chat template, as a local run saves it.
            prepare_tokenizer(AutoTokenizer.from_pretrained(base_dir), recipe.model).save_pretrained(tmp)
        logger.info("adapter %s (%d bytes): %s; rank %s on %s", run.relative(archive), archive.stat().st_size,
                    ", ".join(names), config.get("r"), config.get("base_model_name_or_path"))
    metrics = client.fine_tuning.list_metrics(job["id"]).metrics or []
    history = [{"step": int(m["global_step"]), "loss": m["train_loss"]} for m in metrics if "train_loss" in m]
    history += [{"step": int(m["global_step"]), "eval_loss": m["eval_loss"]} for m in metrics if "eval_loss" in m]
    losses = [h["loss"] for h in history if "loss" in h]
    record = read_json(run.remote_job)
    seconds = None
    if job.get("created_at") and job.get("updated_at"):
        seconds = round((datetime.fromisoformat(job["updated_at"]) - datetime.fromisoformat(job["created_at"]))
                        .total_seconds(), 1)
    price = job.get("total_price")
    stats = {"engine": "together", "train_rows": len(read_jsonl(run.split("train"))), "steps": job.get("steps"),
             "epochs": recipe.training.epochs, "seconds": seconds, "train_loss": None,
             "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
             "eval_loss": next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h), None),
             "tokens_seen": job.get("token_count"), "device": "together", "history": history,
             "remote": {"job_id": job["id"], "model": recipe.together.model, "output_name": job.get("output_name"),
                        "estimate": record.get("estimate"), "billed_tokens": job.get("token_count"),
                        "total_price": price,   # as the API reports it (an integer; its unit is not documented)
                        "wall_seconds": seconds}}
    atomic_write_json(run.training_stats, stats)
    if history:
        plot_loss(history, run.loss_curve)
    return stats
