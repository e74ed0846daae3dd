"""Release: a model card (like the seed's: what it does, training table, formats, usage with transformers /
llama.cpp / Ollama, evaluation), a dataset card, and a release folder laid out as a Hub repo.

    run/release/model/     README.md (model card), Modelfile, adapter/, merged/, gguf/ (+ manifest.json)
    run/release/dataset/   README.md (dataset card), train/val/test.jsonl
Artifacts are hard links into the run folder (no copies of gigabytes). Publishing (only when every gate
passed) copies the release into `release.folder` and/or pushes it to the Hugging Face Hub with the token
from a `HuggingFaceHubCredentials` block.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml
from prefect import task

from blocks.hub import HuggingFaceHubCredentials
from tasks.data.prepare import mix_lines
from tasks.llamacpp.serve import answer_grammar
from tasks.markdown import pct
from tasks.ollama.modelfile import Modelfile
from tasks.release.report import test_rows
from tasks.recipe import REPO_ROOT, Recipe
from tasks.redact import redact
from tasks.run import SPLITS, RunFolder, atomic_write_json, atomic_write_text, read_json, read_jsonl, stage_timer

# Where an embedded/offline base model comes from on the Hub (for the card's `base_model`).
UPSTREAM_BASE = {"SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma-3-270m": "google/gemma-3-270m"}
# The published dataset behind a vendored data file (data/README.md).
UPSTREAM_DATA = {"slipstream-tqt.jsonl": "anthonym21/slipstream-tqt",
                 "slipstream-datafactory.jsonl": "anthonym21/slipstream-tqt"}
# The repository's data/README.md: licence and attribution of the vendored data (the dataset card quotes it).
DATA_README = REPO_ROOT.joinpath("data", "README.md")
SLIPSTREAM_CITATION = """@misc{maio2025slipstream,
  title={Slipstream: Semantic Quantization for Efficient Multi-Agent Coordination},
  author={Maio, Anthony},
  year={2025},
  doi={10.5281/zenodo.18063451}
}"""


FRAMEWORKS = {"trl": "TRL + PEFT", "unsloth": "Unsloth + TRL",
              "together": "Together AI fine-tuning (LoRA), adapter downloaded"}


def _front_matter(meta: dict) -> str:
    return "---\n" + yaml.safe_dump({k: v for k, v in meta.items() if v is not None}, sort_keys=False) + "---\n"


def base_model_id(recipe: Recipe) -> str | None:
    if recipe.model.source not in ("hf", "local"):   # an embedded GGUF: the model it was converted from
        return UPSTREAM_BASE.get(recipe.model.name)
    return None if Path(recipe.model.name).exists() else recipe.model.name


def model_card(recipe: Recipe, run_dir: RunFolder | Path, results: dict[str, dict], training: dict,
               repo_name: str) -> str:
    """The model card Markdown; every number is read from the run folder or passed in."""
    run = RunFolder(run_dir)
    manifest = read_json(run.gguf_manifest)
    parity = read_json(run.parity, missing_ok=True)
    tcheck = read_json(run.template_check, missing_ok=True)
    modelfile = Modelfile.read(run.modelfile)
    base_id = base_model_id(recipe) or recipe.model.name
    dataset_id = UPSTREAM_DATA.get(Path(recipe.data.source).name)
    test = read_jsonl(run.split("test"), missing_ok=True)
    example = test[0]["messages"] if test else None
    answer = next(iter(read_jsonl(run.predictions("parity-merged"), missing_ok=True)), {}).get("answer")
    serve = run.gguf(recipe.export.serve_type).name   # in the release, every GGUF sits in gguf/
    lines = [_front_matter({"license": recipe.release.license, "base_model": base_model_id(recipe),
                            "tags": ["slipstream", "think-quantize-transmit", "multi-agent", "lora", "gguf", "slipway"],
                            "datasets": [dataset_id] if dataset_id else None, "language": ["en"],
                            "pipeline_tag": "text-generation", "library_name": "peft"}),
             f"# {repo_name}", "",
             f"A LoRA fine-tune of [{base_id}](https://huggingface.co/{base_id}) that speaks the **Slipstream** "
             "protocol: for a natural-language request between agents it thinks, quantizes the intent to one of the "
             "UCR semantic anchors, and transmits a compact `SLIP v1` wire message (Think-Quantize-Transmit).",
             "", f"Built by Slipway's `finetune` flow, recipe `{recipe.name}`, run `{run.name}`.", ""]
    if example:
        lines += ["### Example", "", "**Input:**", "```", example[-2]["content"], "```", "",
                  "**Output** (this model, greedy):" if answer else "**Reference output:**", "```",
                  (answer or example[-1]["content"]).strip(), "```", ""]
    lines += ["## Training Details", "", "| Parameter | Value |", "|---|---|",
              f"| Base Model | {base_id} |",
              f"| Method | LoRA (rank={recipe.lora.r}, alpha={recipe.lora.alpha}, dropout={recipe.lora.dropout})"
              f"{' on a 4-bit base (QLoRA)' if recipe.model.load_in_4bit else ''} |",
              f"| Target Modules | {', '.join(f'`{m}`' for m in recipe.lora.target_modules)} |",
              f"| Epochs | {recipe.training.epochs} ({training.get('steps')} steps) |",
              f"| Learning Rate | {recipe.training.learning_rate} ({recipe.training.lr_scheduler}) |",
              f"| Batch Size | {recipe.training.batch_size * recipe.training.grad_accum} "
              f"({recipe.training.batch_size} × {recipe.training.grad_accum} grad accum) |",
              f"| Sequence Length | {recipe.training.max_length} |",
              f"| Training Examples | {training.get('train_rows')} |",
              f"| Loss | {training.get('first_loss')} → {training.get('final_loss')} |",
              f"| Hardware | {training.get('device')} ({training.get('mixed_precision')}), "
              f"{training.get('seconds')} s |",
              f"| Framework | {FRAMEWORKS[recipe.training.engine]} |",
              f"| System Prompt | `{recipe.model.system_prompt}` |", "",
              "## Available Formats", "", "| Format | File | Size | sha256 | Use Case |", "|---|---|---|---|---|"]
    uses = {"adapter": ("LoRA Adapter", "adapter/", "Load on the base with PEFT"),
            "merged": ("Merged 16-bit", "merged/", "Direct loading with transformers"),
            "lora": ("GGUF LoRA (f16)", f"gguf/{run.lora_gguf.name}", "Ollama ADAPTER / llama.cpp --lora"),
            "base": ("GGUF base (f16)", f"gguf/{run.base_gguf.name}", "The base the GGUF LoRA applies to")}
    for name, a in manifest.items():
        label, file, use = uses.get(name, (f"GGUF {name.upper()}", f"gguf/{Path(a['path']).name}",
                                           "Ollama / llama.cpp" + (" (deployed)" if name == recipe.export.serve_type else "")))
        lines.append(f"| {label} | `{file}` | {a['bytes'] / 1e6:.0f} MB | `{(a['sha256'] or '(folder)')[:16]}` | {use} |")
    lines += ["", "## Usage", "", "### With Transformers + PEFT", "", "```python",
              "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'base = AutoModelForCausalLM.from_pretrained("{base_id}")',
              'model = PeftModel.from_pretrained(base, "./adapter")',
              'tokenizer = AutoTokenizer.from_pretrained("./adapter")',
              f'messages = [{{"role": "system", "content": {json.dumps(recipe.model.system_prompt)}}},',
              '            {"role": "user", "content": "Tell bob to review my authentication code"}]',
              "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
              "return_dict=True)",
              "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=96, do_sample=False)[0]))", "```", "",
              "The merged model loads the same way without PEFT: `AutoModelForCausalLM.from_pretrained(\"./merged\")`.", "",
              "### With llama.cpp", "", "```bash", f"llama-server -m gguf/{serve} --jinja --port 8080"
              + (f" --grammar-file {run.answer_grammar.name}" if recipe.deploy.constrain_output else ""),
              "# OpenAI-compatible: POST http://127.0.0.1:8080/v1/chat/completions, temperature 0", "```", "",
              "The GGUF carries the training chat template (checked token for token, below), so `--jinja` "
              "prompts it exactly as it was trained."
              + (f" `{run.answer_grammar.name}` (GBNF) constrains every answer to the task's format, as this "
                 "model was evaluated and deployed; Ollama cannot enforce a grammar, so there its answers are "
                 "unconstrained." if recipe.deploy.constrain_output else ""), "", "### With Ollama", "",
              "The `Modelfile` in this repository was generated from the training tokenizer (TEMPLATE, SYSTEM and "
              "`PARAMETER stop` " + ", ".join(f"`{s}`" for s in modelfile.stop) + "):", "", "```bash",
              f"ollama create {repo_name} -f Modelfile",
              f'ollama run {repo_name} "Tell bob to review my authentication code"', "```", ""]
    lines += ["## Evaluation", "", f"Greedy decoding on {test_rows(results)} held-out test rows, "
              "scored with the strict Slipstream parser"
              + ("; llama.cpp outputs grammar-constrained (deploy.constrain_output)" if recipe.deploy.constrain_output
                 else "") + ".", "",
              "| model | runner | strict parse | anchor acc. | recipient (dst) acc. | src/dst acc. |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {label} | {r.get('runner')} | {pct(r.get('strict_parse'))} | {pct(r.get('anchor_accuracy'))} | "
              f"{pct(r.get('dst_accuracy'))} | {pct(r.get('src_dst_accuracy'))} |" for label, r in results.items()]
    if parity:
        lines += ["", f"Every format on the same {parity['rows']} test rows (drop = merged minus format, anchor accuracy):",
                  "", "| format | anchor acc. | drop |", "|---|---|---|"]
        lines += [f"| {v['label']} | {pct(v.get('anchor_accuracy'))} | {100 * v['drop']:+.1f} pts |" for v in parity["variants"]]
    if tcheck:
        n_ok = sum(c["passed"] for c in tcheck["checks"])
        lines += ["", f"Template check: {'passed' if tcheck['passed'] else 'FAILED'} ({n_ok}/{len(tcheck['checks'])} "
                  "checks): the deployed GGUF's chat template and the Modelfile TEMPLATE produce exactly the training "
                  "prompt tokens, and the training end-of-turn token stops generation."]
    lines += ["", "## Limitations", "",
              f"A {recipe.model.name} model trained on {training.get('train_rows')} examples: it learned the wire "
              "format, not general reasoning; check the anchor accuracy above before relying on it.", "",
              "## Citation", "", "```bibtex", SLIPSTREAM_CITATION, "```", "", "## License", "",
              f"{recipe.release.license} (the base model's licence); the training data is Apache-2.0 "
              "(see the dataset card).", ""]
    return "\n".join(lines)


def dataset_card(recipe: Recipe, run_dir: RunFolder | Path, repo_name: str) -> str:
    """The dataset card for the splits this run trained and evaluated on."""
    run = RunFolder(run_dir)
    counts = {s: len(read_jsonl(run.split(s), missing_ok=True)) for s in SPLITS}
    source_id = UPSTREAM_DATA.get(Path(recipe.data.source).name)
    total = sum(counts.values())
    size = "n<1K" if total < 1000 else "1K<n<10K" if total < 10000 else "10K<n<100K"
    lines = [_front_matter({"license": "apache-2.0", "language": ["en"], "task_categories": ["text-generation"],
                            "tags": ["slipstream", "think-quantize-transmit", "multi-agent"], "size_categories": [size],
                            "source_datasets": [source_id] if source_id else None, "pretty_name": repo_name}),
             f"# {repo_name}", "",
             f"The train / validation / test splits Slipway's `finetune` flow used for run `{run.name}` "
             f"(recipe `{recipe.name}`)" + (f", drawn from [{source_id}](https://huggingface.co/datasets/{source_id})."
                                            if source_id else "."), "",
             "| split | rows |", "|---|---|", *[f"| {s} | {n} |" for s, n in counts.items()], "",
             "## Format", "", "JSON Lines, one chat per line: `{\"messages\": [{\"role\": \"system\"|\"user\"|\"assistant\", "
             "\"content\": ...}]}`. The assistant turn is a Think-Quantize-Transmit answer (`THOUGHT:`, `QUANTIZE:`, "
             "`SLIP: SLIP v1 <src> <dst> <anchor> [payload...]`).", "",
             f"Every row carries the system prompt `{recipe.model.system_prompt}`.", "",
             "## How the splits were made", "",
             "Rows were validated with the strict Slipstream parser, deduplicated, and split over unique normalised "
             "prompts, so no prompt appears in two splits (no train/test leakage). "
             f"Seed {recipe.data.seed}; validation ratio {recipe.data.val_ratio}, test ratio {recipe.data.test_ratio}"
             + (f"; training subset of {recipe.data.train_rows} rows" if recipe.data.train_rows else "") + ".", "",
             *mix_lines(read_json(run.data_stats, missing_ok=True)), "",
             "## Source, licence and attribution", ""]
    lines += [DATA_README.read_text().split("\n", 2)[-1].strip() if DATA_README.exists() else "See the source dataset.", "",
              "## Citation", "", "```bibtex", SLIPSTREAM_CITATION, "```", ""]
    return "\n".join(lines)


def _link_tree(src: Path, dst: Path) -> None:
    """Mirror src into dst with hard links (a copy where links are impossible, e.g. across filesystems)."""
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target.unlink()
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)


def release_name(recipe: Recipe) -> str:
    if recipe.release.hub_model_repo:
        return recipe.release.hub_model_repo.split("/")[-1]
    return f"slipway-{recipe.name}-{recipe.model.name}".lower()


@task(name="write-model-card")
def write_model_card(run_dir: RunFolder | Path, recipe: Recipe, results: dict[str, dict], training: dict) -> Path:
    """run/release/{model,dataset}: cards, Modelfile and linked artifacts, laid out as Hub repos; returns the
    model folder."""
    run = RunFolder(run_dir)
    with stage_timer(run, "model-card"):
        name = release_name(recipe)
        model_dir, data_dir = run.release_model_dir, run.release_dataset_dir
        for sub, src in (("adapter", run.lora_dir), ("merged", run.merged_dir), ("gguf", run.gguf_dir)):
            _link_tree(src, model_dir / sub)
        mf = Modelfile.read(run.modelfile)
        # In the release the GGUFs sit in ./gguf beside the Modelfile; a registry FROM stays as it is.
        mf.from_ = mf.from_.replace("../gguf/", "./gguf/")
        mf.adapter = mf.adapter.replace("../gguf/", "./gguf/") if mf.adapter else None
        atomic_write_text(model_dir / "Modelfile", mf.render(f"{name}: ollama create {name} -f Modelfile"))
        grammar = answer_grammar(run, recipe.deploy, recipe.task)
        if grammar is not None:   # the serving rule ships with the model (the card's llama-server command)
            atomic_write_text(model_dir / grammar.name, grammar.read_text())
        atomic_write_text(model_dir / "README.md", model_card(recipe, run, results, training, name))
        data_dir.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            target = data_dir / run.split(split).name
            target.unlink(missing_ok=True)
            os.link(run.split(split), target)
        atomic_write_text(data_dir / "README.md", dataset_card(recipe, run, f"{name}-data"))
    return model_dir


class PublishError(RuntimeError):
    """The Hub refused or failed an upload; the message is the Hub's, with the token redacted."""


