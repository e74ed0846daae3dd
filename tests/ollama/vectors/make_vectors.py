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
    return [{"template": mf.template, "messages": row["messages"][1:-1], "system": mf.system} for row in rows[10:12]]


def write_double_renders() -> None:
    sys_path = str(HERE.parent.parent)
    import sys

    sys.path.insert(0, sys_path)
    from ollama_reference_render import go_render, render_key

    cases = double_cases()
    rows = [{"key": render_key(c["template"], c["messages"], c["system"]), **c, **r}
            for c, r in zip(cases, go_render(cases), strict=True)]
    out = HERE / "double-renders.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{len(rows)} renders -> {out}")


def main() -> None:
    templates = {p.name: p.read_text().replace("\r\n", "\n") for p in sorted((HERE / "ollama" / "templates").glob("*.gotmpl"))}
    templates |= {f"legacy:{k}": v for k, v in LEGACY.items()}
    cases = [{"name": name, "chat": chat, "template": tmpl, "messages": CHATS[chat], "system": system or ""}
             for name, tmpl in templates.items() for chat in CHATS for system in MODELFILE_SYSTEMS]
    proc = subprocess.run(["go", "run", str(RENDERER)], input="".join(json.dumps(c) + "\n" for c in cases),
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    rows = []
    for case, line in zip(cases, proc.stdout.splitlines(), strict=True):
        rendered = json.loads(line)
        rows.append({"template_name": case["name"], "chat": case["chat"], "system": case["system"] or None,
                     "template": case["template"], "messages": case["messages"], "go": rendered["go"],
                     **({"error": rendered["error"]} if "error" in rendered else {"output": rendered["output"]})})
    out = HERE / "ollama" / "chat-vectors.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{len(rows)} renders -> {out}")
    write_double_renders()


if __name__ == "__main__":
    main()
