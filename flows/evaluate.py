"""`evaluate`: the Fledgling decision. Measure the SLM and the LLM on one track, then keep the LLM, swap to the
SLM now, or fine-tune the SLM with the track's recipe and decide again on the fine-tuned model.

Run it:
    slipway evaluate fledgling-structured                               # the structured-output track
    slipway evaluate fledgling-toolcall                                 # the tool-call track
    slipway evaluate slipstream --finetuned-run runs/slipstream-20261121-101500 \\
        --set baseline.source=local-gguf                                 # base vs fine-tuned vs an LLM baseline
    slipway evaluate fledgling-structured --eval-file my-eval.jsonl     # your own rows
    prefect deployment run evaluate/fledgling-structured

Stages: validate recipe → tracing → run folder → test rows (the recipe's test split, or an eval file) →
base model → base SLM and LLM baseline → (a given fine-tuned run) → decision → [fine-tune → fine-tuned SLM →
decision] → report. The fine-tune leg is the finetune flow itself: a subflow here, or a run of a finetune
deployment on a GPU worker. With Langfuse keys set, every model call is a generation in the run's trace and
every metric a score. The flow only wires tasks and flows.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.deployments import run_deployment
from prefect.states import State

from flows.finetune import finetune
from tasks.models.bootstrap import bootstrap_base_model
from tasks.data.prepare import prepare_splits, write_splits
from tasks.eval.decision import decide_swap
from tasks.eval.fledgling import (configure_tracing, evaluate_slm, locate_finetuned, require_finished_finetune,
                                  require_llm_baseline, write_eval_file_rows)
from tasks.eval.measure import measure_llm_baseline
from tasks.recipe import REPO_ROOT
from tasks.release.report import write_eval_report
from tasks.start import create_run_folder, validate_recipe


def run_finetune_leg(params: dict, deployment: str | None) -> State:
    """The finetune flow with the track's recipe: a subflow in this process, or a run of `deployment` (a
    GPU worker, say; `output_root` must then be storage both machines see). Returns its final state: failed
    gates fail that run, and are still a verdict the decision reads."""
    if deployment:
        return run_deployment(name=deployment, parameters=params, timeout=None, as_subflow=True).state
    return finetune(**params, return_state=True)


@flow(name="evaluate", log_prints=True)
def evaluate(recipe: str = "fledgling-structured", eval_file: str | None = None, finetuned_run: str | None = None,
             overrides: dict | None = None, output_root: str = str(REPO_ROOT / "runs"), run_name: str | None = None,
             langfuse_block: str | None = None, finetune_deployment: str | None = None) -> str:
    """Evaluate SLM vs LLM on a track and decide keep-llm / swap-now / fine-tune; returns the run folder.

    Args:
        recipe: a recipe name in recipes/ or a YAML path; its `baseline` section names the LLM.
        eval_file: a JSONL eval file (docs/eval-file-format.md) to use instead of the recipe's test split.
        finetuned_run: an existing finetune run folder to compare as 'fine-tuned' (no new fine-tune then).
        overrides: dotted recipe fields to override, e.g. {"data.eval_rows": 20}.
        output_root: where run folders are created (the fine-tune leg's too).
        run_name: the run folder's name (default: <recipe>-eval-<UTC timestamp>).
        langfuse_block: a saved LangfuseCredentials block; default: LANGFUSE_* environment variables.
        finetune_deployment: run the fine-tune leg as this deployment (e.g. 'finetune/fledgling-gpu')
            instead of in this process.
    """
    cfg = validate_recipe(recipe, overrides or {})
    require_llm_baseline(cfg)
    configure_tracing(langfuse_block)
    run_dir = create_run_folder(output_root, cfg, run_name, kind="eval")
    if eval_file:
        stats = write_eval_file_rows(run_dir, cfg, eval_file)
    else:
        stats = write_splits(run_dir, prepare_splits(cfg.data, cfg.model.system_prompt, cfg.task))
    base_dir = bootstrap_base_model(cfg.model)
    source = eval_file or f"{cfg.data.source} (test split)"
    results = {"base": evaluate_slm(run_dir, "base", cfg, base_dir),
               cfg.baseline.label: measure_llm_baseline(run_dir, cfg, base_dir)}
    finetuned = locate_finetuned(finetuned_run) if finetuned_run else None
    if finetuned:
        results["fine-tuned"] = evaluate_slm(run_dir, "fine-tuned", cfg, base_dir, finetuned)
    decisions = [decide_swap(cfg, results, run_dir.name, finetuned["gates_passed"] if finetuned else None)]
    if decisions[-1]["action"] == "fine-tune":
        leg = {"recipe": recipe, "overrides": overrides or {}, "output_root": output_root,
               "run_name": f"{run_dir.name}-finetune"}
        state = run_finetune_leg(leg, finetune_deployment)
        leg_dir = require_finished_finetune(str(Path(output_root) / leg["run_name"]), state.name, state.message)
        finetuned = locate_finetuned(leg_dir, state.name)
        results["fine-tuned"] = evaluate_slm(run_dir, "fine-tuned", cfg, base_dir, finetuned)
        decisions.append(decide_swap(cfg, results, run_dir.name, finetuned["gates_passed"]))
    write_eval_report(cfg, run_dir, results, decisions, finetuned, source)
    print(f"{stats.get('test_rows')} test rows; decision: {decisions[-1]['action']}")
    return str(run_dir)

