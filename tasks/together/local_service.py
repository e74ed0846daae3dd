"""A local Together-compatible fine-tuning service: the REST API the official `together` 3.x client speaks,
over real HTTP, that really trains, by running Slipway's local training worker on the uploaded file.

    python -m tasks.together.local_service --port 8765 [--fault-rate 0.3] [--fail-jobs] [--slow-s 2]
    TOGETHER_API_KEY=anything TOGETHER_BASE_URL=http://127.0.0.1:8765 slipway run gerbil-local

It is how CI exercises the remote engine (tasks/together/engine.py) and how a user tries the Gerbil recipe
offline. It does not import the engine it is used to test; what it implements comes from the client's
source (together 3.1.1: resources/files.py, lib/resources/files.py, resources/fine_tuning.py, types/):

  POST /v1/files                      multipart form (purpose, file_name, file_type, checksum): 302 with
                                      `Location` (the upload URL) and `X-Together-File-Id`; 409
                                      {"file_id"} when a file with that sha256 and purpose is stored
  PUT  /upload/<file-id>              the raw bytes; 200 only when their sha256 is the announced checksum
  POST /v1/files/<id>/preprocess      validates the JSONL (one format per file, chat turns), FileResponse
  GET  /v1/files, /v1/files/<id>, /v1/files/<id>/content, DELETE /v1/files/<id>
  GET  /v1/fine-tunes/models/limits?model_name=    limits of the models it can train (--model NAME=HF_DIR)
  POST /v1/fine-tunes/estimate-price  token count of the training file x epochs x --usd-per-mtok
  POST /v1/fine-tunes                 creates a job and trains it in the background: pending -> queued ->
                                      running -> compressing -> uploading -> completed (or error, cancelled)
  GET  /v1/fine-tunes, /v1/fine-tunes/<id>, /<id>/events, /<id>/checkpoints, /<id>/metrics
  POST /v1/fine-tunes/<id>/cancel     stops the training process; the job ends `cancelled`
  GET  /v1/finetune/download?ft_id=&checkpoint=adapter   the adapter as a .tar.zst archive (as the real
                                      API answers; the client names it .tar.zst unless the type is x-tar)

Every /v1 call needs `Authorization: Bearer <key>` (with --api-key, that key). Fault injection, seeded:
--fault-rate F answers that share of /v1 calls with 429 (Retry-After) or 500 before doing anything;
--slow-s S delays that share of answers by S seconds; --queue-s keeps each job queued that long;
--fail-jobs makes every job fail remotely after
training starts, with an error event and the error in the job, as a real job that hits a bad row does.
What it does not reproduce: multipart uploads over 5 GB, DPO, full fine-tuning, merged checkpoints,
W&B, billing beyond the estimate, and the real cluster's queueing.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from tasks.recipe import LoraConfig, ModelConfig, Recipe, TrainingConfig
from tasks.run import RunFolder, atomic_write_json, atomic_write_text, new_run_dir

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TERMINAL = ("completed", "error", "cancelled", "user_error")
_STEP = re.compile(r"^\[train\] step (\d+)/(\d+) (.*)$")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _error(message: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind}}


def _estimate_tokens(data: bytes) -> int:
    """Roughly 4 characters a token, as price estimates go; the job reports the real count when done."""
    return max(1, len(data.decode("utf-8", "replace")) // 4)


def check_jsonl(data: bytes) -> tuple[bool, str | None, int, str | None]:
    """The server-side validation a preprocess runs: (valid, format, lines, error)."""
    formats, n = set(), 0
    for i, line in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
        if not line.strip():
            continue
        n += 1
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            return False, None, n, f"line {i}: not JSON"
        if not isinstance(obj, dict):
            return False, None, n, f"line {i}: not an object"
        if "messages" in obj:
            if set(obj) - {"messages", "tools"}:
                return False, None, n, f"line {i}: unexpected keys {sorted(set(obj) - {'messages', 'tools'})}"
            roles = [m.get("role") for m in obj["messages"] if isinstance(m, dict)]
            if len(roles) != len(obj["messages"]) or "assistant" not in roles:
                return False, None, n, f"line {i}: messages need role/content and one assistant turn"
            formats.add("CONVERSATION")
        elif set(obj) == {"prompt", "completion"}:
            formats.add("INSTRUCTION")
        elif set(obj) == {"text"}:
            formats.add("GENERAL")
        else:
            return False, None, n, f"line {i}: unknown format with keys {sorted(obj)}"
    if len(formats) > 1:
        return False, None, n, f"mixed formats {sorted(formats)}"
    if not n:
        return False, None, 0, "no samples"
    return True, formats.pop(), n, None


class Service:
    """All state of one service: files, jobs, fault switches. Thread-safe."""

    def __init__(self, root: Path, models: dict[str, Path], *, api_key: str | None = None, fault_rate: float = 0.0,
                 slow_s: float = 0.0, fail_jobs: bool = False, seed: int = 0, usd_per_mtok: float = 0.5,
                 max_steps: int = -1, queue_s: float = 0.2):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.models, self.api_key = models, api_key
        self.fault_rate, self.slow_s, self.fail_jobs = fault_rate, slow_s, fail_jobs
        self.rng = random.Random(seed)
        self.usd_per_mtok, self.max_steps, self.queue_s = usd_per_mtok, max_steps, queue_s
        self.files: dict[str, dict] = {}
        self.jobs: dict[str, dict] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.RLock()
        self.faults = {"429": 0, "500": 0, "slow": 0}
        self.base_url = ""

    # --- files ---------------------------------------------------------------------------------------
    def file_blob(self, file_id: str) -> Path:
        return self.root / "files" / f"{file_id}.bin"

    def file_json(self, f: dict) -> dict:
        out = {k: f[k] for k in ("id", "bytes", "created_at", "filename", "purpose", "processing_status")}
        out |= {"object": "file", "FileType": f["file_type"]}
        if f.get("validation_report"):
            out["validation_report"] = f["validation_report"]
        return out

    # --- jobs ----------------------------------------------------------------------------------------
    def event(self, job: dict, kind: str, message: str, level: str = "info", **extra) -> None:
        job["events"].append({"object": "fine-tune-event", "created_at": _now(), "type": kind, "message": message,
                              "level": level, **extra})
        job["updated_at"] = _now()

    def job_json(self, job: dict) -> dict:
        return {k: v for k, v in job.items() if not k.startswith("_")}

    def start_job(self, job: dict) -> None:
        threading.Thread(target=self._train, args=(job,), daemon=True, name=f"train-{job['id']}").start()

    def _set(self, job: dict, status: str) -> bool:
        """Move a job on unless it was cancelled meanwhile; False when it was."""
        with self.lock:
            if job["status"] in ("cancel_requested", "cancelled"):
                return False
            job["status"] = status
            job["updated_at"] = _now()
            return True

    def _train(self, job: dict) -> None:
        try:
            self._run_training(job)
        except Exception as exc:   # a bug here must end the job visibly, not hang the client
            with self.lock:
                job["status"] = "error"
                job["error"] = f"internal error: {exc}"
                self.event(job, "job_error", f"Job failed: internal error: {exc}", level="error")

    def _run_training(self, job: dict) -> None:
        time.sleep(0.2)
        if not self._set(job, "queued"):
            return self._finish_cancel(job)
        self.event(job, "job_pending", "Fine-tune job queued")
        queued_until = time.time() + self.queue_s   # a cluster's queue: a cancel may arrive meanwhile
        while time.time() < queued_until and job["status"] == "queued":
            time.sleep(0.1)
        if not self._set(job, "running"):
            return self._finish_cancel(job)
        job["started_at"] = _now()
        self.event(job, "job_start", "Fine-tune job started")
        base_dir = self.models[job["model"]]
        self.event(job, "model_downloading", f"Downloading model {job['model']}")
        self.event(job, "model_download_complete", "Model downloaded")
        run = RunFolder(new_run_dir(self.root / "jobs", job["id"]))
        job["_run"] = str(run)
        self.event(job, "training_data_downloading", "Downloading training data")
        train_rows = self.file_blob(job["training_file"]).read_bytes()
        atomic_write_text(run.split("train"), train_rows.decode("utf-8"))
        val = job.get("validation_file")
        atomic_write_text(run.split("val"), self.file_blob(val).read_text() if val else "")
        self.event(job, "training_data_download_complete", "Training data downloaded")
        lora = job["training_type"]
        method = job.get("training_method") or {}
        if method.get("train_on_inputs") is True:
            self.event(job, "warning", "train_on_inputs=true is trained as answers-only here (the local worker "
                       "masks the prompt)", level="warning")
        recipe = Recipe(
            name=job["id"], task="slipstream", model=ModelConfig(source="hf", name=str(base_dir)),
            lora=LoraConfig(r=lora["lora_r"], alpha=int(lora["lora_alpha"]), dropout=lora.get("lora_dropout") or 0.0,
                            target_modules=self._targets(lora.get("lora_trainable_modules"))),
            training=TrainingConfig(engine="trl", epochs=job["n_epochs"], max_steps=self.max_steps,
                                    learning_rate=job["learning_rate"],
                                    lr_scheduler=job["lr_scheduler"]["lr_scheduler_type"],
                                    warmup_ratio=job["warmup_ratio"],
                                    batch_size=job["batch_size"] if isinstance(job["batch_size"], int) else 8,
                                    max_length=job.get("max_seq_length") or 512, seed=job.get("random_seed") or 42,
                                    save_steps=10_000, logging_steps=1, mixed_precision="no"))
        atomic_write_text(run.recipe_json, recipe.model_dump_json(indent=2))
        cmd = [sys.executable, "-m", "tasks.train.worker", str(run), "--base", str(base_dir)]
        self.event(job, "training_start", "Training started")
        with self.lock:
            if job["status"] != "running":
                return self._finish_cancel(job)
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    cwd=Path(__file__).resolve().parents[2])
            self.procs[job["id"]] = proc
        tail: list[str] = []
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-20:]
            m = _STEP.match(line.strip())
            if not m:
                continue
            step, total = int(m.group(1)), int(m.group(2))
            fields = dict(kv.split("=", 1) for kv in m.group(3).split() if "=" in kv)
            job["total_steps"], job["steps_completed"] = total, step
            if "loss" in fields:
                job["_metrics"].append({"global_step": float(step), "train_loss": float(fields["loss"]),
                                        "learning_rate": float(fields.get("learning_rate", "nan"))})
                if step == total:
                    self.event(job, "checkpoint_save", f"Checkpoint saved at step {step}", step=step,
                               total_steps=total)
            if self.fail_jobs and step >= 1:
                proc.terminate()
                proc.wait()
                with self.lock:
                    job["status"] = "error"
                    job["error"] = ("Training failed at step %d: CUDA error: an illegal memory access was "
                                    "encountered (injected remote failure)" % step)
                    self.event(job, "job_error", job["error"], level="error")
                return
        code = proc.wait()
        with self.lock:
            self.procs.pop(job["id"], None)
            if job["status"] in ("cancel_requested", "cancelled"):
                return self._finish_cancel(job)
            if code != 0:
                job["status"] = "error"
                job["error"] = f"training process exited {code}: " + " | ".join(tail[-3:])
                self.event(job, "job_error", job["error"], level="error")
                return
        stats = json.loads(run.training_stats.read_text())
        job["token_count"] = stats["mask"]["tokens"] * int(job["n_epochs"])
        job["epochs_completed"] = job["n_epochs"]
        self.event(job, "epoch_complete", f"Epoch completed, at step {stats['steps']}", step=stats["steps"])
        self.event(job, "training_complete", "Training completed", token_count=job["token_count"])
        if not self._set(job, "compressing"):
            return self._finish_cancel(job)
        self.event(job, "model_compressing", "Compressing adapter")
        job["_archive"] = str(self._archive(job, run))
        self.event(job, "model_compression_complete", "Adapter compressed")
        if not self._set(job, "uploading"):
            return self._finish_cancel(job)
        self.event(job, "model_uploading", "Uploading adapter")
        self.event(job, "model_upload_complete", "Adapter uploaded", model_path=job["model_output_name"])
        job["total_price"] = int(round(job["token_count"] / 1e6 * self.usd_per_mtok * 1e9))  # nano-dollars
        self._set(job, "completed")
        self.event(job, "job_complete", f"Job finished; {job['token_count']} tokens trained",
                   token_count=job["token_count"])

    def _finish_cancel(self, job: dict) -> None:
        with self.lock:
            if job["status"] != "cancelled":
                job["status"] = "cancelled"
                self.event(job, "job_stopped", "Job cancelled by the user")

    @staticmethod
    def _targets(modules: str | None) -> list[str]:
        if not modules or modules == "all-linear":
            return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        return [m.strip() for m in modules.split(",") if m.strip()]

    def _archive(self, job: dict, run: RunFolder) -> Path:
        """adapter_config.json + adapter_model.safetensors as .tar.zst, base named as the job's model."""
        import zstandard

        config = json.loads((run.lora_dir / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = job["model"]   # what the real service names: the hub id
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            data = json.dumps(config, indent=2).encode()
            info = tarfile.TarInfo("adapter_config.json")
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, io.BytesIO(data))
            tar.add(run.lora_dir / "adapter_model.safetensors", arcname="adapter_model.safetensors")
        out = self.root / "archives" / f"{job['id']}-adapter.tar.zst"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(zstandard.ZstdCompressor(level=3).compress(buf.getvalue()))
        return out

    def cancel(self, job: dict) -> None:
        with self.lock:
            if job["status"] in TERMINAL:
                return
            job["status"] = "cancel_requested"
            self.event(job, "cancel_requested", "Cancel requested")
            proc = self.procs.pop(job["id"], None)
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        alive = any(t.name == f"train-{job['id']}" and t.is_alive() for t in threading.enumerate())
        if not alive:
            self._finish_cancel(job)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    service: Service

    def log_message(self, fmt, *args):   # quiet; the tests read the service's state instead
        pass

    # --- plumbing --------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None,
              content_type: str = "application/json") -> None:
        data = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else b"")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _guard(self) -> bool:
        """Auth and injected faults for /v1 calls; True when the request may proceed."""
        svc = self.service
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:] or (svc.api_key and auth[7:] != svc.api_key):
            self._body()
            self._send(401, _error("Invalid API key provided", "invalid_api_key"))
            return False
        with svc.lock:
            roll, kind, slow = svc.rng.random(), svc.rng.choice(("429", "500")), svc.rng.random()
        if roll < svc.fault_rate:
            self._body()
            svc.faults[kind] += 1
            if kind == "429":
                self._send(429, _error("Rate limit exceeded", "rate_limit_exceeded"), {"Retry-After": "1"})
            else:
                self._send(500, _error("Internal server error", "server_error"))
            return False
        if svc.slow_s and slow < max(svc.fault_rate, 0.5):
            svc.faults["slow"] += 1
            time.sleep(svc.slow_s)
        return True

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = url.path.rstrip("/"), {k: v[-1] for k, v in parse_qs(url.query).items()}
        if method == "PUT" and path.startswith("/upload/"):
            return self._put_upload(path.removeprefix("/upload/"))
        if not path.startswith("/v1/"):
            return self._send(404, _error(f"no route {path}"))
        if not self._guard():
            return
        parts = path.split("/")[2:]
        handler = {
            ("POST", "files"): self._create_upload,
            ("GET", "files"): lambda: self._send(200, {"object": "list", "data": [
                self.service.file_json(f) for f in self.service.files.values() if f["uploaded"]]}),
            ("GET", "fine-tunes"): lambda: self._send(200, {"data": [
                self.service.job_json(j) for j in self.service.jobs.values()]}),
            ("POST", "fine-tunes"): self._create_job,
        }.get((method, "/".join(parts)))
        if handler:
            return handler()
        if parts[:1] == ["files"] and len(parts) >= 2:
            return self._file_route(method, parts[1], parts[2:])
        if parts[:3] == ["fine-tunes", "models", "limits"] and method == "GET":
            return self._limits(query.get("model_name", ""))
        if parts == ["fine-tunes", "estimate-price"] and method == "POST":
            return self._estimate(json.loads(self._body() or b"{}"))
        if parts[:1] == ["fine-tunes"] and len(parts) >= 2:
            return self._job_route(method, parts[1], parts[2:])
        if parts == ["finetune", "download"] and method == "GET":
            return self._download(query)
        self._body()
        self._send(404, _error(f"no route {method} {path}"))

    do_GET = lambda self: self._route("GET")        # noqa: E731
    do_POST = lambda self: self._route("POST")      # noqa: E731
    do_PUT = lambda self: self._route("PUT")        # noqa: E731
    do_DELETE = lambda self: self._route("DELETE")  # noqa: E731

    # --- files ---------------------------------------------------------------------------------------
    def _create_upload(self) -> None:
        svc = self.service
        ctype = self.headers.get("Content-Type", "")
        if not ctype.startswith("multipart/form-data"):
            return self._send(400, _error("POST /v1/files takes multipart/form-data"))
        msg = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {ctype}\r\n\r\n".encode() + self._body())
        form = {part.get_param("name", header="content-disposition"): part.get_content().strip()
                for part in msg.iter_parts()}
        missing = [k for k in ("purpose", "file_name", "file_type", "checksum") if not form.get(k)]
        if missing:
            return self._send(400, _error(f"missing form fields {missing}"))
        with svc.lock:
            same = next((f for f in svc.files.values() if f["checksum"] == form["checksum"]
                         and f["purpose"] == form["purpose"] and f["uploaded"]), None)
            if same:
                return self._send(409, {"file_id": same["id"], "message": "File already exists"})
            file_id = f"file-{uuid.uuid4()}"
            svc.files[file_id] = {"id": file_id, "bytes": 0, "created_at": int(time.time()),
                                  "filename": form["file_name"], "file_type": form["file_type"],
                                  "purpose": form["purpose"], "checksum": form["checksum"], "uploaded": False,
                                  "processing_status": "PENDING", "validation_report": None}
        self._send(302, {}, {"Location": f"{svc.base_url}/upload/{file_id}", "X-Together-File-Id": file_id})

    def _put_upload(self, file_id: str) -> None:
        svc = self.service
        data = self._body()
        with svc.lock:
            f = svc.files.get(file_id)
            if f is None:
                return self._send(404, {"error": "no such upload"})
            if hashlib.sha256(data).hexdigest() != f["checksum"]:
                return self._send(400, {"error": "checksum mismatch"})
            blob = svc.file_blob(file_id)
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            f["bytes"], f["uploaded"] = len(data), True
        self._send(200, raw=b"")

    def _file_route(self, method: str, file_id: str, rest: list[str]) -> None:
        svc = self.service
        body = self._body()
        with svc.lock:
            f = svc.files.get(file_id)
        if f is None or not f["uploaded"]:
            return self._send(404, _error(f"file {file_id} not found"))
        if method == "POST" and rest == ["preprocess"]:
            valid, fmt, nlines, err = check_jsonl(svc.file_blob(file_id).read_bytes())
            f["processing_status"] = "COMPLETED" if valid else "INVALID_FORMAT"
            f["validation_report"] = {"valid": valid, "dataset_format": fmt, "nlines": nlines, "file_id": file_id,
                                      **({"error": err, "error_type": "INVALID_FORMAT"} if err else {})}
            return self._send(200, svc.file_json(f))
        if method == "GET" and not rest:
            return self._send(200, svc.file_json(f))
        if method == "GET" and rest == ["content"]:
            return self._send(200, raw=svc.file_blob(file_id).read_bytes(), content_type="application/octet-stream")
        if method == "DELETE" and not rest:
            with svc.lock:
                svc.files.pop(file_id)
            return self._send(200, {"id": file_id, "object": "file", "deleted": True})
        self._send(404, _error(f"no route {method} /v1/files/{file_id}/{'/'.join(rest)} {len(body)}"))

    # --- fine-tunes ------------------------------------------------------------------------------------
    def _limits(self, model: str) -> None:
        if model not in self.service.models:
            return self._send(404, _error(f"model {model!r} is not available for fine-tuning here; "
                                          f"available: {sorted(self.service.models)}"))
        self._send(200, {"model_name": model, "default_gradient_accumulation_steps": 1,
                         "lora_training": {"default_rank": 8, "max_batch_size": 64, "max_batch_size_dpo": 32,
                                           "max_rank": 64, "min_batch_size": 1,
                                           "target_modules": Service._targets(None)},
                         "max_learning_rate": 1.0, "min_learning_rate": 1e-8, "max_num_checkpoints": 10,
                         "max_num_epochs": 20, "max_num_evals": 10, "max_seq_length_dpo": 2048,
                         "max_seq_length_sft": 8192, "min_max_seq_length": 64, "merge_output_lora": False,
                         "supports_full_training": False, "supports_reasoning": False, "supports_tools": False,
                         "supports_vision": False})

    def _estimate(self, body: dict) -> None:
        svc = self.service
        f = svc.files.get(body.get("training_file", ""))
        if f is None:
            return self._send(404, _error("training_file not found"))
        tokens = _estimate_tokens(svc.file_blob(f["id"]).read_bytes()) * int(body.get("n_epochs") or 1)
        v = svc.files.get(body.get("validation_file") or "")
        evals = _estimate_tokens(svc.file_blob(v["id"]).read_bytes()) * int(body.get("n_evals") or 0) if v else 0
        self._send(200, {"estimation_available": True, "allowed_to_proceed": True, "user_limit": 1000.0,
                         "estimated_train_token_count": tokens, "estimated_eval_token_count": evals,
                         "estimated_total_price": round((tokens + evals) / 1e6 * svc.usd_per_mtok, 6)})

    def _create_job(self) -> None:
        svc = self.service
        body = json.loads(self._body() or b"{}")
        model = body.get("model")
        if model not in svc.models:
            return self._send(400, _error(f"model {model!r} is not available for fine-tuning here"))
        for key in ("training_file", "validation_file"):
            fid = body.get(key)
            if fid and (fid not in svc.files or svc.files[fid]["processing_status"] != "COMPLETED"):
                return self._send(400, _error(f"{key} {fid!r} is not an uploaded, validated file"))
        training_type = body.get("training_type") or {"type": "Lora", "lora_r": 8, "lora_alpha": 16}
        if training_type.get("type") != "Lora":
            return self._send(400, _error("this service trains LoRA adapters only"))
        job_id = f"ft-{uuid.uuid4()}"
        name = f"local/{model.split('/')[-1]}-{body.get('suffix') or 'ft'}-{job_id[3:11]}"
        job = {"id": job_id, "object": "fine-tune", "status": "pending", "user_id": "local-user", "model": model,
               "created_at": _now(), "updated_at": _now(), "training_file": body["training_file"],
               "validation_file": body.get("validation_file") or "", "n_epochs": int(body.get("n_epochs", 1)),
               "n_evals": body.get("n_evals", 0), "n_checkpoints": body.get("n_checkpoints", 1),
               "batch_size": body.get("batch_size", 8), "learning_rate": body.get("learning_rate", 1e-5),
               "lr_scheduler": body.get("lr_scheduler") or {"lr_scheduler_type": "cosine"},
               "warmup_ratio": body.get("warmup_ratio", 0.0), "max_seq_length": body.get("max_seq_length"),
               "training_type": training_type, "training_method": body.get("training_method"),
               "suffix": body.get("suffix"), "random_seed": body.get("random_seed"),
               "model_output_name": name, "adapter_output_name": name + "-adapter", "events": [],
               "token_count": None, "total_price": None, "_metrics": []}
        with svc.lock:
            svc.jobs[job_id] = job
            svc.event(job, "job_pending", "Fine-tune job created")
        svc.start_job(job)
        self._send(200, svc.job_json(job))

    def _job_route(self, method: str, job_id: str, rest: list[str]) -> None:
        svc = self.service
        self._body()
        job = svc.jobs.get(job_id)
        if job is None:
            return self._send(404, _error(f"fine-tune job {job_id} not found"))
        if method == "GET" and not rest:
            return self._send(200, svc.job_json(job))
        if method == "GET" and rest == ["events"]:
            return self._send(200, {"data": list(job["events"])})
        if method == "GET" and rest == ["metrics"]:
            return self._send(200, {"metrics": list(job["_metrics"])})
        if method == "GET" and rest == ["checkpoints"]:
            done = job["status"] == "completed"
            return self._send(200, {"data": [{"type": "Final", "step": job.get("steps_completed") or 0,
                                              "created_at": job["updated_at"], "path": job["model_output_name"]}]
                                    if done else []})
        if method == "POST" and rest == ["cancel"]:
            svc.cancel(job)
            return self._send(200, svc.job_json(job))
        self._send(404, _error(f"no route {method} /v1/fine-tunes/{job_id}/{'/'.join(rest)}"))

    def _download(self, query: dict) -> None:
        job = self.service.jobs.get(query.get("ft_id", ""))
        if job is None:
            return self._send(404, _error("fine-tune job not found"))
        if query.get("checkpoint") not in ("adapter", None) and not query.get("checkpoint_step"):
            return self._send(400, _error(f"checkpoint {query.get('checkpoint')!r} is not produced here; "
                                          "this service keeps the LoRA adapter only"))
        if job["status"] != "completed" or not job.get("_archive"):
            return self._send(400, _error(f"job {job['id']} is {job['status']}; nothing to download yet"))
        self._send(200, raw=Path(job["_archive"]).read_bytes(), content_type="application/octet-stream")


