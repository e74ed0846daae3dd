"""The values Ollama hands a chat template, as Go values (tasks.ollama.gotemplate's GoStruct/GoList/GoMap).

Ported from ollama/ollama@fb3076099: api/types.go (Message, ToolCall, Tool, ToolProperty, PropertyType, the
insertion-ordered ToolPropertiesMap and ToolCallFunctionArguments) and template/template.go's
template-facing copies (templateMessage, templateToolCall, templateTool, templateArgs, templateProperties),
which decide what a template sees and how it prints: `{{ .Function.Arguments }}` and
`{{ .Function.Parameters.Properties }}` are JSON with sorted keys (plain Go maps), a nested property's
`properties` keep the request's order, `{{ .Tools }}` is JSON (`null` without tools), numbers from JSON are
float64s. Built from the request's JSON (the /api/chat `messages` and `tools`).
"""

from __future__ import annotations

from typing import Any

from tasks.ollama.gotemplate import GoList, GoMap, GoStruct, GoTemplateError, _json, _json_string


def _any(v: Any) -> Any:
    """A JSON value decoded into Go's `any`: numbers are float64, objects map[string]any, arrays []any."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, dict):
        return {str(k): _any(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_any(x) for x in v]
    raise GoTemplateError(f"not a JSON value: {v!r}")


def _object(v: Any, what: str) -> dict:
    if not isinstance(v, dict):
        raise GoTemplateError(f"{what}: want a JSON object, got {v!r}")
    return v


def _strings(v: Any, what: str) -> GoList:
    if v is None:
        return GoList()
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise GoTemplateError(f"{what}: want a list of strings, got {v!r}")
    return GoList(v)


class PropertyType(GoList):
    """api.PropertyType: one JSON type name or several; prints as the name or `[a b]`."""

    def String(self) -> str:
        return "" if not self else self[0] if len(self) == 1 else "[" + " ".join(self) + "]"

    def MarshalJSON(self) -> str:
        return _json_string(self[0]) if len(self) == 1 else "[" + ",".join(map(_json_string, self)) + "]"

    @classmethod
    def from_json(cls, v: Any) -> PropertyType:
        if v is None:
            return cls()
        if isinstance(v, str):
            return cls([v])
        return cls(list(_strings(v, "property type")))


class ToolPropertiesMap(GoStruct):
    """*api.ToolPropertiesMap: insertion-ordered properties (JSON in the request's order)."""

    POINTER = True

    def __init__(self, items: dict[str, ToolProperty]):
        self.items = items

    def MarshalJSON(self) -> str:
        return "{" + ",".join(f"{_json_string(k)}:{_json(v)}" for k, v in self.items.items()) + "}"


_TS_TYPES = {"string": "string", "number": "number", "integer": "number", "boolean": "boolean",
             "array": "any[]", "object": "Record<string, any>", "null": "null"}


class ToolProperty(GoStruct):
    """api.ToolProperty (a value, not a pointer)."""

    FIELDS = {"AnyOf": "any_of", "Type": "type", "Items": "items", "Description": "description", "Enum": "enum",
              "Properties": "properties", "Required": "required"}
    JSON = [("anyOf", "any_of", True), ("type", "type", True), ("items", "items", True),
            ("description", "description", True), ("enum", "enum", True), ("properties", "properties", True),
            ("required", "required", True)]

    def __init__(self, any_of=None, type=None, items=None, description="", enum=None, properties=None,
                 required=None):
        self.any_of = GoList(any_of) if any_of is not None else GoList()
        self.type = type if type is not None else PropertyType()
        self.items, self.description, self.properties = items, description, properties
        self.enum = GoList(enum) if enum is not None else GoList()
        self.required = required if required is not None else GoList()

    @classmethod
    def from_json(cls, v: Any) -> ToolProperty:
        v = _object(v, "tool property")
        props = v.get("properties")
        return cls(any_of=[cls.from_json(a) for a in v["anyOf"]] if v.get("anyOf") is not None else None,
                   type=PropertyType.from_json(v.get("type")), items=_any(v.get("items")),
                   description=v.get("description") or "",
                   enum=[_any(e) for e in v["enum"]] if v.get("enum") is not None else None,
                   properties=None if props is None else ToolPropertiesMap(
                       {k: cls.from_json(p) for k, p in _object(props, "properties").items()}),
                   required=_strings(v.get("required"), "required"))

    def ToTypeScriptType(self) -> str:
        if self.any_of:
            return " | ".join(a.ToTypeScriptType() for a in self.any_of)
        if not self.type:
            return "any"
        return " | ".join(_TS_TYPES.get(t, "any") for t in self.type)


class TemplateProperties(GoMap):
    """templateProperties: map[string]api.ToolProperty, printed as JSON (`{}` when nil)."""

    def String(self) -> str:
        return "{}" if self.is_nil else _json(self)

    def zero(self):
        return ToolProperty()


class TemplateArgs(GoMap):
    """templateArgs: a tool call's arguments, map[string]any, printed as JSON (`{}` when nil)."""

    def String(self) -> str:
        return "{}" if self.is_nil else _json(self)


class ToolParameters(GoStruct):
    """templateToolFunctionParameters."""

    FIELDS = {"Type": "type", "Defs": "defs", "Items": "items", "Required": "required", "Properties": "properties"}
    JSON = [("type", "type", False), ("$defs", "defs", True), ("items", "items", True),
            ("required", "required", True), ("properties", "properties", False)]

    def __init__(self, v: dict):
        self.type = v.get("type") or ""
        self.defs, self.items = _any(v.get("$defs")), _any(v.get("items"))
        self.required = _strings(v.get("required"), "required")
        props = v.get("properties")
        self.properties = TemplateProperties(None if props is None else {
            k: ToolProperty.from_json(p) for k, p in _object(props, "properties").items()})


class ToolFunction(GoStruct):
    """templateToolFunction (no String method: `{{ .Function }}` prints as a Go struct)."""

    FIELDS = {"Name": "name", "Description": "description", "Parameters": "parameters"}
    JSON = [("name", "name", False), ("description", "description", False), ("parameters", "parameters", False)]

    def __init__(self, v: dict):
        self.name, self.description = v.get("name") or "", v.get("description") or ""
        self.parameters = ToolParameters(_object(v.get("parameters") or {}, "parameters"))


class Tool(GoStruct):
    """templateTool: printed as its JSON."""

    FIELDS = {"Type": "type", "Items": "items", "Function": "function"}
    JSON = [("type", "type", False), ("items", "items", True), ("function", "function", False)]

    def __init__(self, v: Any):
        v = _object(v, "tool")
        self.type, self.items = v.get("type") or "", _any(v.get("items"))
        self.function = ToolFunction(_object(v.get("function") or {}, "tool function"))

    def String(self) -> str:
        return _json(self)


class Tools(GoList):
    """templateTools: printed as JSON (`null` when the request has no tools)."""

    def String(self) -> str:
        return _json(self)


class ToolCallFunction(GoStruct):
    """templateToolCallFunction."""

    FIELDS = {"Index": "index", "Name": "name", "Arguments": "arguments"}

    def __init__(self, v: dict):
        index = v.get("index", 0)
        if isinstance(index, bool) or not isinstance(index, int):
            raise GoTemplateError(f"tool call index: want an integer, got {index!r}")
        self.index, self.name = index, v.get("name") or ""
        args = v.get("arguments")
        self.arguments = TemplateArgs(None if args is None else _any(_object(args, "tool call arguments")))


class ToolCall(GoStruct):
    """templateToolCall."""

    FIELDS = {"ID": "id", "Function": "function"}

    def __init__(self, v: Any):
        v = _object(v, "tool call")
        self.id = v.get("id") or ""
        self.function = ToolCallFunction(_object(v.get("function") or {}, "tool call function"))


def tools_for_template(tools: list | None) -> Tools:
    """convertToolsForTemplate: the request's `tools` (nil when absent)."""
    return Tools(None if tools is None else [Tool(t) for t in tools])


def tool_calls_for_template(calls: list | None) -> GoList:
    """A message's `tool_calls` as the template sees them (nil when there are none)."""
    return GoList([ToolCall(c) for c in calls] if calls else None)
