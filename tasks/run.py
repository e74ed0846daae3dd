"""The run folder: one class that owns every path of a run, plus atomic writes.

Every run writes into its own folder `runs/<recipe>-<timestamp>/`; a file appears under its final name
only when complete (write to a temp name, fsync, rename), and `COMPLETE` is written last, so a crashed
run never looks complete. No other module joins a path inside a run folder by string: they ask
`RunFolder` (tests/run/test_run_paths.py greps for it).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from tasks.names import check_slug

RUN_SUBDIRS = ("data", "checkpoints", "lora", "merged", "gguf", "metrics")
COMPLETE_MARKER = "COMPLETE"
# Inside a dequantized QLoRA base (RunFolder.quantized_base_dir): {"base": the 16-bit folder it came from}.
DEQUANTIZED_FROM = "dequantized-from.json"
Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class Folder:
    """A folder whose paths one class names. `os.fspath(folder)` and `Path(folder)` give the folder itself,
    so it goes wherever a path did, and `Folder(folder)` accepts a path or another folder."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def __fspath__(self) -> str:
        return str(self.root)

    def __str__(self) -> str:
        return str(self.root)

    @property
    def name(self) -> str:
        return self.root.name


@dataclass(frozen=True)
class RunFolder(Folder):
    """Where each artifact of one run lives. Paths only: it creates sub-folders, never files."""

    # --- the run as a whole -------------------------------------------------------------------------
    @property
    def recipe_json(self) -> Path:
        """The fully resolved recipe the run used (what the training process reads)."""
        return self.root / "recipe.json"

    @property
    def complete_marker(self) -> Path:
        return self.root / COMPLETE_MARKER

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def attempts(self) -> Path:
        """attempts.jsonl: one line per flow run that worked in this folder (the first, then each resume)."""
        return self.root / "attempts.jsonl"

    @property
    def stages_dir(self) -> Path:
        return self.root / "stages"

    def stage_record(self, stage: str) -> Path:
        """stages/<stage>.json: written when a stage completed, with what it returned; a resumed run
        skips the stages that have one."""
        return self.stages_dir / f"{stage}.json"

    # --- data ---------------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def split(self, name: str) -> Path:
        """data/{train,val,test}.jsonl (and any other named row file of the run, e.g. an eval file's rows)."""
        return self.data_dir / f"{name}.jsonl"

    @property
    def data_stats(self) -> Path:
        return self.data_dir / "stats.json"

    # --- training -----------------------------------------------------------------------------------
    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def lora_dir(self) -> Path:
        """The PEFT adapter and the training tokenizer."""
        return self.root / "lora"

    @property
    def quantized_base_dir(self) -> Path:
        """QLoRA only: the base as the adapter was trained on it (its 4-bit weights dequantized), which merge
        and the adapter's GGUF use instead of the 16-bit base (tasks/train/worker.py writes it)."""
        return self.root / "lora-base"

    @staticmethod
    def dequantized_from(base_dir: Path) -> Path | None:
        """The 16-bit base a dequantized QLoRA base (`quantized_base_dir`) was made from, or None for any
        other folder: the adapter's config names that original, and the adapter applies to both."""
        marker = Path(base_dir) / DEQUANTIZED_FROM
        return Path(json.loads(marker.read_text())["base"]) if marker.is_file() else None

    def adapter_base(self, base_dir: Path) -> Path:
        """The base the adapter applies to: the dequantized 4-bit base after QLoRA, else `base_dir`."""
        return self.quantized_base_dir if self.quantized_base_dir.is_dir() else Path(base_dir)

    @property
    def training_stats(self) -> Path:
        return self.metrics_dir / "training-stats.json"

    @property
    def training_budget(self) -> Path:
        """What training.time_budget_s decided (kept so a resumed run trains the same rows)."""
        return self.metrics_dir / "training-budget.json"

    @property
    def mask_check(self) -> Path:
        return self.metrics_dir / "mask-check.json"

    @property
    def loss_curve(self) -> Path:
        return self.metrics_dir / "loss-curve.png"

    @property
    def training_status(self) -> Path:
        """metrics/training-status.json: step, loss, ETA ... while training runs (tasks/train/status.py)."""
        return self.metrics_dir / "training-status.json"

    @property
    def train_log(self) -> Path:
        return self.metrics_dir / "train.log"

    @property
    def devices(self) -> Path:
        """What the run's process saw: CUDA_VISIBLE_DEVICES (its work pool's), the GPUs torch counts, the host."""
        return self.metrics_dir / "devices.json"

    # --- remote training (training.engine: together) ------------------------------------------------
    @property
    def remote_dir(self) -> Path:
        """remote/: what a remote engine created (job.json, files.json, the downloaded adapter archive)."""
        return self.root / "remote"

    @property
    def remote_job(self) -> Path:
        """remote/job.json: the remote job's id, written the moment it exists, so a re-run re-attaches."""
        return self.remote_dir / "job.json"

    @property
    def remote_files(self) -> Path:
        return self.remote_dir / "files.json"

    @property
    def remote_intent(self) -> Path:
        """remote/intent.json: a job is about to be created (adopted, not duplicated, if the answer was lost)."""
        return self.remote_dir / "intent.json"

    def remote_archive(self, name: str) -> Path:
        return self.remote_dir / name

    # --- export ---------------------------------------------------------------------------------------
    @property
    def merged_dir(self) -> Path:
        return self.root / "merged"

    @property
    def gguf_dir(self) -> Path:
        return self.root / "gguf"

    def gguf(self, kind: str) -> Path:
        """gguf/model-{f16,q8_0,q4_k_m,...}.gguf: the merged model in one GGUF type."""
        return self.gguf_dir / f"model-{kind}.gguf"

    @property
    def lora_gguf(self) -> Path:
        return self.gguf_dir / "lora-f16.gguf"

    @property
    def base_gguf(self) -> Path:
        """The base model the LoRA GGUF applies to (the no-merge ADAPTER deployment)."""
        return self.gguf_dir / "base-f16.gguf"

    @property
    def lora_merged_gguf(self) -> Path:
        """The LoRA GGUF merged into the base GGUF by llama-export-lora (for an Ollama that refuses ADAPTER)."""
        return self.gguf_dir / "model-lora-merged-f16.gguf"

    @property
    def gguf_manifest(self) -> Path:
        return self.gguf_dir / "manifest.json"

    # --- evaluation -------------------------------------------------------------------------------------
    @property
    def metrics_dir(self) -> Path:
        return self.root / "metrics"

    @property
    def eval_summary(self) -> Path:
        """metrics/eval.json: every model's summary."""
        return self.metrics_dir / "eval.json"

    def eval_metrics(self, label: str) -> Path:
        return self.metrics_dir / f"eval-{label}.json"

    def predictions(self, label: str) -> Path:
        return self.metrics_dir / f"predictions-{label}.jsonl"

    @property
    def answer_grammar(self) -> Path:
        """The task's GBNF answer grammar every llama-server of the run starts with (deploy.constrain_output)."""
        return self.root / "answer-grammar.gbnf"

    def server_log(self, label: str) -> Path:
        """The log of the llama-server that served `label` during evaluation."""
        return self.metrics_dir / f"llama-server-{label}.log"

    @property
    def eval_chart(self) -> Path:
        return self.metrics_dir / "eval-chart.png"

    @property
    def timings(self) -> Path:
        return self.metrics_dir / "timings.json"

    @property
    def parity(self) -> Path:
        return self.metrics_dir / "parity.json"

    @property
    def template_check(self) -> Path:
        return self.metrics_dir / "template-check.json"

    @property
    def verify_results(self) -> Path:
        """metrics/verify.json: each verify prompt asked of the deployed endpoint, pass/fail."""
        return self.metrics_dir / "verify.json"

    @property
    def decision(self) -> Path:
        return self.metrics_dir / "decision.json"

    # --- deployment and release ---------------------------------------------------------------------------
    @property
    def deploy_dir(self) -> Path:
        return self.root / "deploy"

    @property
    def modelfile(self) -> Path:
        return self.deploy_dir / "Modelfile"

    @property
    def deploy_record(self) -> Path:
        """deploy/deploy.json: what was deployed where (or why not)."""
        return self.deploy_dir / "deploy.json"

    def deploy_target_record(self, target: str) -> Path:
        """deploy/{llamacpp,ollama}.json: the target's own record (pid, command, model digest ...)."""
        return self.deploy_dir / f"{target}.json"

    @property
    def deploy_server_log(self) -> Path:
        return self.deploy_dir / "llama-server.log"

    @property
    def release_dir(self) -> Path:
        return self.root / "release"

    @property
    def release_model_dir(self) -> Path:
        return self.release_dir / "model"

    @property
    def release_dataset_dir(self) -> Path:
        return self.release_dir / "dataset"

    @property
    def publish_record(self) -> Path:
        return self.release_dir / "publish.json"

    @property
    def modelfile_record(self) -> Path:
        """deploy/modelfile.json: the Modelfile's mode, FROM, ADAPTER and stop tokens."""
        return self.deploy_dir / "modelfile.json"

    def deployed(self, modelfile_path: str | Path) -> Path:
        """A Modelfile FROM/ADAPTER path (written relative to deploy/) made absolute."""
        return (self.deploy_dir / modelfile_path).resolve()

    def relative_to_deploy(self, path: str | Path) -> str:
        """How the Modelfile in deploy/ names a file of the run: `../gguf/model-q8_0.gguf`."""
        return os.path.relpath(path, self.deploy_dir)

    def resolve(self, relative: str | Path) -> Path:
        """A path recorded relative to the run folder (manifests, Modelfile FROM lines) made absolute."""
        return self.root / relative

    def relative(self, path: str | Path) -> str:
        return str(Path(path).relative_to(self.root))

    def is_complete(self) -> bool:
        return self.complete_marker.exists()


