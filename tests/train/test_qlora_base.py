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
