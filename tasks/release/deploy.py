"""Deploy what the run's Modelfile names, once every gate passed.

  llamacpp (default, runs here)  a managed llama-server on the GGUF (and LoRA) the Modelfile deploys:
                                 health check, a test chat through the `openai` client, then stopped,
                                 or left running with deploy.keep_running (`python -m tasks.llamacpp.serve stop`).
  ollama                         through the official `ollama` client: upload each GGUF as a blob by its
                                 sha256 (checked against the export manifest), create the model with
                                 files / adapters / template / system / parameters, read it back with
                                 show, and run a test chat. Ollama >= 0.34.1 refuses ADAPTER
                                 (ollama/ollama#14969): asked its version (/api/version), an adapter
                                 deployment then ships one GGUF merged by llama.cpp's llama-export-lora
                                 instead (deploy.json `path` says which was taken).
Writes deploy/<target>.json.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from tasks.eval import parity
from tasks.data.evalfile import prompt_messages
from tasks.eval import verify
from tasks.eval.runners import LLAMA_CPP_GREEDY, generate_openai
from tasks.export import template_check
from tasks.llamacpp.serve import ManagedLlamaServer, answer_grammar, load_api_key
from tasks.ollama.adapter_guard import ModelfileRefused, base_identity, gguf_metadata
from tasks.ollama.modelfile import Modelfile, deployed_artifact
from tasks.recipe import DeployConfig, Recipe
from tasks.run import RunFolder, atomic_write_json, read_json, read_jsonl, stage_timer
from tasks.timeouts import StageTimeout, stage_deadline


class DeployError(RuntimeError):
    """A deployment step failed; the message names the step and the server's answer."""


def _test_row(run: RunFolder) -> dict:
    return read_jsonl(run.split("test"))[0]


def _prompt(row: dict) -> str:
    """The row's question: its last user turn (test rows may or may not end with a gold answer)."""
    return prompt_messages(row)[-1]["content"]


def model_name(recipe: Recipe) -> str:
    return recipe.deploy.ollama_model or f"slipway-{recipe.name}".lower().replace("_", "-")


def deploy_llamacpp(run_dir: RunFolder | Path, recipe: Recipe, max_new_tokens: int) -> dict:
    """Serve the Modelfile's artifact with a managed llama-server and answer one test chat (deploy/llamacpp.json)."""
    run = RunFolder(run_dir)
    cfg = recipe.deploy
    model, lora = deployed_artifact(run, Modelfile.read(run.modelfile))
    api_key = load_api_key(cfg.api_key_block)
    # A server left running (keep_running) outlives the flow on purpose; any other dies with it.
    server = ManagedLlamaServer(model, run.deploy_server_log, alias=model_name(recipe), host=cfg.host, port=cfg.port,
                                parallel=cfg.parallel, ctx_size=cfg.ctx_size, lora_path=lora, api_key=api_key,
                                outlive_parent=cfg.keep_running,
                                grammar_file=answer_grammar(run, cfg, recipe.task))
    server.start()
    try:
        row = _test_row(run)
        answers, tokens = generate_openai(server.base_url, server.alias, [row], max_new_tokens, concurrency=1,
                                          api_key=api_key)
        record = {"target": "llamacpp", "base_url": server.base_url, "model": server.alias, "artifact": str(model),
                  "lora": str(lora) if lora else None, "pid": server.process.pid, "command": server.command(),
                  "api_key_block": cfg.api_key_block,   # the block's name only; the key is never written
                  "running": cfg.keep_running, "log": str(server.log_path),
                  "served_as": "base GGUF + LoRA GGUF (--lora)" if lora else "one GGUF",
                  "grammar_file": str(server.grammar_file) if server.grammar_file else None,
                  "test_chat": {"prompt": _prompt(row), "answer": answers[0], "tokens": tokens}}
        record |= verify_deployment(run, recipe, server.base_url, server.alias, max_new_tokens, LLAMA_CPP_GREEDY)
    finally:
        if not cfg.keep_running:
            server.stop()
    atomic_write_json(run.deploy_target_record("llamacpp"), record)
    return record


def verify_deployment(run: RunFolder, recipe: Recipe, base_url: str, model: str, max_new_tokens: int,
                      extra_body: dict | None = None) -> dict:
    """deploy.verify_file's prompts asked of the deployed endpoint, pass/fail each (metrics/verify.json);
    returns the deploy record's `verify` summary (empty when the recipe names no verify file)."""
    if not recipe.deploy.verify_file:
        return {}
    from tasks.recipe import repo_path

    result = verify.verify_endpoint(base_url, model, repo_path(recipe.deploy.verify_file), recipe.model.system_prompt,
                                    max_new_tokens, concurrency=recipe.deploy.parallel, extra_body=extra_body,
                                    task=recipe.task)
    atomic_write_json(run.verify_results, result)
    return {"verify": {"passed": result["passed"], "total": result["total"], "file": recipe.deploy.verify_file}}


