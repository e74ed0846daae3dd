"""After `bench/train_throughput.py --variants slipway-qlora`: the dequantized 4-bit base (RUN/lora-base) exists, and
merging the adapter onto it reproduces the trained 4-bit model much better than merging onto the 16-bit base.

    python3 bench/qlora_merge_check.py WORK/runs/slipway-qlora WORK/base-tiny     # on a GPU, Unsloth installed
"""
import json, sys, torch
from pathlib import Path
sys.path.insert(0, ".")
run = Path(sys.argv[1]); base = Path(sys.argv[2])
stats = json.loads((run / "metrics" / "training-stats.json").read_text())
print("dequantized_base_weights", stats.get("dequantized_base_weights"), "steps", stats["steps"])
from unsloth import FastLanguageModel
from peft import PeftModel
from transformers import AutoModelForCausalLM
model, tok = FastLanguageModel.from_pretrained(model_name=str(base), load_in_4bit=True, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, run / "lora").eval()
ids = torch.tensor([[1, 422, 2530, 314, 2863, 30, 216, 5248, 418]], device="cuda")
with torch.no_grad():
    trained = model(input_ids=ids).logits.float()
for name, b in (("dequantized", run / "lora-base"), ("16-bit", base)):
    # What tasks.export.convert.merge_adapter does (that module imports Prefect, which GPU hosts may lack).
    m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32), run / "lora")
    m = m.merge_and_unload().to(torch.bfloat16).cuda()
    with torch.no_grad():
        out = m(input_ids=ids).logits.float()
    print(name, "max |logit diff| vs trained 4-bit model:", (out - trained).abs().max().item(),
          "argmax agreement:", (out.argmax(-1) == trained.argmax(-1)).float().mean().item())
