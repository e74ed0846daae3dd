"""The part of Go's `text/template` language that chat templates (Ollama's TEMPLATE) use.

Text, `{{- -}}` trimming, comments, `if`/`else if`/`else`, `range` (with `$i, $m :=`), `with`,
variables, fields, parenthesised pipelines, `|`, and the functions and, or, not, eq, ne, lt, le, gt, ge,
len, index, slice, print, json, executed with option missingkey=zero as Ollama does. Anything else is
refused with `GoTemplateError` naming it, never rendered approximately. Ollama's own rules around the
template (SYSTEM, collation, legacy templates) are in tasks.ollama.prompt.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any


class GoTemplateError(ValueError):
    """The template uses something outside the supported subset, or fails to execute."""


# ----------------------------------------------------------------------------------------------- lexing

_ACTION = re.compile(r"\{\{(-[ \t\r\n])?(.*?)([ \t\r\n]-)?\}\}", re.S)
_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<num>-?\d+(?:\.\d+)?)
  | (?P<decl>:=)
  | (?P<assign>=)
  | (?P<punct>[()|,])
  | (?P<var>\$[A-Za-z0-9_]*)
  | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
""", re.X)
# A chained field after a variable or parenthesis: $m.Role, (index .Messages 0).Role
_CHAIN = re.compile(r"(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def _tokens(src: str, where: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if not m:
            raise GoTemplateError(f"{where}: cannot parse {src[pos:pos + 20]!r}")
        kind = m.lastgroup
        text = m.group()
        pos = m.end()
        if kind == "ws":
            continue
        out.append((kind, text))
        if kind == "var" or (kind, text) == ("punct", ")"):
            # `$m.Role` / `(...).Role`: the chained fields become their own token
            if c := _CHAIN.match(src, pos):
                out.append(("chain", c.group()))
                pos = c.end()
    return out


# ------------------------------------------------------------------------------------------------ nodes

@dataclass
class Text:
    text: str


@dataclass
class Pipe:
    decl: list[str]          # variables declared (:=) or assigned (=)
    assign: bool             # True for `=`
    cmds: list[list]         # each command: a list of operands; an operand is a tuple


@dataclass
class Action:
    pipe: Pipe


@dataclass
class Branch:
    kind: str                # "if" | "range" | "with"
    pipe: Pipe
    body: list = field(default_factory=list)
    else_body: list | None = None


def _parse_operand(toks: list, i: int, where: str) -> tuple[tuple, int]:
    kind, text = toks[i]
    if kind == "punct" and text == "(":
        depth, j = 1, i + 1
        while j < len(toks) and depth:
            depth += {"(": 1, ")": -1}.get(toks[j][1], 0) if toks[j][0] == "punct" else 0
            j += 1
        if depth:
            raise GoTemplateError(f"{where}: unclosed '('")
        inner = _parse_pipe(toks[i + 1:j - 1], where)
        node: tuple = ("pipe", inner)
        i = j
        if i < len(toks) and toks[i][0] == "chain":
            node = ("chain", node, toks[i][1].split(".")[1:])
            i += 1
        return node, i
    if kind == "field":
        return ("field", [] if text == "." else text.split(".")[1:]), i + 1
    if kind == "var":
        node = ("var", text)
        i += 1
        if i < len(toks) and toks[i][0] == "chain":
            node = ("chain", node, toks[i][1].split(".")[1:])
            i += 1
        return node, i
    if kind == "str":
        return ("lit", json.loads(text)), i + 1
    if kind == "raw":
        return ("lit", text[1:-1]), i + 1
    if kind == "num":
        return ("lit", float(text) if "." in text else int(text)), i + 1
    if kind == "ident":
        if text in ("true", "false"):
            return ("lit", text == "true"), i + 1
        if text == "nil":
            return ("lit", None), i + 1
        if text not in _FUNCS:
            raise GoTemplateError(f"{where}: function {text!r} is not supported")
        return ("func", text), i + 1
    raise GoTemplateError(f"{where}: unexpected {text!r}")


def _parse_pipe(toks: list, where: str) -> Pipe:
    decl, assign = [], False
    # `$x := ...`, `$i, $m := ...`, `$x = ...`
    for j, (kind, text) in enumerate(toks):
        if kind in ("decl", "assign"):
            names = [t for k, t in toks[:j] if k == "var"]
            if not names or any(k not in ("var", "punct") for k, _ in toks[:j]):
                raise GoTemplateError(f"{where}: bad variable declaration")
            decl, assign, toks = names, kind == "assign", toks[j + 1:]
            break
    cmds, current, i = [], [], 0
    while i < len(toks):
        if toks[i] == ("punct", "|"):
            cmds.append(current)
            current, i = [], i + 1
            continue
        operand, i = _parse_operand(toks, i, where)
        current.append(operand)
    cmds.append(current)
    if any(not c for c in cmds):
        raise GoTemplateError(f"{where}: empty command in pipeline")
    return Pipe(decl, assign, cmds)


def parse(src: str) -> list:
    """Parse a template into a node list.

    Raises:
        GoTemplateError: a construct outside the supported subset, or unbalanced blocks.
    """
    root: list = []
    stack: list[tuple[list, Branch | None]] = [(root, None)]
    pos, trim_next = 0, False
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        if text:
            stack[-1][0].append(Text(text))
        pos, trim_next = m.end(), bool(m.group(3))
        body = m.group(2).strip()
        where = f"template char {m.start()} {{{{{body[:40]}}}}}"
        if body.startswith("/*"):
            if not body.endswith("*/"):
                raise GoTemplateError(f"{where}: unclosed comment")
            continue
        toks = _tokens(body, where)
        if not toks:
            raise GoTemplateError(f"{where}: empty action")
        head = toks[0][1] if toks[0][0] == "ident" else None
        if head in ("if", "range", "with"):
            branch = Branch(head, _parse_pipe(toks[1:], where))
            stack[-1][0].append(branch)
            stack.append((branch.body, branch))
        elif head == "else":
            if len(stack) == 1:
                raise GoTemplateError(f"{where}: 'else' outside a block")
            _, branch = stack.pop()
            branch.else_body = []
            if len(toks) > 1 and toks[1] == ("ident", "if"):
                # `else if X` is `else` + a nested `if X` that the same `end` closes.
                nested = Branch("if", _parse_pipe(toks[2:], where))
                branch.else_body.append(nested)
                stack.append((branch.else_body, _Chained(branch)))
                stack.append((nested.body, nested))
            else:
                stack.append((branch.else_body, branch))
        elif head == "end":
            if len(stack) == 1:
                raise GoTemplateError(f"{where}: 'end' without a block")
            stack.pop()
            while len(stack) > 1 and isinstance(stack[-1][1], _Chained):
                stack.pop()
        elif head in ("define", "template", "block", "break", "continue"):
            raise GoTemplateError(f"{where}: {head!r} is not supported")
        else:
            stack[-1][0].append(Action(_parse_pipe(toks, where)))
    text = src[pos:]
    if trim_next:
        text = text.lstrip(" \t\r\n")
    if text:
        stack[-1][0].append(Text(text))
    if len(stack) != 1:
        raise GoTemplateError("template: unclosed block (missing {{ end }})")
    return root


@dataclass
class _Chained:
    """Marks an `else if` frame: the `end` that closes the nested if closes this one too."""

    outer: Branch


# ------------------------------------------------------------------------------------------- execution

_NO_VALUE = object()


def _truth(v: Any) -> bool:
    return not (v is None or v is _NO_VALUE or v is False or v == 0 and not isinstance(v, bool)
                or (isinstance(v, (str, list, tuple, dict)) and len(v) == 0))


def _fmt(v: Any) -> str:
    if v is None or v is _NO_VALUE:
        return "<no value>"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + " ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _eq(a, *bs):
    return any(a == b for b in bs)


def _slice(v, *idx):
    if len(idx) > 2:
        raise GoTemplateError("slice: 3-index slices are not supported")
    return v[idx[0]:idx[1]] if len(idx) == 2 else v[idx[0]:] if idx else v


_FUNCS = {
    "and": None, "or": None,   # short-circuit: handled in _call
    "not": lambda v: not _truth(v),
    "eq": _eq, "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b, "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
    "len": len,
    "index": lambda v, *keys: _index(v, keys),
    "slice": _slice,
    "print": lambda *a: "".join(_fmt(x) for x in a),
    "json": lambda v: json.dumps(v, ensure_ascii=False, separators=(",", ":")),
}


def _index(v, keys):
    for k in keys:
        v = v[k]
    return v


class _Scope:
    def __init__(self, root: Any):
        self.frames: list[dict] = [{"$": root}]

    def get(self, name: str):
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise GoTemplateError(f"undefined variable {name}")

    def set(self, name: str, value, assign: bool) -> None:
        if assign:
            for frame in reversed(self.frames):
                if name in frame:
                    frame[name] = value
                    return
            raise GoTemplateError(f"assignment to undeclared variable {name}")
        self.frames[-1][name] = value


def _field(v: Any, names: list[str]):
    for name in names:
        if isinstance(v, dict):
            # missingkey=zero on map[string]any: a missing key is the zero value (nil)
            v = v.get(name, _NO_VALUE)
        elif hasattr(v, "FIELDS"):   # a struct: only its exported fields exist
            if name not in v.FIELDS:
                raise GoTemplateError(f"can't evaluate field {name} in type {type(v).__name__}")
            v = getattr(v, v.FIELDS[name])
        elif v is None or v is _NO_VALUE:
            raise GoTemplateError(f"nil pointer evaluating .{name}")
        else:
            raise GoTemplateError(f"can't evaluate field {name} in {type(v).__name__}")
    return v


class _Exec:
    def __init__(self, root: Any):
        self.scope = _Scope(root)
        self.out: list[str] = []

    def operand(self, node: tuple, dot: Any):
        kind = node[0]
        if kind == "lit":
            return node[1]
        if kind == "field":
            return _field(dot, node[1])
        if kind == "var":
            return self.scope.get(node[1])
        if kind == "pipe":
            return self.pipe(node[1], dot)
        if kind == "chain":
            return _field(self.operand(node[1], dot), node[2])
        raise GoTemplateError(f"{node[1]!r} is a function: call it with arguments")

    def command(self, cmd: list, dot: Any, piped=_NO_VALUE):
        first = cmd[0]
        if first[0] != "func":
            if len(cmd) > 1 or piped is not _NO_VALUE:
                raise GoTemplateError("can't give arguments to a non-function")
            return self.operand(first, dot)
        name = first[1]
        raw = list(cmd[1:])
        if name in ("and", "or"):
            values = [lambda n=n: self.operand(n, dot) for n in raw]
            if piped is not _NO_VALUE:
                values.append(lambda: piped)
            result = None
            for get in values:
                result = get()
                if _truth(result) != (name == "and"):
                    return result
            return result
        args = [self.operand(n, dot) for n in raw]
        if piped is not _NO_VALUE:
            args.append(piped)
        try:
            return _FUNCS[name](*args)
        except GoTemplateError:
            raise
        except Exception as exc:
            raise GoTemplateError(f"error calling {name}: {exc}") from None

    def pipe(self, p: Pipe, dot: Any):
        value = _NO_VALUE
        for i, cmd in enumerate(p.cmds):
            value = self.command(cmd, dot, _NO_VALUE if i == 0 else value)
        if p.decl:
            if len(p.decl) != 1:
                raise GoTemplateError("only `range` may declare two variables")
            self.scope.set(p.decl[0], value, p.assign)
        return value

    def run(self, nodes: list, dot: Any) -> None:
        for node in nodes:
            if isinstance(node, Text):
                self.out.append(node.text)
            elif isinstance(node, Action):
                value = self.pipe(node.pipe, dot)
                if not node.pipe.decl:
                    self.out.append(_fmt(value))
            elif isinstance(node, Branch):
                self.branch(node, dot)

    def branch(self, b: Branch, dot: Any) -> None:
        self.scope.frames.append({})
        try:
            if b.kind == "range":
                decl = b.pipe.decl
                value = self.pipe(Pipe([], False, b.pipe.cmds), dot)
                items = list(value.items()) if isinstance(value, dict) else list(enumerate(value or []))
                if not items:
                    if b.else_body is not None:
                        self.run(b.else_body, dot)
                    return
                for key, item in items:
                    self.scope.frames.append({})
                    if len(decl) == 1:
                        self.scope.set(decl[0], item, False)
                    elif len(decl) == 2:
                        self.scope.set(decl[0], key, False)
                        self.scope.set(decl[1], item, False)
                    self.run(b.body, item)
                    self.scope.frames.pop()
                return
            value = self.pipe(b.pipe, dot)
            if _truth(value):
                self.run(b.body, value if b.kind == "with" else dot)
            elif b.else_body is not None:
                self.run(b.else_body, dot)
        finally:
            self.scope.frames.pop()


def execute(nodes: list, data: Any) -> str:
    """Run parsed nodes over `data` (dicts, lists, structs with FIELDS, strings, numbers, bools)."""
    ex = _Exec(data)
    ex.run(nodes, data)
    return "".join(ex.out)


def identifiers(nodes: list) -> set[str]:
    """Every field and variable name the template mentions, lower-cased (Ollama's Template.Vars)."""
    names: set[str] = set()

    def from_operand(op: tuple) -> None:
        if op[0] == "field":
            names.update(n.lower() for n in op[1])
        elif op[0] == "var":
            names.add(op[1].lstrip("$").lower())
        elif op[0] == "pipe":
            from_pipe(op[1])
        elif op[0] == "chain":
            from_operand(op[1])
            names.update(n.lower() for n in op[2])

    def from_pipe(p: Pipe) -> None:
        for cmd in p.cmds:
            for op in cmd:
                from_operand(op)

    def walk(ns: list) -> None:
        for n in ns:
            if isinstance(n, Action):
                from_pipe(n.pipe)
            elif isinstance(n, Branch):
                from_pipe(n.pipe)
                walk(n.body)
                walk(n.else_body or [])

    walk(nodes)
    return names


def cut_at_response(nodes: list) -> list:
    """Ollama's deleteNode: drop the first `.Response` field and every node after it, in tree order."""
    cut = False

    def mentions_response(p: Pipe) -> bool:
        return any(op[0] == "field" and "Response" in op[1] for cmd in p.cmds for op in cmd)

    def walk(ns: list) -> list:
        nonlocal cut
        kept = []
        for n in ns:
            if cut:
                continue
            if isinstance(n, Action) and mentions_response(n.pipe):
                cut = True
                continue
            if isinstance(n, Branch):
                n = Branch(n.kind, n.pipe, walk(n.body), walk(n.else_body) if n.else_body is not None else None)
            kept.append(n)
        return kept

    return walk(nodes)
