"""Export, template check, parity, llama.cpp and Ollama deployment, model card: on the real exported run."""

import json
import os
import subprocess
import sys

import pytest

from tasks import llamacpp
from tasks.export import ExportError, convert_hf_to_gguf, sha256_file
from tasks.modelfile import Modelfile
from tasks.template_check import check_run, gate, render_section

pytestmark = pytest.mark.integration


def _linked_run(run_dir, tmp_path, modelfile_text, gguf_dir=None):
    """A run folder sharing data/, lora/ and gguf/ with `run_dir` (symlinks) but with its own deploy/Modelfile."""
    alt = tmp_path / "altered"
    for sub in ("data", "lora"):
        (alt / sub).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(run_dir / sub, alt / sub)
    if gguf_dir is None:
        os.symlink(run_dir / "gguf", alt / "gguf")
    (alt / "metrics").mkdir()
    (alt / "deploy").mkdir()
    (alt / "deploy" / "Modelfile").write_text(modelfile_text)
    return alt


def test_export_makes_every_gguf_type_and_a_manifest_with_digests(exported_run):
    run_dir, _, ggufs = exported_run
    assert set(ggufs) == {"f16", "q8_0", "q4_k_m", "lora", "base"}
    sizes = {k: os.path.getsize(p) for k, p in ggufs.items()}
    assert sizes["q4_k_m"] < sizes["q8_0"] < 0.6 * sizes["f16"]
    manifest = json.loads((run_dir / "gguf" / "manifest.json").read_text())
    for name, path in ggufs.items():
        assert open(path, "rb").read(4) == b"GGUF"
        entry = manifest[name]
        assert entry["bytes"] == sizes[name] and entry["sha256"] == sha256_file(path)
        assert entry["type"] == {"lora": "f16", "base": "f16"}.get(name, name) and "llama.cpp" in entry["tool"]
    assert all(len(h) == 64 for h in manifest["merged"]["files"].values())
    assert "lora/adapter_model.safetensors" in manifest["adapter"]["files"]


def test_export_refuses_an_unknown_architecture_or_a_missing_converter(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NotARealModelForCausalLM"]}))
    with pytest.raises(ExportError, match=r"architecture \['NotARealModelForCausalLM'\] is not supported by "
                                          r"llama.cpp's converter"):
        convert_hf_to_gguf(tmp_path, tmp_path / "x.gguf", "f16")
    monkeypatch.setenv("SLIPWAY_LLAMA_CPP", str(tmp_path / "nowhere"))
    with pytest.raises(ExportError, match=r"llama.cpp 0.3.36 is not set up: convert_hf_to_gguf.py not found .*make setup"):
        convert_hf_to_gguf(tmp_path, tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()


def test_template_check_passes_on_the_real_export(exported_run):
    run_dir, _, _ = exported_run
    result = check_run(run_dir)
    assert result["passed"], result["first_failure"]
    kinds = {c["check"] for c in result["checks"]}
    assert kinds == {"gguf chat template", "Modelfile TEMPLATE", "end-of-turn stops generation",
                     "Modelfile PARAMETER stop"}
    assert any(c["sample"].startswith("two-turn") for c in result["checks"])
    g = gate(result)
    assert g["name"] == "template-verified" and g["passed"]
    section = "\n".join(render_section(run_dir))
    assert "## Template check" in section and "**FAIL**" not in section


def test_template_check_names_the_first_differing_token_of_an_altered_modelfile(exported_run, tmp_path):
    run_dir, _, _ = exported_run
    mf = Modelfile.parse((run_dir / "deploy" / "Modelfile").read_text())
    # The classic hand-typed slip: a space instead of the newline after the role name.
    mf.template = mf.template.replace("<|im_start|>user\n", "<|im_start|>user ")
    mf.parameters = [("stop", "</s>")]
    result = check_run(_linked_run(run_dir, tmp_path, mf.render()))
    assert not result["passed"]
    assert all(c["passed"] for c in result["checks"] if c["check"] == "gguf chat template")
    failed = {c["check"]: c["detail"] for c in result["checks"] if not c["passed"]}
    assert set(failed) == {"Modelfile TEMPLATE", "Modelfile PARAMETER stop"}
    assert failed["Modelfile TEMPLATE"].startswith("token ")
    assert "training has 198 '\\n', deployed has" in failed["Modelfile TEMPLATE"]
    assert "does not include the training end-of-turn token '<|im_end|>'" in failed["Modelfile PARAMETER stop"]
    assert "training has 198 '\\n'" in gate(result)["observed"]


def test_template_check_catches_an_altered_gguf_chat_template(exported_run, tmp_path):
    run_dir, _, ggufs = exported_run
    alt = _linked_run(run_dir, tmp_path, (run_dir / "deploy" / "Modelfile").read_text(), gguf_dir=False)
    (alt / "gguf").mkdir()
    zephyr = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    # gguf-py's own metadata editor, from the pinned llama.cpp: a real GGUF with another embedded template.
    subprocess.run([sys.executable, str(llamacpp.source_dir() / "gguf-py" / "gguf" / "scripts" / "gguf_new_metadata.py"),
                    ggufs["q8_0"], str(alt / "gguf" / "model-q8_0.gguf"), "--chat-template", zephyr, "--force"],
                   check=True, capture_output=True)
    result = check_run(alt)
    gguf_checks = [c for c in result["checks"] if c["check"] == "gguf chat template"]
    assert gguf_checks and not any(c["passed"] for c in gguf_checks)
    assert gguf_checks[0]["detail"].startswith("token 0: training has 1 '<|im_start|>', deployed has ")
    assert all(c["passed"] for c in result["checks"] if c["check"].startswith("Modelfile"))
    assert not gate(result)["passed"]


def test_adapter_deployment_passes_the_template_check(exported_run, tmp_path):
    from tasks.modelfile import write_modelfile
    from tasks.recipe import Recipe

    run_dir, _, ggufs = exported_run
    alt = _linked_run(run_dir, tmp_path, "FROM x\n")
    info = write_modelfile.fn(alt, Recipe(name="tiny", deploy={"artifact": "adapter"}), ggufs)
    mf = Modelfile.parse((alt / "deploy" / "Modelfile").read_text())
    assert (info["from"], info["adapter"]) == ("../gguf/base-f16.gguf", "../gguf/lora-f16.gguf") == (mf.from_, mf.adapter)
    result = check_run(alt)
    assert result["passed"], result["first_failure"]
    assert result["lora"].endswith("lora-f16.gguf")
