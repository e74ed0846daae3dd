"""`synthesize`: generate Slipstream training records with an LLM endpoint, validated and accounted for.

Run it:
    slipway synthesize --endpoint openai-compatible-endpoint/deepseek -n 1000
    slipway synthesize --config synth.yaml --set batch_size=10 --output-dir runs/synth-1
    slipway synthesize --set method=templates -n 2000                  # issue 3a's template generator

The endpoint is a saved Prefect Block (blocks/llm.py) that holds the API key as a secret, e.g.
    OpenAICompatibleEndpoint(provider="deepseek", model="deepseek-chat", api_key="...").save("deepseek")

Stages: endpoint Block → batch plan → cost estimate → output folder → requests (cached, retried,
`concurrency` at a time) → validate/repair/dedupe/account → records + report. The flow only wires tasks.
"""

from __future__ import annotations

from prefect import flow

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
    outcomes = request_all(specs, endpoint, config, out_dir.name)
    identity = endpoint_identity(endpoint)
    result = assemble_records(specs, outcomes, f"llm:{identity['provider']}/{identity['model']}",
                              config.near_duplicate_jaccard)
    write_synthesis(out_dir, config.model_dump(), identity, estimate, result)
    return str(out_dir)

