"""`slipway`: the command line. Each command is a thin call of one flow or task.

    slipway run slipstream --set training.max_steps=5          # the finetune flow (what `make demo` does)
    slipway run gerbil --dry-run                               # downloads, memory estimate, chat template
    slipway evaluate fledgling-structured                      # the Fledgling decision flow
    slipway synthesize --set method=templates -n 2000          # training records
    slipway serve runs/<run>                                   # serve a run's deployed GGUF with llama.cpp
    slipway check-template runs/<run>                          # re-check its Modelfile and GGUF
    slipway convert in.jsonl out.jsonl --to together           # convert a chat dataset's format
    slipway tracks --layout parallel                           # several recipes on GPU work pools (flows/tracks.py)
    slipway verify --base-url URL --model NAME --eval-file F   # verify prompts on any OpenAI-compatible server
    slipway deploy --gpus 4                                    # pools, blocks and deployments on PREFECT_API_URL

Installed by `pip install -e .` ([project.scripts]); `python -m flows.cli` is the same command. Bad input
(a recipe, an eval file, a synthesis config) stops with one message and exit status 2 before Prefect starts;
a flow run that fails exits 1 after printing where its report is.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Literal, NoReturn

import typer
import yaml
from prefect.states import State
from pydantic import ValidationError

from deployments.up import DEFAULT_HOST_GPUS, PoolsError, stand_up
from flows.evaluate import evaluate as evaluate_flow
from flows.finetune import finetune
from flows.synthesize import synthesize as synthesize_flow
from flows.tracks import ALL_GPUS_POOL, FLEDGLING_TRACKS, PARALLEL_POOLS
from flows.tracks import tracks as tracks_flow
from tasks.data.evalfile import EvalFileError, load_eval_file
from tasks.data.formats import FORMATS, FormatError, convert_file
from tasks.eval.verify import render_lines, verify_endpoint
from tasks.export import template_check
from tasks.llamacpp import serve as llamacpp_serve
from tasks.names import InvalidName, check_slug
from tasks.models.hub import ModelSourceError, check_model_source
from tasks.recipe import DATA_DIR, REPO_ROOT, RecipeError
from tasks.run import RunFolder, TracksFolder, find_run_of_flow_run
from tasks.start import validate_recipe
from tasks.synth.llm import SynthesisConfig
from tasks.tracks.dispatch import Layout, TrackFlow

app = typer.Typer(help="Slipway: fine-tune a small model that beats its prompted baseline, and ship it.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

Overrides = Annotated[list[str] | None, typer.Option(
    "--set", metavar="FIELD=VALUE", help="Override a field, e.g. --set data.eval_rows=8 (repeatable; the value "
    "is read as YAML).")]
OutputRoot = Annotated[Path, typer.Option(help="Where run folders are created.")]
Format = Literal[FORMATS]


def parse_overrides(items: list[str] | None) -> dict:
    """`--set a.b=1 --set c=x` as {"a.b": 1, "c": "x"} (each value read as YAML)."""
    return {field: yaml.safe_load(value) for field, _, value in (item.partition("=") for item in items or [])}


def stop(message: str) -> NoReturn:
    """Bad input: one message, no traceback, exit status 2 (for a flow, before Prefect starts)."""
    typer.echo(message, err=True)
    raise typer.Exit(2)


def check_input(recipe: str, overrides: dict, eval_file: Path | None = None, run_name: str | None = None,
                check_source: bool = True) -> None:
    """The recipe, run name (and an eval file) as the flow will read them; a bad one stops here, before
    Prefect starts."""
    try:
        if run_name is not None:
            check_slug("run name", run_name)
        cfg = validate_recipe.fn(recipe, overrides)   # the flow's own first task, run before Prefect starts
        if eval_file:
            load_eval_file(eval_file, cfg.task)
        if check_source:
            # A Hub base that is gated, missing or unreachable (and not cached) stops here, in seconds.
            check_model_source(cfg.model)
    except (RecipeError, EvalFileError, InvalidName, ModelSourceError) as exc:
        stop(str(exc))


def run_folder_of(state: State, output_root: Path, resume: Path | None = None) -> RunFolder | None:
    """The folder the flow run really used: its return value, or (failed) the resumed folder or the one
    that recorded this flow run as an attempt. Never a name guessed before the run: another run started
    in the same second may have taken it."""
    if state.is_completed():
        return RunFolder(Path(state.result()))
    if resume:
        return RunFolder(resume)
    return find_run_of_flow_run(output_root, str(state.state_details.flow_run_id))


def default_run_name(recipe: str, kind: str = "") -> str:
    """<recipe>-<UTC timestamp>, or <recipe>-<kind>-<UTC timestamp>."""
    return f"{Path(recipe).stem}{'-' + kind if kind else ''}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


def finish(state: State, report: Path | None) -> None:
    """The closing lines of every flow command: where the report is, and whether the run failed."""
    if report and report.exists():
        typer.echo(f"\nReport: {report}")
    else:
        typer.echo("\nNo report: the run stopped early" + (f" ({report.parent})" if report else ""))
    if state.is_failed():
        typer.echo(f"Run failed: {state.message}", err=True)
        raise typer.Exit(1)


@app.command()
def run(recipe: Annotated[str, typer.Argument(help="A recipe name in recipes/ or a YAML path.")] = "slipstream",
        set_: Overrides = None,
        run_name: Annotated[str | None, typer.Option(help="The run folder's name (default: <recipe>-<UTC time>).")]
        = None,
        resume: Annotated[Path | None, typer.Option(help="A run folder that did not complete: run it again, "
                                                    "training from its last checkpoint.")] = None,
        output_root: OutputRoot = REPO_ROOT / "runs",
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be downloaded, the training "
                                              "memory estimate and the chat template; run nothing.")] = False) -> None:
    """Fine-tune, export, serve, evaluate and gate one recipe (the finetune flow)."""
    overrides = parse_overrides(set_)
    check_input(recipe, overrides, run_name=run_name, check_source=not dry_run)   # a dry run reports the source instead
    if dry_run:
        from tasks.models.plan import dry_run_plan, render_plan

        try:
            typer.echo(render_plan(dry_run_plan(validate_recipe.fn(recipe, overrides))))
        except ModelSourceError as exc:
            stop(str(exc))
        return
    state = finetune(recipe=recipe, overrides=overrides, output_root=str(output_root), run_name=run_name,
                     resume_from=str(resume) if resume else None, return_state=True)
    run_dir = run_folder_of(state, output_root, resume)
    finish(state, run_dir.report_md if run_dir else None)


@app.command()
def evaluate(recipe: Annotated[str, typer.Argument(help="A recipe with a `baseline` section (the LLM).")]
             = "fledgling-structured",
             eval_file: Annotated[Path | None, typer.Option(help="JSONL eval file (docs/eval-file-format.md) "
                                                            "instead of the recipe's test split.")] = None,
             finetuned_run: Annotated[Path | None, typer.Option(help="An existing finetune run folder to compare "
                                                                "(no new fine-tune then).")] = None,
             set_: Overrides = None,
             run_name: Annotated[str | None, typer.Option(help="The run folder's name "
                                                          "(default: <recipe>-eval-<UTC time>).")] = None,
             langfuse_block: Annotated[str | None, typer.Option(help="A saved LangfuseCredentials block "
                                                                "(default: LANGFUSE_* variables).")] = None,
             finetune_deployment: Annotated[str | None, typer.Option(help="Run the fine-tune leg as this "
                                                                     "deployment, e.g. finetune/slipstream-gpu.")]
             = None,
             output_root: OutputRoot = REPO_ROOT / "runs") -> None:
    """Measure the SLM against an LLM on a track and decide keep-llm / swap-now / fine-tune (the evaluate flow)."""
    overrides = parse_overrides(set_)
    check_input(recipe, overrides, eval_file, run_name=run_name)
    state = evaluate_flow(recipe=recipe, eval_file=str(eval_file) if eval_file else None,
                          finetuned_run=str(finetuned_run) if finetuned_run else None, overrides=overrides,
                          output_root=str(output_root), run_name=run_name, langfuse_block=langfuse_block,
                          finetune_deployment=finetune_deployment, return_state=True)
    run_dir = run_folder_of(state, output_root)
    finish(state, run_dir.report_md if run_dir else None)


@app.command()
def synthesize(config: Annotated[Path | None, typer.Option(exists=True, dir_okay=False,
                                                         help="A YAML file of SynthesisConfig fields.")] = None,
               endpoint: Annotated[str | None, typer.Option(help="The endpoint Block document, e.g. "
                                                            "openai-compatible-endpoint/deepseek.")] = None,
               n: Annotated[int | None, typer.Option("-n", help="Records to request.")] = None,
               set_: Overrides = None,
               output_dir: Annotated[Path | None, typer.Option(help="A new or empty folder "
                                                               "(default: runs/synth-<UTC time>).")] = None) -> None:
    """Generate Slipstream training records with an LLM endpoint or slot templates (the synthesize flow)."""
    raw = yaml.safe_load(config.read_text()) if config else {}
    raw |= {k: v for k, v in (("endpoint", endpoint), ("n", n)) if v is not None} | parse_overrides(set_)
    try:
        cfg = SynthesisConfig.model_validate(raw)
    except ValidationError as exc:
        stop(f"invalid synthesis config:\n{exc}")
    if cfg.method == "llm" and cfg.endpoint is None:
        stop("invalid synthesis config: --endpoint (or `endpoint:` in --config) is required")
    state = synthesize_flow(config=cfg, output_dir=str(output_dir) if output_dir else None, return_state=True)
    out = Path(state.result()) if state.is_completed() else output_dir
    finish(state, out / "synthesis-report.md" if out else None)


@app.command()
def serve(run_dir: Annotated[Path, typer.Argument(help="A run folder with deploy/Modelfile.")],
          host: str = "127.0.0.1",
          port: Annotated[int, typer.Option(help="0: a free port.")] = 0,
          parallel: Annotated[int, typer.Option(help="Requests served at once.")] = 2,
          stop_: Annotated[bool, typer.Option("--stop", help="Stop the server a deployment left running "
                                              "(deploy.keep_running) instead.")] = False) -> None:
    """Serve a run's deployed GGUF with llama.cpp, restarted if it crashes (Ctrl-C stops)."""
    if stop_:
        typer.echo("stopped" if llamacpp_serve.stop_run(run_dir) else "no running server recorded")
    else:
        llamacpp_serve.serve_run(run_dir, host, port, parallel)


