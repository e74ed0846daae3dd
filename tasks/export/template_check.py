"""The `template-verified` gate: the deployed artifact prompts the model with exactly the training tokens
and stops on the training end-of-turn token.

For a few sample conversations from the test split (and one two-turn conversation made from them):
  * llama.cpp: the GGUF's embedded chat template, applied by llama-server (`POST /apply-template`) and
    tokenized by it (`POST /tokenize`, special tokens added and parsed as for a chat request), must equal
    the prompt tokens `tasks.train.worker.tokenize_row` produced in training;
  * Ollama: the Modelfile TEMPLATE, rendered with Ollama's rules (tasks.ollama.prompt; SYSTEM filled in
    when the conversation has none) and tokenized by the same server, must equal them too;
  * stop: forcing the training end-of-turn token as the first generated token must end the generation
    (`stop_type` "eos", nothing emitted), and the Modelfile's `PARAMETER stop` must name that token.
A failure names the sample and the first differing token (index, ids and pieces on both sides).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prefect import task

from tasks.llamacpp.serve import llama_server
from tasks.markdown import cell
from tasks.ollama.gotemplate import GoTemplateError
from tasks.ollama.modelfile import Modelfile, deployed_artifact
from tasks.ollama.prompt import render_ollama_chat
from tasks.recipe import Recipe
from tasks.run import RunFolder, atomic_write_json, read_json, read_jsonl, stage_timer
from tasks.train.worker import tokenize_row

GATE_NAME = "template-verified"


class TemplateCheckError(RuntimeError):
    """llama-server refused a request of the check (e.g. it cannot tokenize the text); a failed check."""


@dataclass(frozen=True)
class Sample:
    name: str
    messages: list[dict]           # ends with the gold assistant answer
    prompt_ids: list[int]          # the training prompt tokens (everything before the answer)
    end_of_turn: int               # the special token that closed the answer in training


def _post(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        raise TemplateCheckError(f"llama-server {path} answered {exc.code}: {detail}") from None


def training_sample(name: str, messages: list[dict], tokenizer) -> Sample:
    """Prompt tokens and end-of-turn token exactly as training tokenized this conversation."""
    tok = tokenize_row({"messages": messages}, tokenizer, max_length=1 << 30)
    n_prompt = tok["completion_mask"].index(1)
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    eot = next((i for i in tok["input_ids"][n_prompt:] if i in special), None)
    if eot is None:
        raise TemplateCheckError(f"{name}: the trained answer ends with no special token; nothing can stop generation")
    return Sample(name, messages, tok["input_ids"][:n_prompt], eot)


def sample_conversations(rows: list[dict], n: int, tokenizer) -> list[Sample]:
    """The first n test rows, plus one two-turn conversation (previous answers are rendered too)."""
    samples = [training_sample(f"test row {i}", r["messages"], tokenizer) for i, r in enumerate(rows[:n])]
    if len(rows) >= 2:
        first, second = rows[0]["messages"], rows[1]["messages"]
        samples.append(training_sample("two-turn (rows 0+1)", first + [m for m in second if m["role"] != "system"],
                                       tokenizer))
    return samples


def first_difference(want: list[int], got: list[int], pieces) -> str | None:
    """None when equal; else 'token i: training 9690 'system' / deployed 1 '<|im_start|>' (after '...')'."""
    if want == got:
        return None
    i = next((k for k, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    show = lambda ids, k: f"{ids[k]} {pieces([ids[k]])!r}" if k < len(ids) else "(end of prompt)"
    context = pieces(want[max(0, i - 6):i])
    return (f"token {i}: training has {show(want, i)}, deployed has {show(got, i)} (after {context!r}; "
            f"{len(want)} vs {len(got)} tokens)")


def _tokenize(base: str, text: str) -> list[int]:
    # A chat request is tokenized with special tokens added (BOS if the GGUF asks) and parsed.
    return _post(base, "/tokenize", {"content": text, "add_special": True, "parse_special": True})["tokens"]


def check_gguf_template(base: str, samples: list[Sample], pieces) -> list[dict]:
    """The GGUF's embedded template, applied and tokenized by llama-server, against the training tokens."""
    out = []
    for s in samples:
        try:
            prompt = _post(base, "/apply-template", {"messages": s.messages[:-1]})["prompt"]
            diff = first_difference(s.prompt_ids, _tokenize(base, prompt), pieces)
        except TemplateCheckError as exc:   # e.g. a GGUF vocabulary llama.cpp cannot tokenize with
            diff = str(exc)
        out.append({"check": "gguf chat template", "sample": s.name, "passed": diff is None, "detail": diff or
                    f"{len(s.prompt_ids)} tokens identical"})
    return out


def check_modelfile_template(base: str, samples: list[Sample], modelfile: Modelfile, pieces) -> list[dict]:
    """The Modelfile TEMPLATE as Ollama renders it (with and without SYSTEM filling in), tokenized by llama.cpp."""
    out = []
    for s in samples:
        variants = [("", s.messages[:-1])]
        if s.messages[0]["role"] == "system" and modelfile.system is not None:
            variants.append((" (system from SYSTEM)", s.messages[1:-1]))
        for suffix, messages in variants:
            try:
                text = render_ollama_chat(modelfile.template or "{{ .Prompt }}", messages, modelfile.system)
                diff = first_difference(s.prompt_ids, _tokenize(base, text), pieces)
            except GoTemplateError as exc:
                diff = f"TEMPLATE does not render: {exc}"
            except TemplateCheckError as exc:
                diff = str(exc)
            out.append({"check": "Modelfile TEMPLATE", "sample": s.name + suffix, "passed": diff is None,
                        "detail": diff or f"{len(s.prompt_ids)} tokens identical"})
    return out


