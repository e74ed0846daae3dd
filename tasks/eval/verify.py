"""Verify prompts against a deployed model (seed 003's verify_model.py): ask each prompt of an eval file of
any OpenAI-compatible server (llama-server, Ollama's /v1, vLLM, a hosted API) and score it pass/fail with
its task type (data/gerbil-verify.jsonl: keyword rows, every keyword must appear).

    slipway verify --base-url http://127.0.0.1:8080/v1 --model gerbil --eval-file data/gerbil-verify.jsonl
    verify_endpoint(base_url, model, eval_file)   # the deploy step calls this on the server it started

Greedy (temperature 0), through the `openai` client (tasks/eval/runners.py EndpointRunner).
"""

from __future__ import annotations

from pathlib import Path

from blocks.llm import OpenAICompatibleEndpoint
from tasks.data.evalfile import load_eval_file, to_chat_row
from tasks.eval.metrics import score_row
from tasks.eval.runners import EndpointRunner, requests_from_rows
from tasks.markdown import pct
from tasks.run import RunFolder, read_json
from tasks.tasktypes import task_type


def verify_endpoint(base_url: str, model: str, eval_file: str | Path, system_prompt: str = "",
                    max_tokens: int = 256, api_key: str | None = None, concurrency: int = 2,
                    extra_body: dict | None = None, task: str | None = "keyword") -> dict:
    """Ask every prompt of `eval_file` (rows without a `task` are `task`'s); returns {"passed", "total",
    "results": [{id, prompt, passed, metric, score, missing, error, answer}]}.

    Raises:
        tasks.data.evalfile.EvalFileError: a bad line of the eval file, naming file and line.
    """
    rows = [to_chat_row(row, system_prompt) for row in load_eval_file(Path(eval_file), task)]
    endpoint = OpenAICompatibleEndpoint(base_url=base_url, model=model, timeout_s=300,
                                        extra_body=extra_body or {}, **({"api_key": api_key} if api_key else {}))
    completions = EndpointRunner(endpoint, model, max_tokens, concurrency=concurrency).run(requests_from_rows(rows))
    results = []
    for row, completion in zip(rows, completions):
        kind = task_type(row["task"])
        scores = score_row(row, completion.text, None, completion.tool_calls)
        passed = completion.error is None and scores[kind.primary_metric] == 1.0
        results.append({"id": row["id"], "prompt": row["messages"][-1]["content"], "passed": passed,
                        "metric": kind.primary_metric, "score": scores[kind.primary_metric],
                        "missing": scores.get("missing"), "error": completion.error or scores.get("error"),
                        "answer": completion.text})
    return {"base_url": base_url, "model": model, "eval_file": str(eval_file),
            "passed": sum(r["passed"] for r in results), "total": len(results), "results": results}


def render_lines(verify: dict) -> list[str]:
    """A pass/fail table, one line per prompt."""
    lines = [f"Verify prompts (`{verify['eval_file']}`) against `{verify['model']}` at {verify['base_url']}: "
             f"**{verify['passed']}/{verify['total']} passed** ({pct(verify['passed'] / max(verify['total'], 1))}).",
             "", "| # | prompt | result | missing / error |", "|---|---|---|---|"]
    for i, r in enumerate(verify["results"], start=1):
        why = r["error"] or (", ".join(f"`{k}`" for k in r["missing"]) if r.get("missing") else "")
        prompt = r["prompt"].replace("|", "\\|")[:90]
        lines.append(f"| {i} | {prompt} | {'PASS' if r['passed'] else 'FAIL'} | {why} |")
    return lines + [""]


def render_section(run_dir) -> list[str]:
    """The report's verify section (empty when the run has no metrics/verify.json)."""
    verify = read_json(RunFolder(run_dir).verify_results, missing_ok=True)
    return ["## Verify prompts on the deployed model", "", *render_lines(verify)] if verify else []