@app.command("check-template")
def check_template(run_dir: Annotated[Path, typer.Argument(help="A run folder with deploy/Modelfile.")],
                   samples: Annotated[int, typer.Option(help="Test conversations to check.")] = 3) -> None:
    """Check a run's deployed chat template (Modelfile and GGUF, as on disk now) against training."""
    result = template_check.check_run(run_dir, samples)
    typer.echo(json.dumps(template_check.gate(result), indent=2))
    raise typer.Exit(0 if result["passed"] else 1)


@app.command()
def convert(source: Annotated[Path, typer.Argument(help="The JSONL file to convert.")],
            target: Annotated[Path, typer.Argument(help="Where to write the converted JSONL.")],
            to: Annotated[Format, typer.Option(help="The target format.")],
            from_: Annotated[Format | None, typer.Option("--from", help="The source format (default: detected).")]
            = None,
            drop_lossy: Annotated[bool, typer.Option("--drop-lossy", help="Drop what the target format cannot carry "
                                                     "instead of refusing.")] = False,
            system_prompt: Annotated[str | None, typer.Option(help="together-pc input: split this system "
                                                              "prompt off `prompt`.")] = None) -> None:
    """Convert a chat dataset between formats (sharegpt, messages, together, alpaca, ...; tasks/data/formats.py)."""
    try:
        rows = convert_file(source, target, to, from_, "drop" if drop_lossy else "error", system_prompt)
    except (FormatError, OSError) as exc:
        stop(f"error: {exc}")
    typer.echo(f"wrote {rows} rows to {target} ({to})")


