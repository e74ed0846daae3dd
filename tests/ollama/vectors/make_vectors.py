"""Regenerate the expected renders in this folder with Go's own text/template (needs Go >= 1.18 on PATH;
the tests themselves need no Go). Run from the repository root with the project's Python:

    .venv/bin/python tests/ollama/vectors/make_vectors.py

Also writes double-renders.jsonl: the prompts the Ollama API test double answers with (see
tests/ollama_reference_render.py).

Writes ollama/chat-vectors.jsonl: every template Ollama ships (ollama/templates/) and a few legacy
(System/Prompt/Response) templates, over chats with and without a Modelfile SYSTEM, same-role runs and
tool results, each rendered by tests/ollama/gorender/main.go (Go's text/template, driven as Ollama's
template.Execute drives it). go/exec-vectors.jsonl comes from Go's own text/template tests
(go/dump_vectors_test.go.txt, run inside a copy of Go's src/text/template; see PROVENANCE.md).
"""

import json
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
RENDERER = HERE.parent / "gorender" / "main.go"

U1 = {"role": "user", "content": "Hello, how are you?"}
A1 = {"role": "assistant", "content": "I'm doing great. How can I help you today?"}
U2 = {"role": "user", "content": "I'd like to show off how chat templating works!"}
S1 = {"role": "system", "content": "You are a helpful assistant."}
CHATS = {
    "user": [U1],
    "user-assistant-user": [U1, A1, U2],
    "system-user-assistant-user": [S1, U1, A1, U2],
    "user-user-assistant-user": [U1, {"role": "user", "content": "Second line <b>&</b> \"quoted\""}, A1, U2],
    "system-system-user": [S1, {"role": "system", "content": "Answer in French."}, U1],
    "user-assistant-tool-tool-user": [U1, A1, {"role": "tool", "content": "42", "tool_name": "calc"},
                                      {"role": "tool", "content": "43", "tool_name": "calc"}, U2],
}
MODELFILE_SYSTEMS = [None, "You are terse.\nAlways."]
LEGACY = {
    "prompt-only": "{{ .Prompt }}",
    "system-prompt": "{{ .System }} {{ .Prompt }}",
    "system-prompt-response": "{{ if .System }}<s>{{ .System }}</s>{{ end }}<u>{{ .Prompt }}</u><a>{{ .Response }}</a>",
    "chatml-legacy": ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ if .Prompt }}"
                      "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ .Response }}"
                      "<|im_end|>\n"),
    "response-in-branch": ("{{- if .Prompt }}[INST] {{ .Prompt }} [/INST]{{ end }}"
                           "{{- if .Response }} {{ .Response }}</s>{{ else }}{{ .Response }}{{ end }} tail"),
    # TestParse's ChatMLLike: .Messages when there are any, the legacy fields otherwise.
    "chatml-like": ("{{- if .Messages }}\n{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
                    "{{ end }}<|im_start|>assistant\n{{ else -}}\n{{ if .System }}<|im_start|>system\n{{ .System }}"
                    "<|im_end|>\n{{ end }}{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
                    "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n{{- end -}}"),
    "tool-result": ('{{ range .Messages }}{{ if eq .Role "tool" }}Tool Result: {{ .ToolName }} {{ .Content }}'
                    '{{ else }}{{ .Role }}: {{ .Content }}{{ end }}\n{{ end }}'),
}


# Chats with tools (Ollama's api.Tool JSON) and assistant tool calls, over every template below and the tool
# templates of Ollama's old tools/testdata (ollama/tools/, with its own messages.json and tools.json).
TOOLS = json.loads((HERE / "ollama" / "tools" / "tools.json").read_text()) + [
    {"type": "function", "function": {
        "name": "search_docs", "description": "Search <the> docs & \"notes\"",
        "parameters": {"type": "object", "required": ["query"], "properties": {
            "query": {"type": "string", "description": "What to look for"},
            "limit": {"type": ["integer", "null"], "description": "At most this many", "enum": [1, 5, 10.5]},
            "filters": {"type": "object", "description": "Nested, in the request's order",
                        "properties": {"zeta": {"type": "string"}, "alpha": {"type": "boolean"}}},
            "tags": {"type": "array", "items": {"type": "string"}}}}}},
    {"type": "function", "function": {"name": "no_params"}},
]
CALL = {"id": "call_1", "function": {"index": 0, "name": "get_current_weather",
                                     "arguments": {"location": "Paris, France", "format": "celsius"}}}