def _parameters(modelfile: Modelfile) -> dict:
    """Modelfile PARAMETER lines as the typed mapping /api/create takes (stop is a list)."""
    out: dict = {}
    for key, value in modelfile.parameters:
        if key == "stop":
            out.setdefault("stop", []).append(value)
            continue
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
    return out


def push_blob(client, path: Path, sha256: str) -> str:
    """Upload one file as a blob; the digest must be the one the export manifest recorded.

    Raises:
        DeployError: the server rejected the upload, or the file changed since it was exported and checked.
    """
    import ollama

    try:
        digest = client.create_blob(path)
    except ollama.ResponseError as exc:
        raise DeployError(f"Ollama rejected blob {path.name} (HTTP {exc.status_code}): {exc.error}") from None
    if digest != f"sha256:{sha256}":
        raise DeployError(f"{path.name} changed since export: the manifest has sha256:{sha256}, the file is "
                          f"{digest}; re-export before deploying")
    return digest


def _manifest_digests(run: RunFolder) -> dict[Path, str]:
    manifest = read_json(run.gguf_manifest)
    # Symlinks resolved, as run.deployed() resolves the Modelfile's paths: both sides name the real file.
    return {run.resolve(a["path"]).resolve(): a["sha256"] for a in manifest.values() if a.get("sha256")}


def check_registry_base(client, base: str, trained_base_gguf: Path) -> None:
    """An ADAPTER on an Ollama model: that model must be the base the adapter was trained on.

    Raises:
        ModelfileRefused: an identity field differs (architecture, size, dimensions).
    """
    shown = client.show(base)
    want = base_identity(gguf_metadata(trained_base_gguf)[0])
    got = base_identity(dict(shown.modelinfo or {}))
    for key, value in want.items():
        if key in got and got[key] != value:
            raise ModelfileRefused(f"ADAPTER refused: the adapter's base does not match FROM {base!r}: {key} is "
                                   f"{value!r} for the base it was trained on, {got[key]!r} in Ollama")


ADAPTER_REFUSED_FROM = (0, 34, 1)   # ollama/ollama#14969: create refuses ADAPTER from this release on


def ollama_version(host: str) -> tuple[int, ...] | None:
    """The server's version from GET /api/version, as a tuple; None when it does not say."""
    import re

    import httpx

    try:
        response = httpx.get(f"{host.rstrip('/')}/api/version", timeout=10)
        response.raise_for_status()
        match = re.match(r"^v?(\d+)\.(\d+)\.(\d+)", str(response.json().get("version", "")))
    except (httpx.HTTPError, ValueError):
        return None
    return tuple(int(g) for g in match.groups()) if match else None


def merged_for_ollama(run: RunFolder, modelfile: Modelfile) -> Path:
    """The Modelfile's base GGUF with its ADAPTER merged in (llama-export-lora), made once per run."""
    from tasks.export.convert import merge_lora_gguf

    base = run.deployed(modelfile.from_)
    base = base if base.exists() else run.base_gguf   # FROM a registry model: the base it was checked against
    if not run.lora_merged_gguf.exists():
        merge_lora_gguf(base, run.deployed(modelfile.adapter), run.lora_merged_gguf)
    return run.lora_merged_gguf


