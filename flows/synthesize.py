"""`synthesize`: generate Slipstream training records with an LLM endpoint, validated and accounted for.

Run it:
    python -m flows.synthesize --endpoint openai-compatible-endpoint/deepseek -n 1000
    python -m flows.synthesize --config synth.yaml --set batch_size=10 --output-dir runs/synth-1
    python -m flows.synthesize --set method=templates -n 2000          # issue 3a's template generator

The endpoint is a saved Prefect Block (blocks/llm.py) that holds the API key as a secret, e.g.
    OpenAICompatibleEndpoint(provider="deepseek", model="deepseek-chat", api_key="...").save("deepseek")

Stages: endpoint Block → batch plan → cost estimate → output folder → requests (cached, retried,
`concurrency` at a time) → validate/repair/dedupe/account → records + report. The flow only wires tasks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import flow
from pydantic import ValidationError

from blocks.llm import AzureOpenAIEndpoint, OpenAICompatibleEndpoint
from tasks.llm_client import endpoint_identity
from tasks.synth.llm import SynthesisConfig, estimate_cost, load_endpoint, plan_batches, request_all
from tasks.synth.report import assemble_records, create_output_dir, write_synthesis, write_template_synthesis
from tasks.synth.templates import synthesize_from_templates


@flow(name="synthesize", log_prints=True)
def synthesize(config: SynthesisConfig, output_dir: str | None = None,
               endpoint: OpenAICompatibleEndpoint | AzureOpenAIEndpoint | None = None) -> str:
    """Synthesize `config.n` records; returns the output folder.

    Args:
        config: what to generate and from which saved endpoint Block (validated before any work).
        output_dir: a new or empty folder (default runs/synth-<UTC time>).
        endpoint: a Block object to use instead of loading `config.endpoint` (Prefect records it with
            the key masked).
    """
    if config.method == "templates":  # issue 3a's generator; same folder layout and report
        out_dir = create_output_dir(output_dir)
        write_template_synthesis(out_dir, config.model_dump(), synthesize_from_templates(config.n, config.seed))
        return str(out_dir)
    endpoint = load_endpoint(config.endpoint, endpoint)
    specs = plan_batches(config)
    estimate = estimate_cost(endpoint, specs, config)  # stops here if over max_cost_usd
    out_dir = create_output_dir(output_dir)
    outcomes = request_all(specs, endpoint, config)
    identity = endpoint_identity(endpoint)
    result = assemble_records(specs, outcomes, f"llm:{identity['provider']}/{identity['model']}",
                              config.near_duplicate_jaccard)
    write_synthesis(out_dir, config.model_dump(), identity, estimate, result)
    return str(out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the synthesize flow locally.")
    parser.add_argument("--config", help="YAML file with SynthesisConfig fields")
    parser.add_argument("--endpoint", help="Block document, e.g. openai-compatible-endpoint/deepseek")
    parser.add_argument("-n", type=int, help="records to request")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set batch_size=10 (YAML value)")
    parser.add_argument("--output-dir")
    args = parser.parse_args(argv)
    import yaml

    raw = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    raw.update({k: v for k, v in (("endpoint", args.endpoint), ("n", args.n)) if v is not None})
    for item in args.set:
        field, _, value = item.partition("=")
        raw[field] = yaml.safe_load(value)
    try:  # fail before Prefect starts, with one message and no traceback
        config = SynthesisConfig.model_validate(raw)
    except ValidationError as exc:
        print(f"invalid synthesis config:\n{exc}", file=sys.stderr)
        return 2
    if config.method == "llm" and config.endpoint is None:
        print("invalid synthesis config: --endpoint (or `endpoint:` in --config) is required", file=sys.stderr)
        return 2
    state = synthesize(config=config, output_dir=args.output_dir, return_state=True)
    if state.is_failed():
        print(f"Synthesis failed: {state.message}", file=sys.stderr)
        return 1
    print(f"\nReport: {Path(state.result()) / 'synthesis-report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