def _push_to_hub(recipe: Recipe, run: RunFolder) -> dict:
    """Create the repos and upload the release folders.

    Raises:
        PublishError: any Hub error, its text redacted (a Hub or proxy may quote the token back); the
            huggingface_hub exception, which carries the request, is not chained.
    """
    creds = HuggingFaceHubCredentials.load(recipe.release.hub_token_block)
    api = creds.api()
    pushed = {}
    for repo_id, kind, folder in ((recipe.release.hub_model_repo, "model", run.release_model_dir),
                                  (recipe.release.hub_dataset_repo, "dataset", run.release_dataset_dir)):
        if not repo_id:
            continue
        error = None
        try:
            api.create_repo(repo_id, repo_type=kind, private=recipe.release.private, exist_ok=True)
            info = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type=kind,
                                     commit_message=f"Slipway run {run.name}")
        except Exception as exc:   # HfHubHTTPError, OSError, ValueError ...: all may quote the request
            error = PublishError(f"Hub push of {kind} {repo_id} failed: "
                                 f"{redact(f'{type(exc).__name__}: {exc}', creds.token.get_secret_value())}")
        if error is not None:
            raise error   # raised outside the except block: the original is not attached as context
        pushed[kind] = {"repo_id": repo_id, "commit": getattr(info, "oid", None)}
    return pushed


@task(name="publish-release", retries=2, retry_delay_seconds=10)  # I/O: a file copy or Hub uploads
def publish_release(run_dir: RunFolder | Path, recipe: Recipe, gates: list[dict]) -> dict:
    """Copy the release to release.folder and/or push it to the Hub, only when every gate passed
    (release/publish.json); returns that record."""
    run = RunFolder(run_dir)
    failed = [g["name"] for g in gates if not g["passed"]]
    cfg = recipe.release
    record: dict = {"folder": None, "hub": None}
    if failed:
        record["skipped"] = f"gates failed: {', '.join(failed)}"
    else:
        if cfg.folder:
            target = (REPO_ROOT / cfg.folder if not Path(cfg.folder).is_absolute() else Path(cfg.folder)) / release_name(recipe)
            _link_tree(run.release_model_dir, target)
            _link_tree(run.release_dataset_dir, target.with_name(target.name + "-data"))
            record["folder"] = str(target)
        if cfg.hub_token_block:
            record["hub"] = _push_to_hub(recipe, run)
    atomic_write_json(run.publish_record, record)
    return record
