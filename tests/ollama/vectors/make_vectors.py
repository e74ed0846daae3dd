"""Regenerate the expected renders in this folder with Go's own text/template (needs Go >= 1.18 on PATH;
the tests themselves need no Go). Run from the repository root:

    python tests/ollama/vectors/make_vectors.py

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


if __name__ == "__main__":
    main()