CALL2 = {"function": {"index": 1, "name": "search_docs", "arguments": {
    "query": "a<b & c", "limit": 12345678901234567890, "ratio": 1e-7, "big": 1e21, "neg": -0.5,
    "filters": {"zeta": "z", "alpha": True, "nested": [1, 2.5, None, "x"]}}}}
TOOL_CHATS = {
    "tools|user": {"messages": [U1], "tools": TOOLS},
    "tools|system-user": {"messages": [S1, U1], "tools": TOOLS},
    "tools|user-call-tool-assistant-user": {"tools": TOOLS, "messages": [
        U1, {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "22", "tool_name": "get_current_weather", "tool_call_id": "call_1"},
        {"role": "assistant", "content": "It is 22 degrees."}, U2]},
    "tools|two-calls-two-results": {"tools": TOOLS, "messages": [
        S1, U1, {"role": "Assistant", "content": "", "thinking": "Let me look.", "tool_calls": [CALL, CALL2]},
        {"role": "tool", "content": "22", "tool_name": "get_current_weather"},
        {"role": "tool", "content": "[\"doc1\"]", "tool_name": "search_docs"}]},
    "no-tools|calls-without-tools": {"messages": [
        U1, {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]},
        {"role": "tool", "content": "ok"}, U2]},
    "tools-empty|user": {"messages": [U1], "tools": []},
}
TOOL_TEMPLATES = {
    # what a template can see of the tool values, printed every way Go prints them
    "values": ("{{ .Tools }}|{{ json .Tools }}|{{ len .Tools }}|{{ if .Tools }}T{{ else }}F{{ end }}\n"
               "{{- range $i, $t := .Tools }}\n{{ $i }} {{ $t }} {{ .Type }} {{ .Function.Name }}|{{ .Function.Description }}|"
               "{{ .Function.Parameters.Type }}|{{ .Function.Parameters.Required }}|{{ json .Function.Parameters.Required }}|"
               "{{ .Function.Parameters.Properties }}|{{ json .Function }}|{{ .Function }}|{{ print .Function.Parameters }}"
               "{{- range $name, $p := .Function.Parameters.Properties }}\n  {{ $name }}: {{ $p.Type }} "
               "{{ toTypeScriptType $p }} {{ json $p.Type }} {{ $p.Description }} {{ $p.Enum }} {{ json $p.Enum }} "
               "{{ json $p }} {{ $p.Items }} {{ len $p.Required }}{{ end }}{{ end }}\n"
               "{{- range .Messages }}\n{{ . }}|{{ print . }}|{{ json . }}|{{ .Role }}|{{ .Thinking }}|{{ .ToolName }}|"
               "{{ .ToolCallID }}|{{ .ToolCalls }}|{{ json .ToolCalls }}|{{ len .ToolCalls }}"
               "{{- range .ToolCalls }}\n  {{ . }} {{ .ID }} {{ .Function.Index }} {{ .Function.Name }} "
               "{{ .Function.Arguments }} {{ json .Function.Arguments }} {{ index .Function.Arguments \"query\" }} "
               "{{ .Function.Arguments.location }}{{ range $k, $v := .Function.Arguments }} {{ $k }}={{ $v }}{{ end }}"
               "{{ end }}{{ end }}\n{{ .Think }} {{ .ThinkLevel }} {{ .IsThinkSet }}"),
    # typed values through builtins: slices keep their type, missing keys read as the element's zero value
    "values-builtins": ('{{ slice .Tools 0 1 }}|{{ slice .Tools 1 }}|{{ index .Tools 0 }}|{{ printf "%s|%v" .Tools .Tools }}|'
                        '{{ print .Tools }}|{{ html .Tools }}|{{ len .Tools }}\n'
                        '{{- range .Tools }}\n{{ .Function.Parameters.Properties.nope }}|'
                        '{{ index .Function.Parameters.Properties "nope" }}|{{ toTypeScriptType (index .Function.Parameters.Properties "nope") }}|'
                        '{{ toTypeScriptType .Function }}|{{ with .Function.Parameters.Properties }}{{ len . }}{{ else }}none{{ end }}'
                        '{{ end }}\n{{- range .Messages }}{{ range .ToolCalls }}\n{{ .Function.Arguments.nope }}|'
                        '{{ index .Function.Arguments "nope" }}|{{ printf "%v %s" .Function.Arguments .Function }}|'
                        '{{ js .Function.Arguments }}|{{ urlquery .Function.Name }}{{ end }}{{ end }}'),
    # a legacy template sees no Tools or Messages (missing keys)
    "legacy-tools": "{{ .Tools }}|{{ .Think }}|{{ .ThinkLevel }}|{{ .System }}|{{ .Prompt }}|{{ .Response }}",
    # named templates inside a chat template (Go's define/template/block)
    "define-template-block": (
        '{{- define "tool" }}<tool name="{{ .Function.Name }}">{{ json .Function.Parameters }}</tool>{{ end }}'
        '{{- define "turn" }}<{{ .Role }}>{{ block "body" . }}{{ .Content }}{{ end }}</{{ .Role }}>\n{{ end }}'
        '{{- with .Tools }}{{ range . }}{{ template "tool" . }}\n{{ end }}{{ end }}'
        '{{- range .Messages }}{{ if .ToolCalls }}{{ range .ToolCalls }}[call {{ .Function.Name }} '
        '{{ .Function.Arguments }}]{{ end }}\n{{ else }}{{ template "turn" . }}{{ end }}{{ end }}'
        '{{ block "open" $ }}<assistant>{{ if $.IsThinkSet }} think={{ $.ThinkLevel }}{{ end }}{{ end }}'),
    # a legacy template whose open turn calls Ollama's json: Ollama runs that turn as a bare template
    "legacy-json-in-open-turn": "{{ if .System }}{{ json .System }}{{ end }}<u>{{ json .Prompt }}</u>{{ .Response }}",
    "legacy-json-before-response": "<u>{{ .Prompt }}</u>{{ .Response }}{{ json .Prompt }}",
    "legacy-template-in-open-turn": '{{ define "p" }}[{{ . }}]{{ end }}{{ template "p" .Prompt }}{{ .Response }}',
    # Ollama's Parse refuses a {{ template }} call without a pipeline (TestParseError)
    "template-without-pipeline": '{{ define "x" }}X{{ end }}{{ range .Messages }}{{ template "x" }}{{ end }}',
    # .Messages named only inside a define still selects the messages path (Vars reads every template)
    "messages-only-in-define": '{{ define "m" }}{{ range .Messages }}{{ .Role }}:{{ .Content }};{{ end }}{{ end }}'
                               '{{ template "m" . }}',
}
THINKS = [None, True, "high"]

