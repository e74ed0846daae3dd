"""The run folder: one class that owns every path of a run, plus atomic writes.

Every run writes into its own folder `runs/<recipe>-<timestamp>/`; a file appears under its final name
only when complete (write to a temp name, fsync, rename), and `COMPLETE` is written last, so a crashed
run never looks complete. No other module joins a path inside a run folder by string: they ask
`RunFolder` (tests/run/test_run_paths.py greps for it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Literal

RUN_SUBDIRS = ("data", "checkpoints", "lora", "merged", "gguf", "metrics")
COMPLETE_MARKER = "COMPLETE"
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


@dataclass(frozen=True)
class RunFolder(Folder):
    """Where each artifact of one run lives. Paths only: it creates sub-folders, never files."""

    @property
    def name(self) -> str:
        return self.root.name

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
    def training_stats(self) -> Path:
        return self.metrics_dir / "training-stats.json"

    @property
    def mask_check(self) -> Path:
        return self.metrics_dir / "mask-check.json"

    @property
    def loss_curve(self) -> Path:
        return self.metrics_dir / "loss-curve.png"

    @property
    def train_log(self) -> Path:
        return self.metrics_dir / "train.log"

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


def new_run_dir(output_root: str | Path, recipe_name: str, run_name: str | None = None) -> Path:
    """Create an isolated run folder with the standard sub-folders; never reuse an existing one."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = Path(output_root) / (run_name or f"{recipe_name}-{stamp}")
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    for sub in RUN_SUBDIRS:
        run_dir.joinpath(sub).mkdir(parents=True)
    return run_dir


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
