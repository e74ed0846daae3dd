"""The prompt Ollama builds for /api/chat from a Modelfile, without Ollama.

Ollama renders a chat with its Go template (tasks.ollama.gotemplate) over the request's messages: SYSTEM from
the Modelfile is prepended when the first message is not a system message, consecutive messages of one
role are merged with a blank line, and a template that never names `.Messages` is run once per turn in
the legacy System/Prompt/Response style, with everything from the first `{{ .Response }}` on cut away
for the open turn (ollama `server/routes.go` ChatHandler, `template/template.go` Parse, Execute,
collate and deleteNode). That last turn runs as Ollama runs it: a bare template without Ollama's functions
or the named templates. The request's `tools`, the messages' tool calls and tool results, and `think`
(Think/ThinkLevel/IsThinkSet, as server/prompt.go sets them) reach the template as Ollama's Go values
(tasks.ollama.template_values).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tasks.ollama.gotemplate import (Action, GoList, GoStruct, GoTemplateError, Pipe, Tree, cut_at_response, execute,
                                     identifiers, parse)
from tasks.ollama.template_values import tool_calls_for_template, tools_for_template

_THINK_LEVELS = ("high", "medium", "low", "max")


@dataclass
class Message(GoStruct):
    """Ollama's templateMessage, what `{{ range .Messages }}` yields (a *templateMessage)."""

    role: str
    content: str
    thinking: str = ""
    images: GoList = field(default_factory=GoList)
    tool_calls: GoList = field(default_factory=GoList)
    tool_name: str = ""
    tool_call_id: str = ""

    # in templateMessage's field order (how `{{ . }}` and `json` print a message)
    FIELDS = {"Role": "role", "Content": "content", "Thinking": "thinking", "Images": "images",
              "ToolCalls": "tool_calls", "ToolName": "tool_name", "ToolCallID": "tool_call_id"}
    POINTER = True


def collate(messages: list[Message]) -> tuple[str, list[Message]]:
    """Ollama's collate: all system contents joined by a blank line, and same-role runs merged (tool
    results stay apart)."""
    system = [m.content for m in messages if m.role == "system"]
    merged: list[Message] = []
    for m in messages:
        if merged and merged[-1].role == m.role and m.role != "tool":
            merged[-1] = replace(merged[-1], content=merged[-1].content + "\n\n" + m.content)
        else:
            merged.append(replace(m))
    return "\n\n".join(system), merged


def _message(m: dict) -> Message:
    """api.Message from the request's JSON (Ollama lower-cases the role)."""
    if m.get("images"):
        raise GoTemplateError("messages with images are not rendered here (Ollama adds [img-N] tags to them)")
    return Message(str(m.get("role") or "").lower(), m.get("content") or "", thinking=m.get("thinking") or "",
                   tool_calls=tool_calls_for_template(m.get("tool_calls")), tool_name=m.get("tool_name") or "",
                   tool_call_id=m.get("tool_call_id") or "")


def _think_values(think: bool | str | None) -> dict:
    """server/prompt.go renderPrompt: Think, ThinkLevel and IsThinkSet from the request's `think`."""
    if think is None:
        return {"Think": False, "ThinkLevel": "", "IsThinkSet": False}
    if isinstance(think, bool):
        return {"Think": think, "ThinkLevel": "medium" if think else "", "IsThinkSet": True}
    if think not in _THINK_LEVELS:
        raise GoTemplateError(f"invalid think value: {think!r} (must be one of {_THINK_LEVELS}, true or false)")
    return {"Think": True, "ThinkLevel": think, "IsThinkSet": True}


def render_ollama_chat(template: str, messages: list[dict], system: str | None, tools: list[dict] | None = None,
                       think: bool | str | None = None) -> str:
    """The prompt text Ollama builds for /api/chat with these messages and this Modelfile.

    Args:
        template: the Modelfile TEMPLATE.
        messages: the request's chat messages (role, content, and optionally thinking, tool_calls
            [{"id", "function": {"index", "name", "arguments": {...}}}], tool_name, tool_call_id).
        system: the Modelfile SYSTEM (prepended when the first message is not a system message).
        tools: the request's `tools` (Ollama's api.Tool JSON); None when the request has none.
        think: the request's `think` (true/false or "high"/"medium"/"low"/"max"); None when unset.

    Raises:
        GoTemplateError: the template is outside the supported subset, fails to execute, or Ollama would
            refuse it.
    """
    msgs = [_message(m) for m in messages]
    if msgs and msgs[0].role != "system" and system:
        msgs.insert(0, Message("system", system))
    think_values = _think_values(think)
    nodes = parse(template)
    names = identifiers(nodes)
    if "messages" not in names and "response" not in names:
        nodes = Tree([*nodes, Action(Pipe([], False, [[("field", ["Response"])]]))], nodes.defines)
    joined_system, collated = collate(msgs)
    if "messages" in names:
        return execute(nodes, {"System": joined_system, "Messages": collated, "Tools": tools_for_template(tools),
                               "Response": "", **think_values})
    # Legacy templates run once per turn; the last (open) turn stops before {{ .Response }}, and runs as
    # Ollama runs it: a bare template, without Ollama's functions or the named templates.
    out, sys_, prompt, response = [], "", "", ""

    def turn(ns: list, ollama_funcs: bool = True) -> None:
        nonlocal sys_, prompt, response
        out.append(execute(ns, {"System": sys_, "Prompt": prompt, "Response": response, **think_values},
                           ollama_funcs=ollama_funcs))
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
    turn(cut_at_response(nodes), ollama_funcs=False)
    return "".join(out)
