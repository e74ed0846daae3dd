"""Export, template check, parity, llama.cpp and Ollama deployment, model card: on the real exported run."""

import json
import os
import signal
import subprocess
import sys

import httpx
import ollama
import pytest
import yaml

from blocks.hub import HuggingFaceHubCredentials
from ollama_api_server import ollama_api_server
from tasks.eval.parity import measure_parity, render_section as parity_section
from tasks.eval.runners import generate_openai
from tasks.export.convert import ExportError, convert_hf_to_gguf, sha256_file
from tasks.export.template_check import check_run, gate, render_section
from tasks.llamacpp import build as llamacpp
from tasks.llamacpp.serve import ManagedLlamaServer, get_ok, pid_alive, stop_recorded
from tasks.ollama.adapter_guard import ModelfileRefused
from tasks.ollama.modelfile import Modelfile, write_modelfile
from tasks.recipe import Recipe
from tasks.release.deploy import DeployError, deploy_model, deploy_ollama
from tasks.release.model_card import publish_release, write_model_card
from tiny_models import tiny_model

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
    run_dir, _, ggufs = exported_run
    alt = _linked_run(run_dir, tmp_path, "FROM x\n")
    path = write_modelfile.fn(alt, Recipe(name="tiny", deploy={"artifact": "adapter"}), ggufs)
    mf = Modelfile.read(path)
    info = json.loads((alt / "deploy" / "modelfile.json").read_text())
    assert (info["from"], info["adapter"]) == ("../gguf/base-f16.gguf", "../gguf/lora-f16.gguf") == (mf.from_, mf.adapter)
    result = check_run(alt)
    assert result["passed"], result["first_failure"]
    assert result["lora"].endswith("lora-f16.gguf")


# ------------------------------------------------------------------------------------ deployment

PASSING = [{"name": "model-performance", "passed": True}, {"name": "template-verified", "passed": True}]


def _health(root: str) -> bool:
    return get_ok(root + "/health")


def test_llamacpp_deploy_serves_answers_and_stops_cleanly(exported_run):
    run_dir, recipe, _ = exported_run
    recipe = recipe.model_copy(deep=True)
    recipe.deploy.keep_running = True
    recipe.eval.max_new_tokens = 16
    record = deploy_model.fn(run_dir, recipe, PASSING)
    assert record["target"] == "llamacpp" and record["running"]
    assert record["artifact"].endswith("model-q8_0.gguf") and record["test_chat"]["tokens"] > 0
    assert record["test_chat"]["answer"].strip()
    assert pid_alive(record["pid"]) and _health(record["base_url"].removesuffix("/v1")), "left running"
    assert stop_recorded(run_dir / "deploy" / "llamacpp.json")
    assert not pid_alive(record["pid"]) and not _health(record["base_url"].removesuffix("/v1"))
    assert json.loads((run_dir / "deploy" / "llamacpp.json").read_text())["running"] is False
    skipped = deploy_model.fn(run_dir, recipe, [{"name": "template-verified", "passed": False}])
    assert skipped == {"target": "llamacpp", "skipped": "gates failed: template-verified"}


def test_managed_server_restarts_a_crashed_server_on_the_same_port(exported_run, tiny_rows, tmp_path):
    _, _, ggufs = exported_run
    with ManagedLlamaServer(ggufs["q4_k_m"], tmp_path / "server.log", parallel=1) as server:
        port, first = server.port, server.process
        os.kill(first.pid, signal.SIGKILL)   # our own child: simulate a crash
        first.wait()
        assert not server.healthy()
        assert server.ensure_running() is True
        assert server.port == port and server.process.pid != first.pid and server.restarts == 1
        answers, tokens = generate_openai(server.base_url, server.alias, tiny_rows[:1], 8, concurrency=1)
        assert tokens > 0 and answers[0]
        assert server.ensure_running() is False
        last = server.process
    assert last.poll() is not None and not _health(f"http://127.0.0.1:{port}")


@pytest.fixture(scope="module")
def upstream(exported_run, tmp_path_factory):
    """A llama-server on the q8_0 GGUF: the model runner behind the Ollama API double's /api/chat."""

    _, _, ggufs = exported_run
    with ManagedLlamaServer(ggufs["q8_0"], tmp_path_factory.mktemp("upstream") / "up.log", parallel=1) as server:
        yield server.root_url


def _ollama_recipe(recipe, url, **deploy):
    recipe = recipe.model_copy(deep=True)
    recipe.deploy = recipe.deploy.model_copy(update={"target": "ollama", "ollama_host": url, **deploy})
    recipe.eval.max_new_tokens = 16
    return recipe


