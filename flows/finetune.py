"""`finetune`: task → small fine-tuned model that beats its prompted baseline, exported and served.

Run it:
    slipway run slipstream                                       # locally (what `make demo` does)
    slipway run slipstream --set training.max_steps=5 --set data.eval_rows=8
    prefect deployment run finetune/slipstream                   # through a Prefect server and worker

Stages: validate recipe → run folder → devices seen → base model → architecture guard → data splits → baseline
eval (base SLM, and the LLM
baseline when the recipe names one) → LoRA training → merge → GGUF export → Modelfile → template check →
merged eval (test split, then each of data.eval_files) → served-GGUF eval → parity of every format → gates →
deploy → model card → publish → report. Base, merged and served are evaluated by llama.cpp; the parity
table holds the one transformers evaluation. The flow only wires tasks.
"""

from __future__ import annotations

from prefect import flow

from flows.together_training import remote_training

from tasks.models.bootstrap import bootstrap_base_model
from tasks.data.prepare import prepare_splits, write_eval_file_split, write_splits
from tasks.release.deploy import deploy_model
from tasks.eval.measure import measure_llm_baseline, serve_and_measure_gguf
from tasks.export.convert import base_model_gguf, export_gguf, merge_lora_adapter
from tasks.export.guard import guard_architecture
from tasks.eval.gates import check_gates, enforce_gates
from tasks.release.model_card import publish_release, write_model_card
from tasks.ollama.modelfile import write_modelfile
from tasks.eval.parity import measure_parity
from tasks.recipe import REPO_ROOT
from tasks.release.report import write_report
from tasks.start import create_run_folder, validate_recipe
from tasks.export.template_check import verify_chat_template
from tasks.train.devices import record_devices
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
    record_devices(run_dir)   # the GPUs this run's work pool gave it (the tracks report reads them)
    base_dir = bootstrap_base_model(cfg.model)
    # Later tasks read what earlier ones wrote through the run folder (tasks/run.py); `wait_for` names
    # the artifact each one reads, so the Prefect graph shows the real dependencies.
    splits = write_splits(run_dir, prepare_splits(cfg.data, cfg.model.system_prompt, cfg.task))
    # Before any evaluation or training: the GGUF export (and an adapter deployment) must be possible for
    # this architecture. After the splits, so a bad dataset line is the first thing a user hears about.
    guard_architecture(base_dir, cfg)
    # Base, merged and the served quantization are measured by llama.cpp (several times faster than
    # transformers generate on CPU); the parity table keeps the one transformers-vs-GGUF comparison.
    base = serve_and_measure_gguf(run_dir, "base", base_model_gguf(base_dir), cfg.eval, cfg.deploy,
                                  tokenizer_dir=base_dir, max_rows=cfg.eval.base_rows, wait_for=[splits])
    llm = (measure_llm_baseline(run_dir, cfg, base_dir, wait_for=[splits])
           if cfg.baseline.source != "none" else None)
    # Where training happens is the recipe's choice; what follows reads the same lora/ and metrics/ either way.
    training = (remote_training(cfg, run_dir, base_dir) if cfg.training.engine == "together"
                else train_adapter(cfg, run_dir, base_dir, wait_for=[splits]))
    merged_dir = merge_lora_adapter(run_dir, base_dir, wait_for=[training])
    ggufs = export_gguf(run_dir, base_dir, cfg.export, wait_for=[merged_dir])
    modelfile = write_modelfile(run_dir, cfg, ggufs)
    template_gate = verify_chat_template(run_dir, cfg, wait_for=[modelfile])
    merged = serve_and_measure_gguf(run_dir, "merged", ggufs["f16"], cfg.eval, cfg.deploy, tokenizer_dir=base_dir,
                                    wait_for=[splits])
    # The recipe's eval files (hand-written prompts no training row resembles) beside the test split.
    held_out = {}
    for eval_file in cfg.data.eval_files:
        name = write_eval_file_split(run_dir, eval_file, cfg.model.system_prompt, cfg.task,
                                     cfg.data.eval_rows)
        held_out[f"merged@{name}"] = serve_and_measure_gguf(run_dir, f"merged@{name}", ggufs["f16"], cfg.eval,
                                                            cfg.deploy, tokenizer_dir=base_dir, split=name)
    served_label = f"gguf-{cfg.export.serve_type}"
    served = serve_and_measure_gguf(run_dir, served_label, ggufs[cfg.export.serve_type], cfg.eval, cfg.deploy,
                                    tokenizer_dir=base_dir, wait_for=[splits])
    parity = measure_parity(run_dir, base_dir, cfg, ggufs, wait_for=[splits])
    results = ({"base": base, "merged": merged, served_label: served} | ({cfg.baseline.label: llm} if llm else {})
               | held_out)
    gates = [*check_gates(cfg, results, served_label, training), template_gate]
    deployment = deploy_model(run_dir, cfg, gates, wait_for=[modelfile])
    release = write_model_card(run_dir, cfg, results, training, wait_for=[modelfile, parity])
    publish_release(run_dir, cfg, gates, wait_for=[release])
    write_report(cfg, run_dir, results, gates, training, wait_for=[parity, deployment])
    enforce_gates(gates)
    return str(run_dir)