def slipway_home() -> Path:
    """Where cached artifacts (the converted base model, llama.cpp tools) live across runs."""
    home = Path(os.environ.get("SLIPWAY_HOME", Path.home() / ".cache" / "slipway"))
    home.mkdir(parents=True, exist_ok=True)
    return home


def cache_lock(entry: str | Path, timeout: float = 3600):
    """A lock across processes for one entry of the shared cache (a model folder, the llama.cpp tools):
    whoever builds or replaces the entry holds it, and whoever checks whether the entry is ready takes it
    too, so a concurrent run waits for a build instead of reading a half-replaced folder.
    The lock file sits beside the entry (`.<name>.lock`) and is never deleted: deleting it would let two
    processes hold two different locks. `timeout` seconds: a build that long is stuck; fail loudly."""
    from filelock import FileLock   # a dependency of huggingface_hub: on every machine that trains

    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(entry.with_name(f".{entry.name}.lock"), timeout=timeout)


def rotate_log(path: str | Path) -> Path | None:
    """Keep an earlier attempt's log: `train.log` becomes `train.1.log` (then `.2`, ...) before a new
    attempt writes `train.log` afresh. Returns where the old log went (None when there was none)."""
    path = Path(path)
    if not path.exists():
        return None
    n = 1
    while (kept := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    os.replace(path, kept)
    return kept


def record_attempt(run: RunFolder, flow_run_id: str | None, resumed: bool) -> None:
    """Note which flow run works in this folder (the CLI finds a failed run's folder by it)."""
    rows = read_jsonl(run.attempts, missing_ok=True)
    rows.append({"attempt": len(rows) + 1, "flow_run_id": flow_run_id, "resumed": resumed,
                 "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    atomic_write_jsonl(run.attempts, rows)


def find_run_of_flow_run(output_root: str | Path, flow_run_id: str) -> RunFolder | None:
    """The run folder under `output_root` that the flow run `flow_run_id` claimed or resumed."""
    for attempts in sorted(Path(output_root).glob("*/attempts.jsonl")):
        if any(row.get("flow_run_id") == flow_run_id for row in read_jsonl(attempts)):
            return RunFolder(attempts.parent)
    return None


def utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def claim_dir(parent: str | Path, name: str, unique: bool = True) -> Path:
    """Create `parent/name` and return it, atomically: `mkdir` without `exist_ok` lets exactly one
    process win a name, so two runs started in the same second never share a folder.

    Args:
        unique: on a taken name, claim `name-2`, `name-3`, ... instead of refusing.

    Raises:
        FileExistsError: the name is taken and `unique` is False.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    candidate, n = parent / name, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            if not unique:
                raise FileExistsError(f"{candidate} exists: choose another name (a run never reuses a "
                                      "folder; an unfinished run is continued with --resume)") from None
            n += 1
            candidate = parent / f"{name}-{n}"


def new_run_dir(output_root: str | Path, recipe_name: str, run_name: str | None = None) -> Path:
    """Claim an isolated run folder with the standard sub-folders; never reuse an existing one.

    Without `run_name` it is `<recipe>-<UTC time>` (`-2`, `-3`, ... when another run claimed that second);
    a `run_name` that is taken is refused.

    Raises:
        FileExistsError: `run_name` names an existing folder.
        InvalidName: the run name is not a slug (so `../../x` never leaves output_root).
    """
    check_slug("run name", run_name or recipe_name)
    run_dir = claim_dir(output_root, run_name or f"{recipe_name}-{utc_stamp()}", unique=run_name is None)
    for sub in RUN_SUBDIRS:
        run_dir.joinpath(sub).mkdir()
    return run_dir


def new_synth_dir(output_root: str | Path) -> Path:
    """Claim a fresh `synth-<UTC time>` folder (`-2`, ... when another synthesis claimed that second)."""
    return claim_dir(output_root, f"synth-{utc_stamp()}")


def atomic_write_text(path: Path, text: str) -> Path:
    """Write text so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def read_jsonl(path: str | Path, missing_ok: bool = False) -> list[dict]:
    """Every non-blank line of a JSONL file the project wrote itself (user files go through
    tasks.data.rows.read_json_lines, which names the bad line)."""
    path = Path(path)
    if missing_ok and not path.exists():
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_json(path: str | Path, missing_ok: bool = False):
    """A JSON file the project wrote itself; None when it is missing and `missing_ok`."""
    path = Path(path)
    if missing_ok and not path.exists():
        return None
    return json.loads(path.read_text())


def atomic_write_json(path: Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_jsonl(path: Path, rows) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a unique temp name beside `path` for a tool to write (a converter's --outfile); renamed to
    `path` only if the block succeeds, removed otherwise. Unique, so two processes writing the same
    shared file never write into one temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temp folder beside `target`; rename it to `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def mark_complete(run_dir: Path | RunFolder, summary: dict) -> None:
    """Written last: its presence means every stage finished (gates may still have failed)."""
    atomic_write_json(RunFolder(Path(run_dir)).complete_marker, summary)


def is_complete(run_dir: Path | RunFolder) -> bool:
    return RunFolder(Path(run_dir)).is_complete()


@contextlib.contextmanager
def stage_timer(run_dir: Path | RunFolder, stage: str) -> Iterator[None]:
    """Record how long a stage took in metrics/timings.json (the report's timing table)."""
    start = time.time()
    status = "failed"
    try:
        yield
        status = "ok"
    finally:
        path = RunFolder(Path(run_dir)).timings
        timings = json.loads(path.read_text()) if path.exists() else {}
        timings[stage] = {"seconds": round(time.time() - start, 1), "status": status}
        atomic_write_json(path, timings)


def _to_record(value: Any) -> Any:
    """A stage's result as JSON: paths tagged so they come back as paths."""
    if isinstance(value, Path):
        return {"__path__": str(value)}
    if isinstance(value, dict):
        return {k: _to_record(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_record(v) for v in value]
    return value


def _from_record(value: Any) -> Any:
    if isinstance(value, dict):
        return Path(value["__path__"]) if set(value) == {"__path__"} else {k: _from_record(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_record(v) for v in value]
    return value


def completed_stage(run_dir: Path | RunFolder, stage: str) -> dict | None:
    """The record of a stage that completed in this run folder (None when it has not)."""
    return read_json(RunFolder(Path(run_dir)).stage_record(stage), missing_ok=True)


def resumable_stage(stage: str | Callable[[dict], str]):
    """Make a stage function (one with a `run_dir` argument) run once per run folder: when it returns,
    its result is recorded in stages/<stage>.json; when that record exists (a resumed run), the function
    is not run again and the recorded result is returned. `stage` is the name, or a function of the
    call's arguments that gives it (one task measuring several models: `eval-<label>`).
    Put it under `@task`, so Prefect still sees the function's own signature."""
    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run_once(*args, **kwargs):
            arguments = signature.bind(*args, **kwargs).arguments
            run = RunFolder(Path(arguments["run_dir"]))
            name = stage(arguments) if callable(stage) else stage
            if (record := completed_stage(run, name)) is not None:
                # print: a Prefect task's prints go to its run log (log_prints), and this module has no Prefect
                print(f"stage {name}: completed by an earlier attempt at {record['completed_at']}; skipped")
                return _from_record(record["result"])
            result = fn(*args, **kwargs)
            atomic_write_json(run.stage_record(name), {
                "stage": name, "completed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "result": _to_record(result)})
            return result

        return run_once

    return decorate


@dataclass(frozen=True)
class SynthFolder(Folder):
    """Where each file of one synthesis run lives (`runs/synth-<time>/`, written by tasks/synth/report.py):
    a second kind of run folder, with the same rule that no other module joins its paths by string."""

    @property
    def records(self) -> Path:
        """ShareGPT rows shaped like data/slipstream-tqt.jsonl (what a recipe's data.source can name)."""
        return self.root / "synthetic.jsonl"

    @property
    def ledger(self) -> Path:
        """One line per requested record: kept, repaired or dropped, and why."""
        return self.root / "ledger.jsonl"

    @property
    def responses(self) -> Path:
        """Each batch's raw answer (or error), tokens and retries."""
        return self.root / "responses.jsonl"

    @property
    def report_json(self) -> Path:
        return self.root / "synthesis-report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "synthesis-report.md"

    @property
    def complete_marker(self) -> Path:
        return self.root / COMPLETE_MARKER


@dataclass(frozen=True)
class TracksFolder(Folder):
    """One run of the tracks flow (`runs/tracks-<layout>-<time>/`): a finetune run folder per track inside
    it (each a RunFolder), and the report that compares them."""

    def track_run(self, run_name: str) -> Path:
        """The finetune run folder of one track (the finetune flow's `output_root` is this folder)."""
        return self.root / run_name

    @property
    def report_json(self) -> Path:
        return self.root / "tracks-report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "tracks-report.md"
