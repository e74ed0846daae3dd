"""Ollama's TEMPLATE language as Ollama runs it, checked byte for byte against vendored vectors
(tests/ollama/vectors/PROVENANCE.md): every template Ollama ships with Ollama's own expected outputs,
renders of those templates and of legacy ones by Go's text/template driven as Ollama drives it, and Go's
own text/template test vectors."""

import json
from pathlib import Path

import pytest

from tasks.ollama.gotemplate import GoTemplateError, execute, parse
from tasks.ollama.prompt import render_ollama_chat

VECTORS = Path(__file__).parent / "vectors"
OLLAMA = VECTORS / "ollama"
CHAT_VECTORS = [json.loads(line) for line in (OLLAMA / "chat-vectors.jsonl").read_text().splitlines()]
# Go decoded the data from JSON, so its numbers are float64s: Python reads them as floats too.
TOOL_VECTORS = [json.loads(line) for line in (OLLAMA / "tool-vectors.jsonl").read_text().splitlines()]
GO_TEMPLATE_VECTORS = [json.loads(line, parse_int=float)
                       for line in (VECTORS / "go" / "template-vectors.jsonl").read_text().splitlines()]
GO_VECTORS = [json.loads(line, parse_int=float) for line in (VECTORS / "go" / "exec-vectors.jsonl").read_text().splitlines()]
# Ollama's TestTemplate drops one trailing space from these templates' output before comparing.
TRAILING_SPACE = {"chatqa.gotmpl", "llama2-chat.gotmpl", "mistral-instruct.gotmpl", "openchat.gotmpl", "vicuna.gotmpl"}
OLLAMA_CASES = [(t.name, case.name) for t in sorted((OLLAMA / "testdata").iterdir()) for case in sorted(t.iterdir())]


def _chat(case: str) -> list[dict]:
    return next(v["messages"] for v in CHAT_VECTORS if v["chat"] == case)


@pytest.mark.parametrize("template_name, case", OLLAMA_CASES)
def test_every_template_ollama_ships_renders_its_expected_output(template_name, case):
    """Ollama's TestTemplate: template/<name>.gotmpl over testdata/<name>/<case>'s chat."""
    template = (OLLAMA / "templates" / template_name).read_text().replace("\r\n", "\n")
    out = render_ollama_chat(template, _chat(case), system=None)
    if template_name in TRAILING_SPACE and out.endswith(" "):
        out = out[:-1]
    assert out == (OLLAMA / "testdata" / template_name / case).read_text()


def test_the_go_reference_renders_agree_with_ollamas_own_expected_outputs():
    """The generated vectors come from a renderer that reproduces Ollama's testdata (so they can be trusted
    for the cases Ollama has no file for)."""
    checked = 0
    for v in CHAT_VECTORS:
        expected = OLLAMA / "testdata" / v["template_name"] / v["chat"]
        if v["system"] is None and expected.exists():
            out = v["output"][:-1] if v["template_name"] in TRAILING_SPACE and v["output"].endswith(" ") else v["output"]
            assert out == expected.read_text(), (v["template_name"], v["chat"])
            checked += 1
    assert checked == len(OLLAMA_CASES)


@pytest.mark.parametrize("vector", CHAT_VECTORS, ids=lambda v: f"{v['template_name']}|{v['chat']}|{bool(v['system'])}")
def test_chat_renders_match_go_text_template_driven_as_ollama_drives_it(vector):
    if "error" in vector:
        with pytest.raises(GoTemplateError):
            render_ollama_chat(vector["template"], vector["messages"], vector["system"])
    else:
        assert render_ollama_chat(vector["template"], vector["messages"], vector["system"]) == vector["output"]


@pytest.mark.parametrize("vector", TOOL_VECTORS,
                         ids=lambda v: f"{v['template_name']}|{v['chat']}|{bool(v['system'])}|{v['think']}")
def test_tool_chats_match_go_text_template_driven_as_ollama_drives_it(vector):
    """Tools, assistant tool calls, tool results and think values over every shipped template, Ollama's
    tool templates and templates that print every tool value every way Go prints it."""
    args = (vector["template"], vector["messages"], vector["system"], vector.get("tools"), vector["think"])
    if "error" in vector:
        with pytest.raises(GoTemplateError):
            render_ollama_chat(*args)
    else:
        assert render_ollama_chat(*args) == vector["output"]


def test_the_go_reference_renders_ollamas_old_tool_testdata():
    """The reference renderer's tool types reproduce Ollama's own expected tool renders (tools/testdata at
    6b04cad7e), except where Ollama changed since: at fb3076099 `{{ .Function }}` of a tool prints as a Go
    struct (template.go's templateToolFunction has no String method), and two files end in a newline."""
    tool_dir = OLLAMA / "tools"
    changed = {"qwen2.5", "qwen3", "llama3-groq-tool-use"}   # each prints {{ .Function }}
    checked = 0
    for v in TOOL_VECTORS:
        name = v["template_name"].removeprefix("tools:").removesuffix(".gotmpl")
        if v["template_name"].startswith("tools:") and v["chat"] == "ollama-tools-testdata" and not v["system"]:
            expected = (tool_dir / f"{name}.out").read_text()
            if name in changed:
                assert "{{ .Function }}" in v["template"] and v["output"] != expected
            else:
                assert v["output"] == expected.removesuffix("\n") or v["output"] == expected, name
                checked += 1
    assert checked == 6


@pytest.mark.parametrize("vector", GO_TEMPLATE_VECTORS, ids=lambda v: v["name"])
def test_go_named_template_vectors(vector):
    """define / template / block as Go runs them (Go's multi_test.go and exec_test.go cases)."""
    defines: dict = {}
    try:
        for d in vector["defs"]:
            parse(d, defines)
        out = execute(parse(vector["template"], defines), vector["data"])
    except GoTemplateError:
        assert "error" in vector
    else:
        assert "error" not in vector and out == vector["output"]


@pytest.mark.parametrize("vector", GO_VECTORS, ids=lambda v: v["name"])
def test_go_text_template_exec_vectors(vector):
    if vector.get("error"):
        with pytest.raises(GoTemplateError):
            execute(parse(vector["template"]), vector["data"])
    else:
        assert execute(parse(vector["template"]), vector["data"]) == vector["output"]


def test_the_ollama_api_double_renders_with_go_not_with_the_code_under_test():
    """tests/ollama_api_server.py answers /api/chat with Go's renders (tests/ollama_reference_render.py),
    and those agree with the renderer under test on the chats the deploy tests send."""
    import ast

    from ollama_reference_render import RENDERS, reference_prompt

    for source in ("ollama_api_server.py", "ollama_reference_render.py"):
        tree = ast.parse((Path(__file__).parent.parent / source).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
                   {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not any(m and m.startswith("tasks") for m in imported), (source, imported)
    rows = [json.loads(line) for line in RENDERS.read_text().splitlines()]
    assert rows
    assert any(row.get("tools") for row in rows)
    for row in rows:
        args = (row["template"], row["messages"], row["system"], row.get("tools"), row.get("think"))
        assert reference_prompt(*args) == row["output"]
        assert render_ollama_chat(*args) == row["output"]
