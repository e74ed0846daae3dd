"""`evaluate`: the Fledgling decision. Measure the SLM and the LLM on one track, then keep the LLM, swap to the
SLM now, or fine-tune the SLM with the track's recipe and decide again on the fine-tuned model.

Run it:
    python -m flows.evaluate --recipe fledgling-structured              # the structured-output track
    python -m flows.evaluate --recipe fledgling-toolcall                # the tool-call track
    python -m flows.evaluate --recipe slipstream --finetuned-run runs/slipstream-20261121-101500 \\
        --set baseline.source=local-gguf                                 # base vs fine-tuned vs an LLM baseline
    python -m flows.evaluate --recipe fledgling-structured --eval-file my-eval.jsonl   # your own rows
    prefect deployment run evaluate/fledgling-structured

Stages: validate recipe → tracing → run folder → test rows (the recipe's test split, or an eval file) →
base model → base SLM and LLM baseline → (a given fine-tuned run) → decision → [fine-tune → fine-tuned SLM →
decision] → report. With Langfuse keys set, every model call is a generation in the run's trace and every
metric a score. The flow only wires tasks.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow

from tasks.models.bootstrap import bootstrap_base_model
from tasks.data.prepare import prepare_splits, write_splits
from tasks.eval.decision import decide_swap
from tasks.eval.measure import measure_llm_baseline
from tasks.eval.tasktypes import check_recipe
from tasks.eval.fledgling import (configure_tracing, evaluate_slm, locate_finetuned, require_llm_baseline,
                             trigger_finetune, write_eval_file_rows)
from tasks.recipe import REPO_ROOT, RecipeError, load_recipe, validate_recipe
from tasks.release.report import write_eval_report
from tasks.run import create_run_folder


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
    cfg = check_recipe(validate_recipe(recipe, overrides or {}))
    require_llm_baseline(cfg)
    configure_tracing(langfuse_block)
    run_dir = create_run_folder(output_root, cfg, run_name)
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
        leg = trigger_finetune(recipe, overrides or {}, output_root, f"{run_dir.name}-finetune", finetune_deployment)
        finetuned = locate_finetuned(leg["run_dir"], leg["state"])
        results["fine-tuned"] = evaluate_slm(run_dir, "fine-tuned", cfg, base_dir, finetuned)
        decisions.append(decide_swap(cfg, results, run_dir.name, finetuned["gates_passed"]))
    write_eval_report(cfg, run_dir, results, decisions, finetuned, source)
    print(f"{stats.get('test_rows')} test rows; decision: {decisions[-1]['action']}")
    return str(run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the evaluate (Fledgling decision) flow locally.")
    parser.add_argument("--recipe", default="fledgling-structured")
    parser.add_argument("--eval-file", help="JSONL eval file (docs/eval-file-format.md)")
    parser.add_argument("--finetuned-run", help="an existing finetune run folder to compare")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a recipe field, e.g. --set data.eval_rows=10 (YAML value)")
    parser.add_argument("--output-root", default=str(REPO_ROOT / "runs"))
    parser.add_argument("--langfuse-block", help="saved LangfuseCredentials block name")
    args = parser.parse_args(argv)
    import yaml

    from tasks.data.evalfile import EvalFileError, load_eval_file

    overrides = {field: yaml.safe_load(value) for field, _, value in (s.partition("=") for s in args.set)}
    try:  # fail before Prefect starts, with one message and no traceback
        cfg = check_recipe(load_recipe(args.recipe, overrides))
        if args.eval_file:
            load_eval_file(args.eval_file, cfg.task)
    except (RecipeError, EvalFileError) as exc:
        print(exc, file=sys.stderr)
        return 2
    run_name = f"{Path(args.recipe).stem}-eval-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    state = evaluate(recipe=args.recipe, eval_file=args.eval_file, finetuned_run=args.finetuned_run,
                     overrides=overrides, output_root=args.output_root, run_name=run_name,
                     langfuse_block=args.langfuse_block, return_state=True)
    report = Path(args.output_root) / run_name / "report.md"
    print(f"\nReport: {report}" if report.exists() else f"\nNo report: the run stopped early ({report.parent})")
    if state.is_failed():
        print(f"Run failed: {state.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
