"""QLoRA's merge base: the adapter learned against 4-bit weights, so merge folds it into those weights
dequantized (tasks/train/worker.py save_dequantized_base), not into the 16-bit originals. Runs on CPU where
bitsandbytes is installed (the gpu extra): quantizing and dequantizing NF4 need no GPU."""

import pytest

from tests.tiny_models import tiny_model

bnb = pytest.importorskip("bitsandbytes")


def test_merge_onto_the_dequantized_base_reproduces_the_trained_4bit_model(tmp_path, base_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tasks.export.convert import merge_adapter
    from tasks.run import RunFolder
    from tasks.train.worker import save_dequantized_base

    base = tiny_model("llama", base_model_dir, tmp_path / "base")
    quantized = AutoModelForCausalLM.from_pretrained(
        base, device_map={"": "cpu"}, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
    # A trained-looking adapter: random A and B (PEFT's default B is zero, which would merge to nothing).
    model = get_peft_model(quantized, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                 target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    run = RunFolder(tmp_path / "run")
    model.save_pretrained(run.lora_dir)
    (run.lora_dir / "tokenizer_config.json").write_bytes((base / "tokenizer_config.json").read_bytes())
    (run.lora_dir / "tokenizer.json").write_bytes((base / "tokenizer.json").read_bytes())

    replaced = save_dequantized_base(model, base, run.quantized_base_dir)
    assert replaced == 2 * 7   # every linear layer of both blocks was 4-bit (lm_head stays 16-bit)
    assert run.adapter_base(base) == run.quantized_base_dir

    ids = torch.tensor([[1, 422, 2530, 314, 2863, 30, 216, 5248, 418]])
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    outputs = {}
    for name, merge_base in (("dequantized", run.adapter_base(base)), ("16-bit", base)):
        merged = merge_adapter(merge_base, run.lora_dir, tmp_path / f"merged-{name}", dtype="float32")
        with torch.no_grad():
            outputs[name] = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(input_ids=ids).logits
    onto_dequantized = (outputs["dequantized"] - trained).abs().max().item()
    onto_original = (outputs["16-bit"] - trained).abs().max().item()
    print(f"max logit difference to the trained 4-bit model: merged onto the dequantized base {onto_dequantized:.2e}, "
          f"onto the 16-bit base {onto_original:.2e}, logits up to {trained.abs().max().item():.2f}")
    assert onto_dequantized < 1e-2 * trained.abs().max().item()
    assert onto_original > 20 * onto_dequantized   # the 16-bit originals give another model


@pytest.mark.integration
def test_adapter_gguf_converts_against_the_dequantized_base_and_refuses_an_unrelated_one(tmp_path, base_model_dir):
    """The adapter's config names the 16-bit base; export converts it against lora-base/ (seen on an H200,
    2026-12-01: the QLoRA flow stopped in export with "trained on ..., not on .../lora-base"). A base the
    adapter has nothing to do with is still refused."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tasks.export.convert import ExportError, convert_lora_to_gguf
    from tasks.ollama.adapter_guard import gguf_metadata
    from tasks.run import RunFolder
    from tasks.train.worker import save_dequantized_base

    base = tiny_model("llama", base_model_dir, tmp_path / "base")
    other = tiny_model("llama", base_model_dir, tmp_path / "other")
    quantized = AutoModelForCausalLM.from_pretrained(
        base, device_map={"": "cpu"}, dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32))
    model = get_peft_model(quantized, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    run = RunFolder(tmp_path / "run")
    model.save_pretrained(run.lora_dir)
    save_dequantized_base(model, base, run.quantized_base_dir)
    assert RunFolder.dequantized_from(run.quantized_base_dir) == base.resolve()
    assert RunFolder.dequantized_from(base) is None

    adapter = convert_lora_to_gguf(run.lora_dir, run.adapter_base(base), tmp_path / "lora.gguf")
    kv, tensors = gguf_metadata(adapter)
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    assert sum(name.endswith(".lora_a") for name in tensors) == 2 * 2   # q and v of both blocks
    with pytest.raises(ExportError, match=r"was trained on .*/base, not on .*/other"):
        convert_lora_to_gguf(run.lora_dir, other, tmp_path / "wrong.gguf")
