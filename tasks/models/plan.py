"""`slipway run <recipe> --dry-run`: what a run would download, how much memory training needs, and the chat
template it will train with, without downloading weights or training.

Sizes come from the cheapest source that knows them: the Hub's file list (`snapshot_download(dry_run=True)`:
names, sizes, and whether the HF cache already has each file), else the cached snapshot or local folder
(safetensors headers: exact parameter counts), else the embedded GGUF (tensor shapes). The memory figure is
an estimate of peak training memory (weights + LoRA weights, gradients and Adam states + activations +
logits), not a measurement; the breakdown is printed beside it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from tasks.recipe import Recipe

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_ST_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_params(folder: Path) -> int:
    """Parameters of every *.safetensors file in a folder, from their headers (no tensor is read)."""
    total = 0
    for path in Path(folder).glob("*.safetensors"):
        with open(path, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= d
                total += n
    return total


def lora_params(config: dict, targets: list[str], r: int) -> int:
    """LoRA parameters: r x (in + out) for every targeted linear layer of every block."""
    text = config.get("text_config", config)
    hidden, layers = text["hidden_size"], text["num_hidden_layers"]
    heads = text["num_attention_heads"]
    kv = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or hidden // heads
    inter = text.get("intermediate_size", 4 * hidden)
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv * head_dim),
              "v_proj": (hidden, kv * head_dim), "o_proj": (heads * head_dim, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
              # fused layers (Phi-3/Phi-4-mini: qkv_proj, gate_up_proj; GLM-4: gate_up_proj)
              "qkv_proj": (hidden, (heads + 2 * kv) * head_dim), "gate_up_proj": (hidden, 2 * inter)}
    return layers * sum(r * sum(shapes[t]) for t in targets if t in shapes)


def memory_estimate(recipe: Recipe, config: dict, params: int) -> dict:
    """Peak training memory in GiB, with its parts (an estimate; see the module docstring)."""
    text = config.get("text_config", config)
    t = recipe.training
    weight_bytes = 0.56 if recipe.model.load_in_4bit else _DTYPE_BYTES[recipe.model.dtype]  # nf4 + scales
    lora = lora_params(config, recipe.lora.target_modules, recipe.lora.r)
    tokens = t.batch_size * t.max_length
    act_bytes = 2 if (t.mixed_precision in ("bf16", "fp16") or recipe.model.dtype != "float32") else 4
    hidden, layers = text["hidden_size"], text["num_hidden_layers"]
    # Per token and layer: ~16 hidden-sized tensors kept for backward; with checkpointing only the layer input.
    per_layer = 2 if t.gradient_checkpointing else 16
    parts = {"weights": params * weight_bytes,
             "lora (weights, grads, adam)": lora * 16,
             "activations": tokens * hidden * layers * per_layer * act_bytes,
             "logits (fp32, + grad)": tokens * text["vocab_size"] * 4 * 2}
    gib = {k: round(v / 2**30, 2) for k, v in parts.items()}
    return {"total_gib": round(sum(parts.values()) / 2**30, 1), "parts_gib": gib, "params": params,
            "lora_params": lora}


def _template_line(tokenizer_config: dict | None, recipe: Recipe) -> str:
    name = recipe.model.chat_template
    if name != "model":
        return f"{name} (model.chat_template" + (", a Jinja file)" if name.endswith(".jinja") else ", built-in)")
    if tokenizer_config is None:
        return "the tokenizer's own (read when the model is fetched; the run stops if it has none)"
    return "the tokenizer's own" if tokenizer_config.get("chat_template") else \
        "NONE: the tokenizer has no chat template; set model.chat_template"


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _folder_template(folder: Path) -> dict | None:
    cfg = _read_json(folder / "tokenizer_config.json") or {}
    if (folder / "chat_template.jinja").exists():
        cfg["chat_template"] = (folder / "chat_template.jinja").read_text()
    return cfg


def dry_run_plan(recipe: Recipe) -> dict:
    """What the run would fetch, the memory estimate and the chat template; nothing is downloaded or trained."""
    from tasks.models import bootstrap
    from tasks.models.hub import MODEL_FILES, HUB_TIMEOUT_S, cached_snapshot, hub_credentials, local_model
    from tasks.recipe import repo_path

    m = recipe.model
    plan: dict = {"recipe": recipe.name, "source": m.source, "model": m.name, "downloads": [], "notes": []}
    folder: Path | None = None
    if m.source == "local" or (m.source == "hf" and repo_path(m.name).is_dir()):
        folder = local_model(m.name)
        plan["notes"].append(f"local folder {folder}: nothing to download")
    elif m.source == "hf":
        from huggingface_hub import snapshot_download

        plan["revision"] = m.revision
        token, endpoint = hub_credentials(m.hub_token_block)
        try:
            files = snapshot_download(m.name, revision=m.revision, token=token, endpoint=endpoint,
                                      allow_patterns=MODEL_FILES, etag_timeout=HUB_TIMEOUT_S, dry_run=True)
            plan["downloads"] = [{"file": f.filename, "bytes": f.file_size, "cached": not f.will_download}
                                 for f in files]
        except Exception as exc:  # noqa: BLE001 - any Hub failure is reported, the cache may still answer
            plan["notes"].append(f"the Hub cannot list {m.name}@{m.revision}: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}")
        folder = cached_snapshot(m.name, m.revision)
        if folder is not None:
            plan["notes"].append(f"in the HF cache: {folder}")
        elif plan["downloads"]:
            # config.json (a few kB) is what the estimate needs; it lands in the HF cache the run will use.
            from huggingface_hub import hf_hub_download

            try:
                config_file = Path(hf_hub_download(m.name, "config.json", revision=m.revision, token=token,
                                                   endpoint=endpoint, etag_timeout=HUB_TIMEOUT_S))
                plan["config"] = json.loads(config_file.read_text())
            except Exception as exc:  # noqa: BLE001 - the estimate is optional
                plan["notes"].append(f"config.json not readable ({type(exc).__name__}): no memory estimate")
    else:
        base = bootstrap.EMBEDDED[m.source]
        plan["notes"].append(f"embedded: {base.gguf_name} from the PyPI package {base.requirement} (installed by "
                             "`make setup`), converted once to an HF folder; nothing downloaded at run time")
        cached = sorted((bootstrap.slipway_home() / "models").glob(
            f"{m.name}-*-v{bootstrap.CONVERTER_VERSION}{base.revision}"))
        folder = next((c for c in cached if (c / "slipway-source.json").exists()), None)
    config = _read_json(folder / "config.json") if folder else plan.pop("config", None)
    if config is not None:
        if folder is not None:
            params = safetensors_params(folder)
        else:   # from the sizes the Hub lists: bytes / bytes per stored parameter
            stored = _DTYPE_BYTES.get(str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"), 2)
            params = sum(d["bytes"] or 0 for d in plan["downloads"] if d["file"].endswith(".safetensors")) // stored
        plan["architecture"] = (config.get("architectures") or ["?"])[0]
        plan["memory"] = memory_estimate(recipe, config, params)
        from tasks.export.convert import ExportError
        from tasks.export.guard import check_architectures

        try:
            plan["guard"] = check_architectures(config.get("architectures") or [], recipe)
        except ExportError as exc:
            plan["guard"] = {"refused": str(exc)}
    elif plan["downloads"]:
        weights = sum(d["bytes"] or 0 for d in plan["downloads"] if d["file"].endswith(".safetensors"))
        plan["memory"] = {"total_gib": None, "weights_on_disk_gib": round(weights / 2**30, 2)}
    plan["chat_template"] = _template_line(_folder_template(folder) if folder else None, recipe)
    return plan


def render_plan(plan: dict) -> str:
    """The dry-run plan as the lines the CLI prints."""
    lines = [f"Dry run of {plan['recipe']}: nothing is downloaded or trained.",
             f"  base model:    {plan['model']} (source {plan['source']}"
             + (f", revision {plan['revision']}" if plan.get("revision") else "") + ")"]
    if plan.get("architecture"):
        lines.append(f"  architecture:  {plan['architecture']}"
                     + (f" -> GGUF '{plan['guard'].get('gguf_architecture')}'" if "gguf_architecture" in plan.get("guard", {}) else ""))
    if "refused" in plan.get("guard", {}):
        lines.append(f"  REFUSED:       {plan['guard']['refused']}")
    if plan["downloads"]:
        todo = [d for d in plan["downloads"] if not d["cached"]]
        total = sum(d["bytes"] or 0 for d in todo)
        lines.append(f"  would download {len(todo)} of {len(plan['downloads'])} files, {total / 2**30:.2f} GiB "
                     "(into the HF cache):")
        lines += [f"    {d['file']:<48} {(d['bytes'] or 0) / 2**20:10.1f} MiB{'  (cached)' if d['cached'] else ''}"
                  for d in plan["downloads"]]
    mem = plan.get("memory")
    if mem and mem.get("total_gib") is not None:
        lines.append(f"  memory:        ~{mem['total_gib']} GiB peak for training ({mem['params'] / 1e9:.2f}B params, "
                     f"{mem['lora_params'] / 1e6:.1f}M LoRA params): "
                     + ", ".join(f"{k} {v}" for k, v in mem["parts_gib"].items()))
    elif mem:
        lines.append(f"  memory:        weights {mem['weights_on_disk_gib']} GiB on disk (config not cached: no breakdown)")
    lines.append(f"  chat template: {plan['chat_template']}")
    lines += [f"  note: {n}" for n in plan["notes"]]
    return "\n".join(lines)