def test_ollama_deploy_uploads_by_digest_creates_shows_and_chats(exported_run, upstream):
    run_dir, recipe, ggufs = exported_run
    manifest = json.loads((run_dir / "gguf" / "manifest.json").read_text())
    with ollama_api_server(upstream) as (url, state):
        record = deploy_model.fn(run_dir, _ollama_recipe(recipe, url), PASSING)
        digest = "sha256:" + manifest["q8_0"]["sha256"]
        assert record["files"] == {"model-q8_0.gguf": digest} and record["adapters"] == {}
        assert [r[:1] + r[2:] for r in state.requests] == [("POST", 201), ("POST", 200), ("POST", 200), ("POST", 200)]
        assert [r[1] for r in state.requests] == [f"/api/blobs/{digest}", "/api/create", "/api/show", "/api/chat"]
        shown = ollama.Client(host=url).show(record["model"])
        mf = Modelfile.parse((run_dir / "deploy" / "Modelfile").read_text())
        assert shown.template == mf.template and shown.modelinfo["general.architecture"] == "llama"
        assert record["parameters"]["stop"] == ["<|im_end|>", "<|im_start|>"]
    # The Modelfile TEMPLATE (SYSTEM filled in by Ollama's rules) prompts the model exactly like the GGUF's
    # own template does through llama.cpp's chat API: the same greedy answer.
    row = json.loads((run_dir / "data" / "test.jsonl").read_text().splitlines()[0])
    direct, _ = generate_openai(upstream + "/v1", "x", [row], 16, concurrency=1)
    assert record["test_chat"]["answer"] == direct[0]


def test_ollama_adapter_deploy_and_its_registry_base_check(exported_run, upstream, base_model_dir, tmp_path):
    run_dir, recipe, ggufs = exported_run
    alt = _linked_run(run_dir, tmp_path, "FROM x\n")
    with ollama_api_server(upstream) as (url, state):
        adapter = _ollama_recipe(recipe, url, artifact="adapter")
        write_modelfile.fn(alt, adapter, ggufs)
        record = deploy_ollama(alt, adapter, 8)
        assert set(record["files"]) == {"base-f16.gguf"} and set(record["adapters"]) == {"lora-f16.gguf"}
        client = ollama.Client(host=url)
        # FROM an Ollama model: accepted when /api/show describes the adapter's base ...
        client.create(model="smollm2:135m", files={"base-f16.gguf": client.create_blob(ggufs["base"])})
        registry = _ollama_recipe(recipe, url, artifact="adapter", ollama_base="smollm2:135m")
        write_modelfile.fn(alt, registry, ggufs)
        assert Modelfile.parse((alt / "deploy" / "Modelfile").read_text()).from_ == "smollm2:135m"
        assert deploy_ollama(alt, registry, 8)["from"] == "smollm2:135m"
        # ... and refused when it is another model (a small random Llama under the same name).
        other = convert_hf_to_gguf(tiny_model("llama", base_model_dir, tmp_path / "tiny"), tmp_path / "tiny.gguf", "f16")
        client.create(model="smollm2:135m", files={"model.gguf": client.create_blob(other)})
        with pytest.raises(ModelfileRefused, match=r"^ADAPTER refused: the adapter's base does not match FROM "
                                                    r"'smollm2:135m': \S+ is .+ for the base it was trained on, .+ in Ollama$"):
            deploy_ollama(alt, registry, 8)


