"""Grammar-constrained serving (deploy.constrain_output): the Slipstream answer grammar accepts every gold
answer Slipway trains or evaluates on and refuses what the strict parser refuses, as judged by llama.cpp's own
grammar engine (a real llama-server on the embedded SmolLM2); a server started with it answers only in the
format; the recipe refuses the combination no server can enforce (Ollama) and a task without a grammar."""

import json
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tasks.data.prepare import load_datafactory_examples, load_eval_examples, load_examples, synthetic_examples
from tasks.llamacpp.serve import ManagedLlamaServer, answer_grammar
from tasks.protocol import UCR_ANCHORS, parse_tqt, tqt_gbnf, tqt_max_chars
from tasks.recipe import DATA_DIR, DeployConfig, Recipe, RecipeError, load_recipe
from tasks.run import RunFolder
from tasks.tasktypes import check_recipe, task_type

HANDWRITTEN = DATA_DIR / "slipstream-handwritten.jsonl"
EOT = "<|im_end|>"   # SmolLM2's end-of-turn (its EOS): llama-server reads special tokens in a prompt


def test_ollama_cannot_serve_a_constrained_recipe():
    with pytest.raises(ValueError, match="deploy.constrain_output .*Ollama cannot"):
        DeployConfig(target="ollama", constrain_output=True)
    assert DeployConfig(target="llamacpp", constrain_output=True).constrain_output
    assert DeployConfig(target="none", constrain_output=True).constrain_output


def test_a_constrained_slipstream_recipe_loads_and_with_ollama_is_refused_at_load(tmp_path):
    text = (DATA_DIR.parent / "recipes" / "slipstream.yaml").read_text().replace(
        "constrain_output: false", "constrain_output: true")
    path = tmp_path / "slipstream-constrained.yaml"
    path.write_text(text)
    assert check_recipe(load_recipe(path)).deploy.constrain_output is True
    text = text.replace("target: llamacpp", "target: ollama")
    path = tmp_path / "slipstream-ollama.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match="deploy.*constrain_output"):
        load_recipe(path)


def test_a_task_without_a_grammar_cannot_be_constrained(tmp_path):
    recipe = Recipe(name="kw", task="keyword", data={"format": "eval"}, deploy={"constrain_output": True})
    assert task_type("keyword").grammar is None
    with pytest.raises(RecipeError, match="constrain_output needs an answer grammar.*'slipstream'"):
        check_recipe(recipe)


def test_the_grammar_file_reaches_every_server_of_a_constrained_run(tmp_path):
    run = RunFolder(tmp_path)
    assert answer_grammar(run, DeployConfig(), "slipstream") is None
    path = answer_grammar(run, DeployConfig(constrain_output=True), "slipstream")
    assert path == run.answer_grammar and path.read_text() == tqt_gbnf()
    command = ManagedLlamaServer(tmp_path / "m.gguf", tmp_path / "log", grammar_file=path).command()
    assert command[command.index("--grammar-file") + 1] == str(path)
    assert "--grammar-file" not in ManagedLlamaServer(tmp_path / "m.gguf", tmp_path / "log").command()


def test_the_grammar_is_written_from_the_protocol():
    grammar = tqt_gbnf()
    for anchor in UCR_ANCHORS:   # one alternative per anchor, naming it in QUANTIZE and SLIP alike
        assert f'q-{anchor} ::= "{anchor}\\nSLIP: SLIP v1 " agents "{anchor}" payload' in grammar
    assert "RequestBlocked" not in tqt_gbnf(("RequestTask", "InformBlocked"))
    assert "q-Fallback" not in tqt_gbnf(("RequestTask",))