@app.command()
def verify(base_url: Annotated[str, typer.Option(help="The server's OpenAI base URL, e.g. http://localhost:11434/v1.")],
           model: Annotated[str, typer.Option(help="The model name the server answers to.")],
           eval_file: Annotated[Path, typer.Option(help="Verify prompts: an eval file, e.g. data/gerbil-verify.jsonl.")]
           = DATA_DIR / "gerbil-verify.jsonl",
           system_prompt: Annotated[str, typer.Option(help="System prompt sent with each prompt (empty: none; "
                                                      "an Ollama Modelfile's SYSTEM applies then).")] = "",
           max_tokens: Annotated[int, typer.Option(help="Answer length limit.")] = 512,
           api_key_env: Annotated[str | None, typer.Option(help="Environment variable holding the API key "
                                                          "(hosted APIs; local servers need none).")] = None,
           task: Annotated[str, typer.Option(help="Task type of rows that name none.")] = "keyword",
           json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results here.")] = None) -> None:
    """Ask each verify prompt of a deployed model and print pass/fail per prompt; exit 1 unless all pass."""
    import os

    try:
        load_eval_file(eval_file, task)
    except EvalFileError as exc:
        stop(str(exc))
    result = verify_endpoint(base_url, model, eval_file, system_prompt, max_tokens,
                             api_key=os.environ.get(api_key_env) if api_key_env else None, task=task)
    typer.echo("\n".join(render_lines(result)))
    if json_out:
        from tasks.run import atomic_write_json
        atomic_write_json(json_out, result)
    raise typer.Exit(0 if result["passed"] == result["total"] else 1)


@app.command()
def tracks(recipes: Annotated[list[str] | None, typer.Argument(help="Recipes, one track each (default: the "
                                                               "Fledgling structured and tool-call tracks).")] = None,
           layout: Annotated[Layout, typer.Option(help="parallel: every track at once, each on its own pool; "
                                                  "sequential: in turn, on the pool of every GPU.")] = "parallel",
           set_: Overrides = None,
           track_flow: Annotated[TrackFlow, typer.Option("--flow", help="What a track runs: finetune (every stage) "
                                                          "or train (training and its loss gate).")] = "finetune",
           pool: Annotated[list[str] | None, typer.Option(help="parallel: the pool of each track, in order "
                                                          f"(repeatable; default {' '.join(PARALLEL_POOLS)}).")]
           = None,
           all_gpus_pool: Annotated[str, typer.Option(help="sequential: the pool of every GPU.")] = ALL_GPUS_POOL,
           compare_with: Annotated[Path | None, typer.Option(help="A tracks folder of the other layout, to "
                                                             "compare with in the report.")] = None,
           run_name: Annotated[str | None, typer.Option(help="The tracks folder's name "
                                                        "(default: tracks-<layout>-<UTC time>).")] = None,
           output_root: OutputRoot = REPO_ROOT / "runs") -> None:
    """Fine-tune several recipes as deployment runs on GPU work pools, at once or in turn, and compare (the
    tracks flow; needs a Prefect server where `slipway deploy` ran, and a worker per pool)."""
    overrides = parse_overrides(set_)
    recipes = recipes or FLEDGLING_TRACKS
    for recipe in recipes:
        check_input(recipe, overrides)
    run_name = run_name or default_run_name("tracks", layout)
    state = tracks_flow(layout=layout, recipes=recipes, overrides=overrides, track_flow=track_flow, pools=pool,
                        all_gpus_pool=all_gpus_pool, output_root=str(output_root), run_name=run_name,
                        compare_with=str(compare_with) if compare_with else None, return_state=True)
    finish(state, TracksFolder(output_root / run_name).report_md)


@app.command()
def deploy(gpus: Annotated[int, typer.Option(help="GPUs of the host the GPU workers run on: picks the GPU pools' "
                                              "CUDA_VISIBLE_DEVICES from deployments/pools.yaml.")]
           = DEFAULT_HOST_GPUS) -> None:
    """Stand the Prefect side up on PREFECT_API_URL: work pools, block types, every deployment in prefect.yaml."""
    try:
        stand_up(gpus)
    except PoolsError as exc:
        stop(str(exc))


if __name__ == "__main__":
    app(prog_name="slipway")