def test_ollama_rejects_a_wrong_digest_and_deploy_refuses_a_changed_artifact(exported_run, tmp_path):
    run_dir, recipe, ggufs = exported_run
    wrong = "sha256:" + "0" * 64
    with ollama_api_server() as (url, state):
        body = open(ggufs["lora"], "rb").read()
        r = httpx.post(f"{url}/api/blobs/{wrong}", content=body)
        assert r.status_code == 400 and r.json()["error"].startswith(f'digest mismatch, expected "{wrong}"')
        assert httpx.head(f"{url}/api/blobs/{wrong}").status_code == 404
        with pytest.raises(ollama.ResponseError) as err:
            ollama.Client(host=url).create(model="x", files={"model.gguf": wrong})
        assert err.value.status_code == 400 and "not found" in err.value.error
        # A GGUF whose bytes are not the ones the export recorded (and the gates checked) is not deployed.
        alt = _linked_run(run_dir, tmp_path, (run_dir / "deploy" / "Modelfile").read_text(), gguf_dir=False)
        (alt / "gguf").mkdir()
        for f in (run_dir / "gguf").glob("*.gguf"):
            os.symlink(f, alt / "gguf" / f.name)
        manifest = json.loads((run_dir / "gguf" / "manifest.json").read_text())
        manifest["q8_0"]["sha256"] = "f" * 64
        (alt / "gguf" / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(DeployError, match=f"model-q8_0.gguf changed since export: the manifest has sha256:{'f' * 64}"):
            deploy_ollama(alt, _ollama_recipe(recipe, url), 8)
        assert "slipway-tiny:latest" not in state.models


# ---------------------------------------------------------------------------------- parity and release

def test_parity_answers_from_every_format_on_the_same_rows(exported_run, base_model_dir):
    run_dir, recipe, ggufs = exported_run
    recipe = recipe.model_copy(deep=True)
    recipe.eval.max_new_tokens = 16
    result = measure_parity.fn(run_dir, base_model_dir, recipe, ggufs)
    labels = [v["label"] for v in result["variants"]]
    assert labels == ["merged", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "gguf-lora"]   # one transformers row
    for v in result["variants"]:
        assert v["rows"] == 2 and v["generated_tokens"] > 0, v     # loaded and answered
        assert (run_dir / "metrics" / f"predictions-parity-{v['label']}.jsonl").exists()
    assert next(v for v in result["variants"] if v["label"] == "merged")["drop"] == 0
    section = "\n".join(parity_section(run_dir))
    assert "## Parity across formats" in section and "| **gguf-q8_0** | llama.cpp server |" in section


def test_model_card_dataset_card_and_publishing_to_a_folder(exported_run, trained_run, tmp_path):
    run_dir, recipe, _ = exported_run
    _, training = trained_run
    results = {"merged": {"runner": "transformers", "strict_parse": 0.5, "anchor_accuracy": 0.5,
                          "src_dst_accuracy": 0.0, "rows": 2}}
    model_dir = write_model_card.fn(run_dir, recipe, results, training)
    card = (model_dir / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["library_name"] == "peft"
    assert meta["datasets"] == ["anthonym21/slipstream-tqt"] and meta["license"] == "apache-2.0"
    for text in ("## Training Details", f"| Method | LoRA (rank={recipe.lora.r}", "| Training Examples | 8 |",
                 "## Available Formats", "`gguf/model-q4_k_m.gguf`", "## Usage", "PeftModel.from_pretrained",
                 "llama-server -m gguf/model-q8_0.gguf --jinja", "ollama create slipway-tiny-smollm2-135m-instruct",
                 "## Evaluation", "| merged | transformers | 50.0% |"):
        assert text in card, text
    release_mf = Modelfile.parse((model_dir / "Modelfile").read_text())
    assert (model_dir / release_mf.from_).exists()
    assert os.stat(model_dir / "gguf" / "model-q8_0.gguf").st_ino == os.stat(run_dir / "gguf" / "model-q8_0.gguf").st_ino
    data_card = (run_dir / "release" / "dataset" / "README.md").read_text()
    assert "| test | 2 |" in data_card and "Anthony Maio" in data_card
    target = Recipe.model_validate({**recipe.model_dump(), "release": {"folder": str(tmp_path / "published")}})
    record = publish_release.fn(run_dir, target, PASSING)
    published = tmp_path / "published" / "slipway-tiny-smollm2-135m-instruct"
    assert record["folder"] == str(published) and record["hub"] is None
    assert sha256_file(published / "gguf" / "model-q8_0.gguf") == sha256_file(run_dir / "gguf" / "model-q8_0.gguf")
    assert (published / "README.md").read_text() == card and (published.with_name(published.name + "-data") / "test.jsonl").exists()
    assert publish_release.fn(run_dir, target, [{"name": "model-performance", "passed": False}])["skipped"]
    with pytest.raises(ValueError, match="hub_token_block"):
        Recipe.model_validate({"name": "x", "release": {"hub_model_repo": "me/model"}})
    creds = HuggingFaceHubCredentials(token="hf_not_a_real_token")
    assert "hf_not_a_real_token" not in repr(creds) and creds.api().token == "hf_not_a_real_token"


def test_merge_keeps_the_base_tokenizer_settings_the_converter_reads(tmp_path):
    """transformers 5 saves tokenizer_class "TokenizersBackend" and can drop add_bos_token; llama.cpp's converter
    reads both (Phi-4-mini takes the GPT-2 vocabulary path only on "GPT2Tokenizer")."""
    from tasks.export.convert import keep_base_tokenizer_settings

    base, merged = tmp_path / "base", tmp_path / "merged"
    base.mkdir(), merged.mkdir()
    (base / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": False, "model_max_length": 131072}))
    (merged / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "TokenizersBackend", "chat_template": "{{ messages }}", "eos_token": "<|end|>"}))
    keep_base_tokenizer_settings(base, merged)
    assert json.loads((merged / "tokenizer_config.json").read_text()) == {
        "tokenizer_class": "GPT2Tokenizer", "chat_template": "{{ messages }}", "eos_token": "<|end|>",
        "add_bos_token": False}