# Go's own tests of named templates (src/text/template/multi_test.go TestMultiExecute and exec_test.go's
# TestBlock, TestExecuteError's nested templates, TestMaxExecDepth), rendered by Go here; `defs` are parsed
# into the set first. tVal's fields these read: SI, I, U.V (as JSON).
T_VAL = {"SI": [3, 4, 5], "I": 17, "U": {"V": "v"}}
MULTI_TEXT = ['\n\t{{define "x"}}TEXT{{end}}\n\t{{define "dotV"}}{{.V}}{{end}}\n',
              '\n\t{{define "dot"}}{{.}}{{end}}\n\t{{define "nested"}}{{template "dot" .}}{{end}}\n']
GO_TEMPLATE_CASES = [
    {"name": "empty", "template": "", "defs": MULTI_TEXT, "data": T_VAL},
    {"name": "text", "template": "some text", "defs": MULTI_TEXT, "data": T_VAL},
    {"name": "invoke x", "template": '{{template "x" .SI}}', "defs": MULTI_TEXT, "data": T_VAL},
    {"name": "invoke x no args", "template": '{{template "x"}}', "defs": MULTI_TEXT, "data": T_VAL},
    {"name": "invoke dot int", "template": '{{template "dot" .I}}', "defs": MULTI_TEXT, "data": T_VAL},
    {"name": "invoke dot []int", "template": '{{template "dot" .SI}}', "defs": MULTI_TEXT, "data": T_VAL},
    {"name": "invoke dotV", "template": '{{template "dotV" .U}}', "defs": MULTI_TEXT, "data": T_VAL},
    {"name": "invoke nested int", "template": '{{template "nested" .I}}', "defs": MULTI_TEXT, "data": T_VAL},
    {"name": "variable declared by template", "template": '{{template "nested" $x:=.SI}},{{index $x 1}}',
     "defs": MULTI_TEXT, "data": T_VAL},
    {"name": "no args is no value", "template": '{{define "d"}}{{.}}|{{$}}{{end}}{{template "d"}}', "data": T_VAL},
    {"name": "variables do not cross", "template": '{{define "d"}}{{$x}}{{end}}{{$x := 1}}{{template "d" .}}',
     "data": T_VAL},
    {"name": "block", "template": 'a({{block "inner" .}}bar({{.}})baz{{end}})b', "data": "hello"},
    {"name": "block overlay", "template": '{{define "inner"}}foo({{.}})bar{{end}}{{template "outer" .}}',
     "defs": ['{{define "outer"}}a({{block "inner" .}}bar({{.}})baz{{end}})b{{end}}'], "data": "hello"},
    {"name": "block in range", "template": '{{range .SI}}{{block "b" .}}<{{.}}>{{end}}{{end}}', "data": T_VAL},
    {"name": "later definition wins", "template": '{{template "x"}}', "defs": ['{{define "x"}}1{{end}}',
                                                                              '{{define "x"}}2{{end}}'], "data": None},
    {"name": "empty definition keeps the old", "template": '{{template "x"}}',
     "defs": ['{{define "x"}}1{{end}}', '{{define "x"}}  {{end}}'], "data": None},
    {"name": "trim around define", "template": 'a {{- define "x" -}} X {{- end -}} b{{template "x"}}', "data": None},
    {"name": "nested error", "template": '{{template "one" .}}{{define "one"}}{{template "two" .}}{{end}}'
                                         '{{define "two"}}{{template "three" .}}{{end}}'
                                         '{{define "three"}}{{index "hi" $}}{{end}}', "data": 5},
    {"name": "max depth", "template": '{{define "t"}}{{template "t" .}}{{end}}{{template "t" .}}', "data": None},
    {"name": "undefined", "template": '{{template "nope" .}}', "data": None},
    {"name": "multiple definition", "template": '{{define "x"}}1{{end}}{{define "x"}}2{{end}}', "data": None},
    {"name": "define not at top level", "template": '{{if 1}}{{define "x"}}1{{end}}{{end}}', "data": None},
    {"name": "break in define", "template": '{{define "x"}}{{break}}{{end}}{{range .SI}}{{template "x"}}{{end}}',
     "data": T_VAL},
    {"name": "break in range in define", "template": '{{define "x"}}{{range .}}{{if eq . 4.0}}{{break}}{{end}}'
                                                     '{{.}}{{end}}{{end}}{{template "x" .SI}}', "data": T_VAL},
]