def check_stop(base: str, sample: Sample, modelfile: Modelfile | None, pieces) -> list[dict]:
    """Forcing the training end-of-turn token must end generation; the Modelfile must stop on it too."""
    eot_text = pieces([sample.end_of_turn])
    # logit_bias +100 makes the end-of-turn token the greedy choice for the first generated token.
    resp = _post(base, "/completion", {"prompt": sample.prompt_ids, "n_predict": 4, "temperature": 0,
                                       "logit_bias": [[sample.end_of_turn, 100.0]], "cache_prompt": False})
    stopped = resp.get("stop_type") == "eos" and resp.get("tokens_predicted") == 1 and resp.get("content") == ""
    out = [{"check": "end-of-turn stops generation", "sample": sample.name, "passed": stopped,
            "detail": f"{eot_text!r} ({sample.end_of_turn}) ends generation" if stopped else
            f"after forcing {eot_text!r} ({sample.end_of_turn}) llama.cpp went on: stop_type="
            f"{resp.get('stop_type')!r}, {resp.get('tokens_predicted')} tokens, content={resp.get('content')!r}"}]
    if modelfile is not None:
        ok = eot_text in modelfile.stop
        out.append({"check": "Modelfile PARAMETER stop", "sample": "-", "passed": ok,
                    "detail": f"stop {modelfile.stop} includes {eot_text!r}" if ok else
                    f"stop {modelfile.stop} does not include the training end-of-turn token {eot_text!r}"})
    return out


def run_template_check(model_path: Path, rows: list[dict], tokenizer, modelfile: Modelfile | None, log_path: Path,
                       lora_path: Path | None = None, n_samples: int = 3) -> dict:
    """Serve the deployed artifact with llama.cpp and run every check; returns {"passed", "checks", ...}."""
    samples = sample_conversations(rows, n_samples, tokenizer)
    pieces = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
    with llama_server(model_path, log_path, alias="template-check", parallel=1, lora_path=lora_path) as server:
        base = server.base_url.removesuffix("/v1")
        checks = check_gguf_template(base, samples, pieces)
        if modelfile is not None:
            checks += check_modelfile_template(base, samples, modelfile, pieces)
        checks += check_stop(base, samples[0], modelfile, pieces)
    failed = [c for c in checks if not c["passed"]]
    return {"passed": not failed, "artifact": str(model_path), "lora": str(lora_path) if lora_path else None,
            "samples": len(samples), "checks": checks,
            "first_failure": f"{failed[0]['check']}, {failed[0]['sample']}: {failed[0]['detail']}" if failed else None}


def gate(result: dict) -> dict:
    """The gate record (same shape as tasks.eval.gates.Gate.as_dict())."""
    n = len(result["checks"])
    failed = sum(not c["passed"] for c in result["checks"])
    return {"name": GATE_NAME, "passed": result["passed"],
            "threshold": "deployed prompt tokens == training tokens; end-of-turn token stops generation",
            # escaped: gate records are rendered as Markdown table rows (report, Prefect artifact)
            "observed": f"{n - failed}/{n} checks passed" + (f"; {cell(result['first_failure'])}" if failed else "")}


def check_run(run_dir: RunFolder | Path, n_samples: int = 3) -> dict:
    """Check the run folder's deploy/Modelfile and the GGUF it names, as they are on disk now; the result is
    also written to metrics/template-check.json.

    Raises:
        ModelfileError: the Modelfile names no local GGUF to serve.
        TemplateCheckError: a trained answer ends with no special token (nothing could stop generation).
        ServerError: llama-server did not come up.
    """
    from transformers import AutoTokenizer

    run = RunFolder(run_dir)
    modelfile = Modelfile.read(run.modelfile)
    model, lora = deployed_artifact(run, modelfile)
    tokenizer = AutoTokenizer.from_pretrained(run.lora_dir)
    # Conversations that end with an answer: test rows with a gold answer, else (an eval file of prompts
    # only, e.g. keyword verify prompts) the training rows, which are exactly what the template must reproduce.
    rows = [r for r in read_jsonl(run.split("test")) if r["messages"][-1]["role"] == "assistant"]
    result = run_template_check(model, rows or read_jsonl(run.split("train")), tokenizer, modelfile,
                                run.server_log("template"), lora_path=lora, n_samples=n_samples)
    atomic_write_json(run.template_check, result)
    return result


@task(name="verify-chat-template")
def verify_chat_template(run_dir: RunFolder | Path, recipe: Recipe) -> dict:
    """The template-verified gate record for the run's Modelfile and deployed GGUF (metrics/template-check.json)."""
    with stage_timer(run_dir, "template-check"):
        result = check_run(run_dir, recipe.export.template_samples)
    return gate(result)


def render_section(run_dir: RunFolder | Path) -> list[str]:
    """Report lines for metrics/template-check.json (empty when the run has none)."""
    result = read_json(RunFolder(run_dir).template_check, missing_ok=True)
    if result is None:
        return []
    lines = ["## Template check", "",
             f"Deployed artifact `{Path(result['artifact']).name}`"
             + (f" + adapter `{Path(result['lora']).name}`" if result.get("lora") else "")
             + f", {result['samples']} sample conversations: **{'PASS' if result['passed'] else 'FAIL'}**", "",
             "| check | sample | verdict | detail |", "|---|---|---|---|"]
    lines += [f"| {c['check']} | {c['sample']} | {'PASS' if c['passed'] else '**FAIL**'} | "
              f"{cell(c['detail'])} |" for c in result["checks"]]
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a run's deployed chat template against training.")
    parser.add_argument("run_dir", type=RunFolder)
    parser.add_argument("--samples", type=int, default=3)
    args = parser.parse_args(argv)
    result = check_run(args.run_dir, args.samples)
    print(json.dumps(gate(result), indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