def test_the_longest_answer_the_grammar_allows_is_tqt_max_chars_long_and_parses():
    from tasks.protocol import (ACTION_LABELS, AGENT_MAX, DOMAIN_LABELS, GRAMMAR_TOKEN_MAX, PAYLOAD_MAX_TOKENS,
                                POLARITY_LABELS, THOUGHT_MAX, URGENCY_LABELS)

    longest = lambda labels: max(labels, key=len)
    anchor = max(UCR_ANCHORS, key=len)
    hint = (f"ACTION={longest(ACTION_LABELS)} | DOMAIN={longest(DOMAIN_LABELS)} | "
            f"URGENCY={longest(URGENCY_LABELS)} | POLARITY={longest(POLARITY_LABELS)}")
    answer = (f"THOUGHT: {'x' * THOUGHT_MAX}\nQUANTIZE: [{hint}] -> {anchor}\nSLIP: SLIP v1 {'a' * AGENT_MAX} "
              f"{'b' * AGENT_MAX} {anchor}" + f" {'p' * GRAMMAR_TOKEN_MAX}" * PAYLOAD_MAX_TOKENS)
    assert parse_tqt(answer).slip.anchor == anchor and len(answer) == tqt_max_chars()


# --- llama.cpp judges: a real llama-server with the grammar ------------------------------------------------


def _gold_answers() -> list[str]:
    """Every gold answer the shipped recipes train or evaluate Slipstream on: the published dataset, the
    demo's template rows, the Data Factory file and the hand-written eval file (duplicates once)."""
    recipe = load_recipe("slipstream")
    examples = (load_examples(DATA_DIR / "slipstream-tqt.jsonl") + synthetic_examples(recipe.data)
                + load_datafactory_examples(DATA_DIR / "slipstream-datafactory.jsonl")
                + load_eval_examples(HANDWRITTEN, "slipstream"))
    return list(dict.fromkeys(ex.answer for ex in examples))


