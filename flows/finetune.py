"""`finetune`: task → small fine-tuned model that beats its prompted baseline, exported and served.

Run it:
    slipway run slipstream                                       # locally (what `make demo` does)
    slipway run slipstream --set training.max_steps=5 --set data.eval_rows=8
    prefect deployment run finetune/slipstream                   # through a Prefect server and worker

Stages: validate recipe → run folder → base model → data splits → baseline eval (base SLM, and the LLM
baseline when the recipe names one) → LoRA training → merge → GGUF export → Modelfile → template check →
merged eval → llama.cpp server eval → parity of every format → gates → deploy → model card → publish →
report. The flow only wires tasks.
"""

from __future__ import annotations

from prefect import flow

from flows.together import remote_training

from tasks.models.bootstrap import bootstrap_base_model
from tasks.data.prepare import prepare_splits, write_splits
from tasks.release.deploy import deploy_model
from tasks.eval.measure import measure_hf_model, measure_llm_baseline, serve_and_measure_gguf
from tasks.export.convert import export_gguf, merge_lora_adapter
from tasks.eval.gates import check_gates, enforce_gates
from tasks.release.model_card import publish_release, write_model_card
from tasks.ollama.modelfile import write_modelfile
from tasks.eval.parity import measure_parity
from tasks.recipe import REPO_ROOT
from tasks.release.report import write_report
from tasks.start import create_run_folder, validate_recipe
from tasks.export.template_check import verify_chat_template
from tasks.together.hooks import cancel_remote_job
from tasks.train.launch import train_adapter


@flow(name="finetune", log_prints=True, on_cancellation=[cancel_remote_job])
def finetune(recipe: str = "slipstream", overrides: dict | None = None, output_root: str = str(REPO_ROOT / "runs"),
             run_name: str | None = None, resume_from: str | None = None) -> str:
    """Fine-tune, export, serve, evaluate and gate one recipe; returns the run folder.

    Args:
        recipe: a recipe name in recipes/ or a YAML path.
        overrides: dotted recipe fields to override, e.g. {"training.max_steps": 5}.
        output_root: where run folders are created (each run gets its own).
        run_name: the run folder's name (default: <recipe>-<UTC timestamp>).
        resume_from: an earlier run folder that did not complete: its stages run again in it, and
            training restarts from its last checkpoint instead of from scratch.
    """
    cfg = validate_recipe(recipe, overrides or {})
    run_dir = create_run_folder(output_root, cfg, run_name, resume_from)
    base_dir = bootstrap_base_model(cfg.model)
    # Later tasks read what earlier ones wrote through the run folder (tasks/run.py); `wait_for` names
    # the artifact each one reads, so the Prefect graph shows the real dependencies.
    splits = write_splits(run_dir, prepare_splits(cfg.data, cfg.model.system_prompt, cfg.task))
    base = measure_hf_model(run_dir, "base", base_dir, cfg.eval, wait_for=[splits])
    llm = (measure_llm_baseline(run_dir, cfg, base_dir, wait_for=[splits])
           if cfg.baseline.source != "none" else None)
    # Where training happens is the recipe's choice; what follows reads the same lora/ and metrics/ either way.
    training = (remote_training(cfg, run_dir, base_dir) if cfg.training.engine == "together"
                else train_adapter(cfg, run_dir, base_dir, wait_for=[splits]))
    merged_dir = merge_lora_adapter(run_dir, base_dir, wait_for=[training])
    ggufs = export_gguf(run_dir, base_dir, cfg.export, wait_for=[merged_dir])
    modelfile = write_modelfile(run_dir, cfg, ggufs)
    template_gate = verify_chat_template(run_dir, cfg, wait_for=[modelfile])
    merged = measure_hf_model(run_dir, "merged", merged_dir, cfg.eval, wait_for=[splits])
    served_label = f"gguf-{cfg.export.serve_type}"
    served = serve_and_measure_gguf(run_dir, served_label, ggufs[cfg.export.serve_type], cfg.eval, cfg.deploy,
                                    tokenizer_dir=base_dir, wait_for=[splits])
    parity = measure_parity(run_dir, base_dir, cfg, ggufs, wait_for=[splits])
    results = {"base": base, "merged": merged, served_label: served} | ({cfg.baseline.label: llm} if llm else {})
    gates = [*check_gates(cfg, results, served_label, training), template_gate]
    deployment = deploy_model(run_dir, cfg, gates, wait_for=[modelfile])
    release = write_model_card(run_dir, cfg, results, training, wait_for=[modelfile, parity])
    publish_release(run_dir, cfg, gates, wait_for=[release])
    write_report(cfg, run_dir, results, gates, training, wait_for=[parity, deployment])
    enforce_gates(gates)
    return str(run_dir)

