"""Parity: the same evaluation on every form the model ships in, on the same test rows.

  merged         transformers, the merged 16-bit folder (the reference, and the run's one transformers
                 evaluation: every other evaluation of the run is llama.cpp's, so this row is the check that
                 transformers and the GGUFs agree)
  gguf-<type>    llama.cpp server, each exported GGUF (f16, bf16, q8_0, q4_k_m)
  gguf-lora      llama.cpp server, the f16 base GGUF + the LoRA GGUF (the ADAPTER deployment)
One table with the recipe's primary metric (and the Slipstream parse and accuracy columns) of each and its
drop from `merged`: metrics/parity.json, per-row answers in metrics/predictions-parity-<label>.jsonl. Every
form is measured by the same `run_and_score` as the run's own evaluations (traced as `parity-<label>`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from prefect import task

from tasks.eval.measure import run_and_score
from tasks.eval.runners import HFRunner, check_failed_calls, llama_cpp_runner
from tasks.llamacpp.serve import answer_grammar
from tasks.tasktypes import primary_metric
from tasks.markdown import pct
from tasks.recipe import Recipe
from tasks.run import RunFolder, atomic_write_json, atomic_write_jsonl, read_jsonl, stage_timer

REFERENCE = "merged"


def parity_variants(run_dir: Path, base_dir: Path, ggufs: dict[str, str]) -> list[dict]:
    """Every shipped form of the model, in report order."""
    run = RunFolder(run_dir)
    variants = [{"label": REFERENCE, "runner": "transformers", "model": run.merged_dir, "lora": None}]
    for kind in ("f16", "bf16", "q8_0", "q4_k_m"):
        if kind in ggufs:
            variants.append({"label": f"gguf-{kind}", "runner": "llama.cpp server", "model": Path(ggufs[kind]),
                             "lora": None})
    if "lora" in ggufs and "base" in ggufs:
        variants.append({"label": "gguf-lora", "runner": "llama.cpp server (base f16 + LoRA GGUF)",
                         "model": Path(ggufs["base"]), "lora": Path(ggufs["lora"])})
    return variants


def _size(v: dict) -> int:
    paths = [v["model"]]
    paths += [v["lora"]] if v["lora"] else []
    files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*.safetensors"))]
    return sum(f.stat().st_size for f in files)


def measure_variant(run_dir: Path, v: dict, rows: list[dict], max_new_tokens: int, batch_size: int,
                    parallel: int, metric: str, max_failed_calls: int = 0, grammar_file: Path | None = None) -> dict:
    """One row of the parity table: the variant's runner over the rows, scored by `run_and_score`. A llama.cpp
    row is served under `grammar_file` (deploy.constrain_output) like the run's other evaluations;
    transformers generate has no GBNF, so the reference row is unconstrained (the table says so).

    Raises:
        FailedCalls: more failed calls than `max_failed_calls` (eval.max_failed_calls): a failed call would
            read as a drop of the format.
    """
    run = RunFolder(run_dir)
    label = f"parity-{v['label']}"
    constrained = grammar_file is not None and not v["runner"].startswith("transformers")
    with contextlib.ExitStack() as stack:
        if v["runner"].startswith("transformers"):
            runner = HFRunner(Path(v["model"]), label, max_new_tokens, batch_size)
        else:
            runner = stack.enter_context(llama_cpp_runner(v["model"], run.server_log(label), label,
                                                          max_new_tokens, parallel=parallel, lora_path=v["lora"],
                                                          grammar_file=grammar_file))
        summary, records = run_and_score(runner, rows, run.name)
    atomic_write_jsonl(run.predictions(label), records)
    check_failed_calls(label, [r.get("call_error") for r in records], max_failed_calls,
                       f"eval.max_failed_calls is {max_failed_calls}; every call in {run.predictions(label)}")
    return {"label": v["label"], "runner": v["runner"], "artifact": str(v["model"]) + (f" + {v['lora'].name}" if v["lora"] else ""),
            "bytes": _size(v), metric: summary.get(metric), "grammar_constrained": constrained,
            # Slipstream columns; other task types (Fledgling tracks) have none of them and show '–'.
            **{k: summary.get(k) for k in ("strict_parse", "anchor_accuracy", "src_dst_accuracy",
                                                          "rows", "failed_calls", "generated_tokens",
                                                          "tokens_per_second")}}


@task(name="measure-parity")
def measure_parity(run_dir: Path, base_dir: Path, recipe: Recipe, ggufs: dict[str, str]) -> dict:
    """The parity table over the first export.parity_rows test rows (metrics/parity.json)."""
    run = RunFolder(run_dir)
    rows = read_jsonl(run.split("test"))[:recipe.export.parity_rows]
    if not rows:
        return {}
    with stage_timer(run, "parity"):
        metric = primary_metric(recipe)
        grammar = answer_grammar(run, recipe.deploy, recipe.task)
        table = [measure_variant(run, v, rows, recipe.eval.max_new_tokens, recipe.eval.batch_size,
                                 recipe.deploy.parallel, metric, recipe.eval.max_failed_calls, grammar)
                 for v in parity_variants(run, base_dir, ggufs)]
    ref = next(r for r in table if r["label"] == REFERENCE)
    for r in table:
        r["drop"] = round(ref[metric] - r[metric], 4)
    result = {"rows": len(rows), "reference": REFERENCE, "metric": metric,
              "chosen": f"gguf-{recipe.export.serve_type}", "max_drop": recipe.eval.max_quant_drop, "variants": table}
    atomic_write_json(run.parity, result)
    return result


def _constraint_note(variants: list[dict]) -> list[str]:
    """Under deploy.constrain_output the llama.cpp rows answer under the task's grammar; transformers cannot."""
    constrained = [v["label"] for v in variants if v.get("grammar_constrained")]
    free = [v["label"] for v in variants if not v.get("grammar_constrained")]
    if not constrained:
        return []
    return ["", f"Grammar-constrained (deploy.constrain_output, the run's answer grammar): {', '.join(constrained)}; "
            f"unconstrained: {', '.join(free) or 'none'} (transformers generate takes no GBNF grammar), so the "
            "strict-parse column compares the constrained rows with each other, and the drop from the reference "
            "includes what the grammar changed."]


def render_section(run_dir: Path) -> list[str]:
    """Report lines for metrics/parity.json (empty when the run has none)."""
    path = RunFolder(run_dir).parity
    if not path.exists():
        return []
    p = json.loads(path.read_text())
    lines = ["## Parity across formats", "",
             f"The same greedy evaluation on the first {p['rows']} test rows for every shipped form; drop = "
             f"{p['reference']} {p['metric'].replace('_', ' ')} minus the form's (the chosen artifact "
             f"`{p['chosen']}` may drop at most {pct(p['max_drop'])} on the full test split: gate "
             "quantization-verified).", *_constraint_note(p["variants"]), "",
             f"| form | runner | size | {p['metric'].replace('_', ' ')} | strict parse | anchor acc. | src/dst acc. "
             "| drop | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in p["variants"]:
        name = f"**{r['label']}**" if r["label"] == p["chosen"] else r["label"]
        lines.append(f"| {name} | {r['runner']} | {r['bytes'] / 1e6:.0f} MB | {pct(r.get(p['metric']))} | "
                     f"{pct(r['strict_parse'])} | "
                     f"{pct(r['anchor_accuracy'])} | {pct(r['src_dst_accuracy'])} | {100 * r['drop']:+.1f} pts | "
                     f"{r['tokens_per_second'] or '–'} |")
    return lines + [""]