class GrammarJudge:
    """llama-server started with the grammar, asked to repeat a text it has just read twice, each copy ended by
    the end-of-turn token (greedy). The grammar masks every token it forbids (end-of-turn included, until the
    grammar is complete), so the server writes the text back exactly and then stops on end-of-turn (stop type
    'eos') only if llama.cpp's grammar engine accepts the whole text; a text it forbids comes back different
    from the first forbidden character on. SLOTS texts are judged at once: a decode step of this 135M model costs
    nearly the same for 1 or 8 sequences: the 76 hand-written answers took 69 s here, 111 s one by one."""

    SLOTS = 8

    def __init__(self, gguf, grammar_file, log_path):
        from tasks.llamacpp.build import tool

        # 512 tokens a slot: an echo is two copies of a gold answer and its end-of-turn, and 130 predicted; the
        # longest gold answer of _gold_answers() is 127 tokens, so 2 x 129 + 130 = 388.
        self.proc = subprocess.Popen(
            [str(tool("llama-server")), "-m", str(gguf), "--port", "0", "--host", "127.0.0.1",
             "-c", str(512 * self.SLOTS), "-np", str(self.SLOTS), "--no-webui", "--grammar-file", str(grammar_file)],
            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
        from tasks.llamacpp.serve import wait_bound_port, wait_healthy

        port = wait_bound_port(self.proc, log_path, 0, 120)
        self.url = f"http://127.0.0.1:{port}"
        wait_healthy(self.url, self.proc, log_path, 120)

    def echo(self, text: str) -> dict:
        body = {"prompt": f"{text}{EOT}\n{text}{EOT}\n", "n_predict": 130, "temperature": 0, "cache_prompt": False}
        req = urllib.request.Request(self.url + "/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            return json.loads(resp.read())

    def accepts(self, text: str) -> bool:
        out = self.echo(text)
        return out["content"] == text and out["stop_type"] == "eos"

    def refused(self, texts: list[str]) -> list[str]:
        """The texts the grammar does not accept, judged SLOTS at a time."""
        with ThreadPoolExecutor(self.SLOTS) as pool:
            return [text for text, ok in zip(texts, pool.map(self.accepts, texts)) if not ok]

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    from tasks.models.bootstrap import embedded_gguf_path

    folder = tmp_path_factory.mktemp("grammar")
    grammar = answer_grammar(RunFolder(folder), DeployConfig(constrain_output=True), "slipstream")
    judge = GrammarJudge(embedded_gguf_path(), grammar, folder / "llama-server.log")
    yield judge
    judge.close()


@pytest.mark.integration
def test_llama_cpp_accepts_every_hand_written_gold_answer(judge):
    golds = _hand_golds()
    refused = judge.refused(golds)
    assert not refused, f"{len(refused)} of {len(golds)} gold answers refused, e.g. {refused[:3]}"


@pytest.mark.integration
@pytest.mark.unverified   # ~4,400 answers echoed, 8 at a time: long on 2 cores (make test-all runs it)
def test_llama_cpp_accepts_every_gold_answer(judge):
    golds = _gold_answers()
    assert len(golds) > 4000
    refused = judge.refused(golds)
    assert not refused, f"{len(refused)} of {len(golds)} gold answers refused, e.g. {refused[:3]}"


@pytest.mark.integration
def test_llama_cpp_refuses_an_invented_anchor_a_differing_second_anchor_and_a_missing_dst(judge):
    gold = _hand_golds()[0]
    assert gold.endswith("-> RequestTask\nSLIP: SLIP v1 coordinator haruto RequestTask rerun invoice_backfill "
                         "period:march")
    assert judge.accepts(gold)
    slip = gold.index("SLIP: ")
    forbidden = [  # (answer, where the grammar has to leave it)
        (gold.replace("RequestTask", "RequestBlocked"), gold.index("-> ") + 3),           # no such anchor
        (gold[:slip] + gold[slip:].replace("RequestTask", "RequestHelp"), gold.rindex("RequestTask")),  # differs
        (gold.replace("coordinator haruto", "coordinator"), gold.rindex("RequestTask") - len("haruto ")),  # no dst
        # A second SLIP line: the repeat loses its place among two similar lines, so only its end is checked.
        (gold + "\nSLIP: SLIP v1 haruto coordinator MetaAck", 0),
    ]
    for bad, where in forbidden:
        out = judge.echo(bad)["content"]
        assert out != bad and out.startswith(bad[:where]), (bad, out)


def _hand_golds() -> list[str]:
    return [json.loads(line)["expected"] for line in HANDWRITTEN.read_text().splitlines() if line.strip()]


@pytest.mark.integration
def test_a_constrained_server_answers_only_in_the_format(tmp_path):
    """The untrained base model, served the way a constrained run serves it, on hand-written prompts: every
    answer is a complete TQT answer the task type's scorer parses (unconstrained, it rarely writes one)."""
    from openai import OpenAI

    from tasks.models.bootstrap import embedded_gguf_path
    from tasks.recipe import ModelConfig

    grammar = answer_grammar(RunFolder(tmp_path), DeployConfig(constrain_output=True), "slipstream")
    rows = [json.loads(line) for line in HANDWRITTEN.read_text().splitlines()[:4]]
    system = load_recipe("slipstream").model.system_prompt or ModelConfig().system_prompt
    with ManagedLlamaServer(embedded_gguf_path(), tmp_path / "server.log", parallel=1, grammar_file=grammar) as server:
        client = OpenAI(base_url=server.base_url, api_key="unused")
        for row in rows:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": row["prompt"]}]
            # The grammar bounds an answer at tqt_max_chars() characters, so it ends (finish 'stop') within as
            # many tokens even when the untrained model fills every field to its limit.
            reply = client.chat.completions.create(model=server.alias, messages=messages,
                                                   max_tokens=tqt_max_chars(), temperature=0)
            answer = reply.choices[0].message.content
            assert reply.choices[0].finish_reason == "stop", answer
            scores = task_type("slipstream").score({"messages": messages, "expected": row["expected"]}, answer)
            assert scores["strict_parse"] == 1.0, (answer, scores["error"])
            assert parse_tqt(answer).slip.anchor in UCR_ANCHORS
