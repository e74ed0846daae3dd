"""Tasks of the Fledgling `evaluate` flow: rows from an eval file, the SLM evaluations, the fine-tune leg's
outcome (the leg itself is the finetune flow, called by flows/evaluate.py as a subflow or a deployment).

The decision rule itself is tasks/eval/decision.py; the reports are tasks/release/report.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from blocks.tracing import LangfuseCredentials
from tasks import tracing
from tasks.data.evalfile import load_eval_file, to_chat_row
from tasks.eval.measure import measure_gguf, measure_hf
from tasks.export.convert import ensure_base_gguf
from tasks.recipe import Recipe
from tasks.run import RunFolder, atomic_write_json, atomic_write_jsonl


@task(name="configure-tracing")
def configure_tracing(langfuse_block: str | None = None) -> bool:
    """Langfuse from a saved `LangfuseCredentials` block, else from LANGFUSE_* variables; off without keys."""
    if langfuse_block:
        return tracing.configure(LangfuseCredentials.load(langfuse_block))
    return tracing.configure()


@task(name="require-llm-baseline")
def require_llm_baseline(recipe: Recipe) -> None:
    """The evaluate flow compares against an LLM: a recipe without one is refused before any work.

    Raises:
        ValueError: baseline.source is 'none'.
    """
    if recipe.baseline.source == "none":
        raise ValueError(f"recipe {recipe.name!r}: the evaluate flow needs a baseline section (source 'block' "
                         "naming an endpoint block, or 'local-gguf'); see recipes/fledgling-structured.yaml")


@task(name="write-eval-file-rows")
def write_eval_file_rows(run_dir: Path, recipe: Recipe, eval_file: str) -> dict:
    """A user's eval file (validated line by line) as the run's test rows: data/test.jsonl, data/stats.json.

    Raises:
        EvalFileError: naming the file and line of the first bad row.
    """
    rows = [to_chat_row(r, recipe.model.system_prompt) for r in load_eval_file(eval_file, recipe.task)]
    if recipe.data.eval_rows:
        rows = rows[:recipe.data.eval_rows]
    run = RunFolder(run_dir)
    atomic_write_jsonl(run.split("test"), rows)
    stats = {"source": str(eval_file), "test_rows": len(rows)}
    atomic_write_json(run.data_stats, stats)
    return stats


@task(name="evaluate-slm")
def evaluate_slm(run_dir: Path, label: str, recipe: Recipe, base_dir: Path, finetuned: dict | None = None) -> dict:
    """The base SLM (finetuned None) or a fine-tuned one, with the recipe's SLM runner.

    transformers runs the merged folder (or base + LoRA adapter); llama.cpp serves the run's quantized
    GGUF (or the base GGUF + the GGUF LoRA): what a local deployment would answer with.
    """
    ev = recipe.eval
    if ev.slm_runner == "transformers":
        model_dir = Path(finetuned["model_dir"]) if finetuned and finetuned["model_dir"] else base_dir
        adapter = Path(finetuned["adapter_dir"]) if finetuned and finetuned.get("adapter_dir") else None
        return measure_hf(run_dir, label, model_dir, ev, adapter_dir=adapter, tokenizer_dir=base_dir)
    if finetuned and finetuned.get("gguf"):
        return measure_gguf(run_dir, label, Path(finetuned["gguf"]), ev, recipe.deploy, tokenizer_dir=base_dir)
    lora = Path(finetuned["lora_gguf"]) if finetuned else None
    return measure_gguf(run_dir, label, ensure_base_gguf(base_dir), ev, recipe.deploy, tokenizer_dir=base_dir,
                     lora_path=lora)


@task(name="locate-finetuned")
def locate_finetuned(run_dir: str, state: str = "given") -> dict:
    """What a finetune run folder offers to evaluate (merged / adapter / GGUFs) and its gate verdicts.

    Raises:
        FileNotFoundError: the folder has neither a merged model nor a LoRA adapter.
    """
    run = RunFolder(run_dir)
    has_merged, has_adapter = (run.merged_dir / "config.json").exists(), (run.lora_dir / "adapter_config.json").exists()
    if not has_merged and not has_adapter:
        raise FileNotFoundError(f"{run}: no merged model (merged/config.json) or adapter (lora/adapter_config.json)")
    serve_type = json.loads(run.recipe_json.read_text())["export"]["serve_type"] if run.recipe_json.exists() \
        else "q8_0"
    gguf = run.gguf(serve_type)
    gates = json.loads(run.complete_marker.read_text()).get("gates", []) if run.is_complete() else []
    return {"run_dir": str(run), "state": state, "model_dir": str(run.merged_dir) if has_merged else None,
            "adapter_dir": None if has_merged else str(run.lora_dir), "gguf": str(gguf) if gguf.exists() else None,
            "lora_gguf": str(run.lora_gguf) if run.lora_gguf.exists() else None, "gates": gates,
            # None: a folder without gate verdicts (an adapter trained outside the finetune flow)
            "gates_passed": all(g["passed"] for g in gates) if gates else None}


@task(name="require-finished-finetune")
def require_finished_finetune(run_dir: str, state: str, message: str | None = None) -> str:
    """The fine-tune leg's run folder, once its report is written. Failed gates are a verdict, not an error:
    the folder is complete and the decision reads them.

    Raises:
        RuntimeError: the finetune run stopped before writing its report.
    """
    if not RunFolder(run_dir).is_complete():
        raise RuntimeError(f"finetune run {run_dir} ended {state} before its report: {message}")
    return run_dir
