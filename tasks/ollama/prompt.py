"""The prompt Ollama builds for /api/chat from a Modelfile, without Ollama.

Ollama renders a chat with its Go template (tasks.ollama.gotemplate) over the request's messages: SYSTEM from
the Modelfile is prepended when the first message is not a system message, consecutive messages of one
role are merged with a blank line, and a template that never names `.Messages` is run once per turn in
the legacy System/Prompt/Response style, with everything from the first `{{ .Response }}` on cut away
for the open turn (ollama `server/routes.go` ChatHandler, `template/template.go` Parse, Execute,
collate and deleteNode).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tasks.ollama.gotemplate import Action, Pipe, cut_at_response, execute, identifiers, parse


@dataclass
class Message:
    """The fields of Ollama's api.Message that a template can read (.Role, .Content, ...)."""

    role: str
    content: str
    thinking: str = ""
    images: list = field(default_factory=list)
    tool_calls: list = field(default_factory=list)
    tool_name: str = ""
    tool_call_id: str = ""

    # Ollama's templateMessage, in its field order (how `{{ . }}` and `json` print a message)
    FIELDS = {"Role": "role", "Content": "content", "Thinking": "thinking", "Images": "images",
              "ToolCalls": "tool_calls", "ToolName": "tool_name", "ToolCallID": "tool_call_id"}


def collate(messages: list[Message]) -> tuple[str, list[Message]]:
    """Ollama's collate: all system contents joined by a blank line, and same-role runs merged."""
    system = [m.content for m in messages if m.role == "system"]
    merged: list[Message] = []
    for m in messages:
        if merged and merged[-1].role == m.role and m.role != "tool":
            merged[-1] = replace(merged[-1], content=merged[-1].content + "\n\n" + m.content)
        else:
            merged.append(replace(m))
    return "\n\n".join(system), merged


def render_ollama_chat(template: str, messages: list[dict], system: str | None) -> str:
    """The prompt text Ollama builds for /api/chat with these messages and this Modelfile.

    Args:
        template: the Modelfile TEMPLATE.
        messages: the request's chat messages ({"role", "content"}).
        system: the Modelfile SYSTEM (prepended when the first message is not a system message).

    Raises:
        GoTemplateError: the template is outside the supported subset or fails to execute.
    """
    msgs = [Message(m["role"], m.get("content") or "", tool_name=m.get("tool_name") or "",
                    tool_call_id=m.get("tool_call_id") or "") for m in messages]
    if msgs and msgs[0].role != "system" and system:
        msgs.insert(0, Message("system", system))
    nodes = parse(template)
    names = identifiers(nodes)
    if "messages" not in names and "response" not in names:
        nodes = nodes + [Action(Pipe([], False, [[("field", ["Response"])]]))]
    joined_system, collated = collate(msgs)
    if "messages" in names:
        return execute(nodes, {"System": joined_system, "Messages": collated, "Tools": None, "Response": "",
                               "Think": False, "IsThinkSet": False})
    # Legacy templates run once per turn; the last (open) turn stops before {{ .Response }}.
    out, sys_, prompt, response = [], "", "", ""

    def turn(ns: list) -> None:
        nonlocal sys_, prompt, response
        out.append(execute(ns, {"System": sys_, "Prompt": prompt, "Response": response,
                                "Think": False, "IsThinkSet": False}))
        sys_, prompt, response = "", "", ""

    for m in collated:
        if m.role == "system":
            if prompt or response:
                turn(nodes)
            sys_ = m.content
        elif m.role == "user":
            if response:
                turn(nodes)
            prompt = m.content
        elif m.role == "assistant":
            response = m.content
    turn(cut_at_response(nodes))
    return "".join(out)
