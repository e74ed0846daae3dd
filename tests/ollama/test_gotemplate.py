"""Ollama's TEMPLATE rendering: Go text/template semantics (tasks.ollama.gotemplate) and Ollama's message rules (tasks.ollama.prompt)."""

import pytest

from tasks.ollama.gotemplate import GoTemplateError, execute, parse
from tasks.ollama.prompt import Message, collate, render_ollama_chat

CHAT = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": "Bye"}]


def test_trim_markers_range_variables_and_else_if():
    tmpl = ("{{- range $i, $m := .Messages }}\n"
            "  {{- if eq $m.Role \"system\" }}S:{{ $m.Content }}\n"
            "  {{- else if eq .Role \"user\" }}U{{ $i }}:{{ .Content }}\n"
            "  {{- else }}A:{{ .Content }}\n"
            "  {{- end }};\n"
            "{{- end }}")
    out = render_ollama_chat(tmpl, CHAT, system="sys")
    # `{{-` eats the newline and indentation before each action; the literal ";" and "\n" stay.
    assert out == "S:sys;U1:Hello;A:Hi;U3:Bye;"


def test_system_is_prepended_only_when_the_chat_has_none_and_same_roles_merge():
    tmpl = "{{ range .Messages }}[{{ .Role }}:{{ .Content }}]{{ end }}"
    assert render_ollama_chat(tmpl, CHAT, system="S") == "[system:S][user:Hello][assistant:Hi][user:Bye]"
    own = [{"role": "system", "content": "mine"}, *CHAT]
    assert render_ollama_chat(tmpl, own, system="S").startswith("[system:mine][user:Hello]")
    system, merged = collate([Message("user", "a"), Message("user", "b"), Message("system", "s")])
    assert system == "s" and [(m.role, m.content) for m in merged] == [("user", "a\n\nb"), ("system", "s")]


def test_legacy_template_runs_per_turn_and_stops_at_the_open_response():
    tmpl = ("{{ if .System }}<s>{{ .System }}</s>{{ end }}<u>{{ .Prompt }}</u>"
            "<a>{{ .Response }}</a>")
    out = render_ollama_chat(tmpl, CHAT, system="S")
    assert out == "<s>S</s><u>Hello</u><a>Hi</a><u>Bye</u><a>"


def test_template_without_response_gets_one_appended():
    # Ollama appends {{ .Response }} to a template naming neither .Messages nor .Response.
    assert render_ollama_chat("Q: {{ .Prompt }}\nA: ", [CHAT[0]], system=None) == "Q: Hello\nA: "


def test_functions_and_missing_keys():
    nodes = parse('{{ len .Messages }} {{ and .X "y" }} {{ or .X "z" }} {{ not .X }} {{ .X }} '
                  '{{ (index .Messages 0).Role }} {{ slice "abcdef" 1 3 }} {{ json .Y }}')
    out = execute(nodes, {"Messages": [Message("user", "q")], "Y": {"a": 1}})
    assert out == '1 <no value> z true <no value> user bc {"a":1}'


@pytest.mark.parametrize("tmpl, message", [
    ('{{ template "x" . }}', "template 'x' not defined"),
    ('{{ define "x" }}X{{ end }}{{ template "x" }}', "undefined template specified"),   # Ollama's TestParseError
    ('{{ if 1 }}{{ define "x" }}X{{ end }}{{ end }}', "define"),
    ("{{ call .Prompt }}", "function 'call' is not supported"),
    ("{{ break }}", "outside {{range}}"),
    ("{{ if .Prompt }}unclosed", "unclosed block"),
    ("{{ range .Messages }}{{ .Nope }}{{ end }}", "can't evaluate field Nope"),
    ("{{ .Messages }}", "memory address"),   # Go prints [0xc000... 0xc000...]: nothing can match it
])
def test_unsupported_or_broken_templates_are_refused_with_the_reason(tmpl, message):
    with pytest.raises(GoTemplateError, match=message):
        render_ollama_chat(tmpl, CHAT, system=None)


def test_currentdate_and_yesterdaydate_are_the_local_dates():
    import datetime

    out = render_ollama_chat("{{ range .Messages }}{{ .Content }}{{ end }} {{ currentDate }} {{ yesterdayDate }}",
                             [CHAT[0]], system=None)
    today = datetime.date.today()
    assert out in (f"Hello {today} {today - datetime.timedelta(days=1)}",
                   f"Hello {datetime.date.today()} {datetime.date.today() - datetime.timedelta(days=1)}")


@pytest.mark.parametrize("kwargs, message", [
    ({"think": "extreme"}, "invalid think value"),
    ({"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, "images"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": []}}}]},
     "want a JSON object"),
])
def test_requests_ollama_refuses_or_this_renderer_cannot_match_are_refused(kwargs, message):
    args = {"template": "{{ range .Messages }}{{ .Content }}{{ end }}", "messages": CHAT, "system": None, **kwargs}
    with pytest.raises(GoTemplateError, match=message):
        render_ollama_chat(**args)