class LocalTogether:
    """The service on 127.0.0.1 in a background thread (tests, `python -m`): `with LocalTogether() as svc:`."""

    def __init__(self, root: Path | None = None, models: dict[str, Path] | None = None, port: int = 0, **options):
        self._tmp = None if root else tempfile.mkdtemp(prefix="together-local-")
        if models is None:
            from tasks.models.bootstrap import resolve_base_model
            models = {DEFAULT_MODEL: resolve_base_model(ModelConfig())}
        self.service = Service(Path(root or self._tmp), models, **options)
        handler = type("BoundHandler", (Handler,), {"service": self.service})
        self.server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.service.base_url = self.url
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "LocalTogether":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for job in list(self.service.jobs.values()):
            self.service.cancel(job)
        self.server.shutdown()
        self.server.server_close()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--state-dir", type=Path, default=None, help="files, job folders, archives (default: temp)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=HF_DIR",
                        help=f"a trainable model (default: {DEFAULT_MODEL} = the embedded SmolLM2 HF folder)")
    parser.add_argument("--api-key", default=os.environ.get("TOGETHER_LOCAL_API_KEY"),
                        help="accept only this key (default: any non-empty key)")
    parser.add_argument("--fault-rate", type=float, default=0.0, help="share of /v1 calls answered 429 or 500")
    parser.add_argument("--slow-s", type=float, default=0.0, help="delay a share of answers by this many seconds")
    parser.add_argument("--fail-jobs", action="store_true", help="every job fails remotely once training starts")
    parser.add_argument("--max-steps", type=int, default=-1, help="cap each job's optimizer steps (quick demos)")
    parser.add_argument("--queue-s", type=float, default=0.2, help="how long a job waits in the queue")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    models = dict(m.split("=", 1) for m in args.model) or None
    with LocalTogether(args.state_dir, {k: Path(v) for k, v in models.items()} if models else None, args.port,
                       api_key=args.api_key, fault_rate=args.fault_rate, slow_s=args.slow_s,
                       fail_jobs=args.fail_jobs, seed=args.seed, max_steps=args.max_steps,
                       queue_s=args.queue_s) as svc:
        print(f"Together-compatible service on {svc.url} (TOGETHER_BASE_URL={svc.url}); models: "
              f"{sorted(svc.service.models)}", flush=True)
        try:
            svc.thread.join()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