def deploy_ollama(run_dir: RunFolder | Path, recipe: Recipe, max_new_tokens: int) -> dict:
    """Create the model on an Ollama server from the run's Modelfile and answer one test chat (deploy/ollama.json).

    Raises:
        DeployError: a rejected blob, a changed artifact, or a create/show/chat the server refused.
        ModelfileRefused: the FROM model is not the adapter's base.
    """
    import ollama

    run = RunFolder(run_dir)
    cfg: DeployConfig = recipe.deploy
    client = ollama.Client(host=cfg.ollama_host, timeout=cfg.timeout_s)   # per HTTP call
    modelfile = Modelfile.read(run.modelfile)
    digests = _manifest_digests(run)

    def upload(rel: str) -> tuple[str, str]:
        path = run.deployed(rel)
        if path not in digests:
            raise DeployError(f"{rel}: not an exported artifact of this run (no sha256 in gguf/manifest.json)")
        return path.name, push_blob(client, path, digests[path])

    files, from_ = {}, None
    version = ollama_version(cfg.ollama_host) if modelfile.adapter else None   # only ADAPTER depends on it
    path = "merged GGUF"
    if modelfile.adapter and version is not None and version >= ADAPTER_REFUSED_FROM:
        # This Ollama refuses ADAPTER: ship base + LoRA merged into one GGUF by llama.cpp instead.
        merged = merged_for_ollama(run, modelfile)
        from tasks.export.convert import sha256_file
        files, adapters = {merged.name: push_blob(client, merged, sha256_file(merged))}, None
        path = f"merged by llama-export-lora (Ollama {'.'.join(map(str, version))} refuses ADAPTER)"
    else:
        if run.deployed(modelfile.from_).exists():
            files = dict([upload(modelfile.from_)])
        else:
            from_ = modelfile.from_
            check_registry_base(client, from_, run.base_gguf)
        adapters = dict([upload(modelfile.adapter)]) if modelfile.adapter else None
        if adapters:
            path = "FROM base + ADAPTER"
    name = model_name(recipe)
    params = _parameters(modelfile)
    try:
        client.create(model=name, from_=from_, files=files or None, adapters=adapters, template=modelfile.template,
                      system=modelfile.system, parameters=params, stream=False)
        shown = client.show(name)
        stored = Modelfile.parse(shown.modelfile or "", strict=False)
        if (shown.template, stored.system, stored.stop) != (modelfile.template, modelfile.system, modelfile.stop):
            raise DeployError(f"ollama show {name}: the stored TEMPLATE / SYSTEM / stop differ from deploy/Modelfile "
                              f"(stop {stored.stop} vs {modelfile.stop})")
        row = _test_row(run)
        # No system message: the Modelfile's SYSTEM must fill it in, as it will for users.
        reply = client.chat(model=name, messages=[m for m in prompt_messages(row) if m["role"] != "system"],
                            stream=False,
                            options={"num_predict": max_new_tokens})
    except ollama.ResponseError as exc:
        raise DeployError(f"Ollama at {cfg.ollama_host} refused the deployment of {name} "
                          f"(HTTP {exc.status_code}): {exc.error}") from None
    record = {"target": "ollama", "host": cfg.ollama_host, "model": name, "from": from_, "files": files,
              "adapters": adapters or {}, "path": path,
              "ollama_version": ".".join(map(str, version)) if version else None,
              "parameters": params, "details": dict(shown.details or {}),
              "test_chat": {"prompt": _prompt(row), "answer": reply.message.content,
                            "done_reason": reply.done_reason}}
    record |= verify_deployment(run, recipe, f"{cfg.ollama_host.rstrip('/')}/v1", name, max_new_tokens)
    atomic_write_json(run.deploy_target_record("ollama"), record)
    return record


def _transient(task, task_run, state) -> bool:
    """Retry only on connection trouble; a refused or rejected deployment will not change by retrying."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, (ConnectionError, TimeoutError, OSError)) and not isinstance(
        exc, (FileNotFoundError, StageTimeout))


@task(name="deploy-model", retries=2, retry_delay_seconds=5, retry_condition_fn=_transient)
def deploy_model(run_dir: RunFolder | Path, recipe: Recipe, gates: list[dict]) -> dict:
    """Deploy to recipe.deploy.target when every gate passed; otherwise record why nothing was deployed
    (deploy/deploy.json either way); returns that record."""
    run = RunFolder(run_dir)
    target = recipe.deploy.target
    failed = [g["name"] for g in gates if not g["passed"]]
    if target == "none" or failed:
        record = {"target": target, "skipped": f"gates failed: {', '.join(failed)}" if failed else "deploy.target none"}
        atomic_write_json(run.deploy_record, record)
        return record
    with stage_timer(run, f"deploy-{target}"), stage_deadline(f"deploy-{target}", recipe.deploy.timeout_s,
                                                               "deploy.timeout_s"):
        deploy = deploy_llamacpp if target == "llamacpp" else deploy_ollama
        record = deploy(run, recipe, recipe.eval.max_new_tokens)
    atomic_write_json(run.deploy_record, record)
    return record


def render_section(run_dir: RunFolder | Path) -> list[str]:
    """Report lines for deploy/deploy.json (empty when the run has none)."""
    d = read_json(RunFolder(run_dir).deploy_record, missing_ok=True)
    if d is None:
        return []
    lines = ["## Deployment", ""]
    if d.get("skipped"):
        return lines + [f"Not deployed ({d['target']}): {d['skipped']}.", ""]
    where = d.get("base_url") or f"{d.get('host')} model `{d.get('model')}`"
    how = d.get("path") or d.get("served_as")
    lines += [f"Target **{d['target']}** at {where}; Modelfile `deploy/Modelfile`"
              + (f"; deployed as: {how}" if how else "")
              + ("; every answer constrained to the task's GBNF grammar (`--grammar-file "
                 f"{Path(d['grammar_file']).name}`, deploy.constrain_output)" if d.get("grammar_file") else "")
              + ".", "",
              f"Test chat: `{d['test_chat']['prompt'][:80]}` →", "", "```", d["test_chat"]["answer"].strip(), "```", ""]
    if d["target"] == "llamacpp":
        lines += ["Serve it again: `python -m tasks.llamacpp.serve run " + str(run_dir) + "`", ""]
    return lines


def report_sections(run_dir: RunFolder | Path) -> list[str]:
    """The report's export sections: parity table, template check, deployment (each empty when absent)."""
    run = RunFolder(run_dir)
    # parity.render_section still joins its paths onto a Path, so it gets the folder's Path.
    return (parity.render_section(run.root) + template_check.render_section(run) + render_section(run)
            + verify.render_section(run))
