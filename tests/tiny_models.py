"""Small random models with SmolLM2's tokenizer: another shape or architecture than the base, for the
ADAPTER refusals (tests/ollama) and the registry-base check of an Ollama deployment (tests/export)."""

from pathlib import Path


def tiny_model(kind: str, base_model_dir: Path, out_dir: Path) -> Path:
    """A 2-layer random `llama` or `qwen3` model with SmolLM2's tokenizer, saved as an HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    dims = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1,
                eos_token_id=2)
    model = (LlamaForCausalLM(LlamaConfig(**dims)) if kind == "llama"
             else Qwen3ForCausalLM(Qwen3Config(head_dim=16, **dims)))
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_model_dir).save_pretrained(out_dir)
    return out_dir