def double_cases() -> list[dict]:
    """The chats the Ollama API double answers in the tests (tests/export/test_export_deploy.py): the
    deploy test chat (the first test row's user turn, SYSTEM from the Modelfile) under the TEMPLATE
    derived from the SmolLM2 training tokenizer. Only the *inputs* come from the project; Go renders them."""
    import sys

    sys.path.insert(0, str(HERE.parent.parent))          # tests/: conftest's fixtures' data
    from transformers import AutoTokenizer

    from tasks.data.prepare import load_examples, to_messages
    from tasks.models.bootstrap import resolve_base_model
    from tasks.ollama.modelfile import build_modelfile
    from tasks.recipe import ModelConfig

    system = ModelConfig().system_prompt
    rows = [to_messages(ex, system) for ex in load_examples(HERE.parent.parent / "assets" / "slipstream-tiny.jsonl")]
    mf = build_modelfile(AutoTokenizer.from_pretrained(resolve_base_model(ModelConfig())), "x.gguf", system)
    cases = [{"template": mf.template, "messages": row["messages"][1:-1], "system": mf.system} for row in rows[10:12]]
    # a request with tools (the double passes `tools` and `think` through to Go): Ollama's tool testdata chat
    tool_dir = HERE / "ollama" / "tools"
    return cases + [{"template": (tool_dir / "qwen2.5.gotmpl").read_text(), "system": "",
                     "messages": json.loads((tool_dir / "messages.json").read_text()),
                     "tools": json.loads((tool_dir / "tools.json").read_text()), "think": None}]


def write_double_renders() -> None:
    sys_path = str(HERE.parent.parent)
    import sys

    sys.path.insert(0, sys_path)
    from ollama_reference_render import go_render, render_key

    cases = double_cases()
    rows = [{"key": render_key(c["template"], c["messages"], c["system"], c.get("tools"), c.get("think")), **c, **r}
            for c, r in zip(cases, go_render(cases), strict=True)]
    out = HERE / "double-renders.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{len(rows)} renders -> {out}")


def _go(cases: list[dict]) -> list[dict]:
    proc = subprocess.run(["go", "run", str(RENDERER)], input="".join(json.dumps(c) + "\n" for c in cases),
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _write(path: Path, rows: list[dict]) -> None:
    import re

    # Go prints a pointer inside a composite as its address: such an output is no vector
    leaked = [r.get("template_name", r.get("name")) for r in rows if re.search(r"0xc[0-9a-f]{9}", r.get("output", ""))]
    if leaked:
        raise SystemExit(f"{path.name}: outputs with Go memory addresses: {sorted(set(leaked))}")
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{len(rows)} renders -> {path}")


def main() -> None:
    templates = {p.name: p.read_text().replace("\r\n", "\n") for p in sorted((HERE / "ollama" / "templates").glob("*.gotmpl"))}
    templates |= {f"legacy:{k}": v for k, v in LEGACY.items()}
    cases = [{"name": name, "chat": chat, "template": tmpl, "messages": CHATS[chat], "system": system or ""}
             for name, tmpl in templates.items() for chat in CHATS for system in MODELFILE_SYSTEMS]
    rows = []
    for case, rendered in zip(cases, _go(cases), strict=True):
        rows.append({"template_name": case["name"], "chat": case["chat"], "system": case["system"] or None,
                     "template": case["template"], "messages": case["messages"], "go": rendered["go"],
                     **({"error": rendered["error"]} if "error" in rendered else {"output": rendered["output"]})})
    _write(HERE / "ollama" / "chat-vectors.jsonl", rows)

    # tools: every shipped and legacy template above, Ollama's old tool templates, and TOOL_TEMPLATES
    tool_dir = HERE / "ollama" / "tools"
    tool_templates = templates | {f"tools:{p.name}": p.read_text() for p in sorted(tool_dir.glob("*.gotmpl"))} \
        | {f"custom:{k}": v for k, v in TOOL_TEMPLATES.items()}
    chats = TOOL_CHATS | {"ollama-tools-testdata": {"messages": json.loads((tool_dir / "messages.json").read_text()),
                                                    "tools": json.loads((tool_dir / "tools.json").read_text())}}
    cases = [{"name": name, "chat": chat, "template": tmpl, "system": system or "", **chats[chat], "think": think}
             for name, tmpl in tool_templates.items() for chat in chats for system in MODELFILE_SYSTEMS
             for think in (THINKS if name.startswith("custom:") else [None])]
    rows = []
    for case, rendered in zip(cases, _go(cases), strict=True):
        rows.append({"template_name": case["name"], "chat": case["chat"], "system": case["system"] or None,
                     "think": case["think"], "template": case["template"], "messages": case["messages"],
                     **({"tools": case["tools"]} if "tools" in case else {}), "go": rendered["go"],
                     **({"error": rendered["error"]} if "error" in rendered else {"output": rendered["output"]})})
    _write(HERE / "ollama" / "tool-vectors.jsonl", rows)

    cases = [{"raw": True, **c} for c in GO_TEMPLATE_CASES]
    _write(HERE / "go" / "template-vectors.jsonl",
           [{"name": c["name"], "template": c["template"], "defs": c.get("defs", []), "data": c["data"], **r}
            for c, r in zip(cases, _go(cases), strict=True)])
    write_double_renders()


if __name__ == "__main__":
    main()
