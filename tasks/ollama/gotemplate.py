"""Go's `text/template` language as Ollama executes chat templates (its Modelfile TEMPLATE).

Text, `{{- -}}` trimming, comments, `if`/`else if`/`else`, `range` (with `$i, $m :=`, `break`,
`continue`; maps in sorted key order), `with`, `define`/`template`/`block` (named templates: a set shared
across parses, later non-empty definitions win, `$` is the callee's dot), variables (`$`, `:=`, `=`),
fields, Go number, string, raw-string and character constants, parenthesised pipelines, `|`, and the
builtins and, or, not, eq, ne, lt, le, gt, ge, len, index, slice, print, printf, println, html, js,
urlquery, plus Ollama's json (Go's encoding/json, byte for byte), currentDate, yesterdayDate and
toTypeScriptType; values print as Go's fmt prints them (`map[a:1]`, `[1 2]`, `1e+06`, `<no value>`, a
Stringer's String(), a struct as `{a b}`), executed with option missingkey=zero as Ollama does. Go values
a template can see (Ollama's messages and tools) are GoStruct / GoList / GoMap. Go's own comparison and
indexing errors are errors here too; `call` is refused (templates get no function values). What Go would
print as a memory address raises GoTemplateError rather than printing something else.
tests/ollama/vectors/ holds the byte-exact checks: every template Ollama ships (with and without tools),
Ollama's expected outputs, and Go's own text/template test vectors. Ollama's rules around the template
(SYSTEM, collation, legacy templates, think) are in tasks.ollama.prompt; its tool values in
tasks.ollama.template_values.

Known gaps, all against Ollama's Go 1.26 toolchain where the reference renderer is Go 1.19: `range` over an
integer (Go >= 1.22) is an error here as in 1.19; nested {{ template }} calls stop at 200 levels (Go: 100000).
"""

from __future__ import annotations

import ast
import datetime
import html
import json
import math
import re
import urllib.parse
from decimal import Decimal
from dataclasses import dataclass, field
from typing import Any


class GoTemplateError(ValueError):
    """The template uses something outside the supported subset, or fails to execute."""


# ----------------------------------------------------------------------------------------------- lexing

_ACTION = re.compile(r"\{\{(-[ \t\r\n])?(.*?)([ \t\r\n]-)?\}\}", re.S)
_NUM = r"""(?:0[xX][0-9a-fA-F_]*\.?[0-9a-fA-F_]*(?:[pP][+-]?[0-9_]+)?|0[bB][01_]+|0[oO][0-7_]+
             |(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9][0-9_]*)(?:[eE][+-]?[0-9_]+)?)"""
_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<char>'(?:[^'\\]|\\.)+')
  | (?P<num>[+-]?NUM(?:i|[+-]NUMi)?(?![A-Za-z0-9_.]))
  | (?P<decl>:=)
  | (?P<assign>=)
  | (?P<punct>[()|,])
  | (?P<var>\$[A-Za-z0-9_]*)
  | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
""".replace("NUM", _NUM), re.X)


def _number(text: str, where: str):
    """A Go numeric constant as the template's untyped constant: int, float64 or complex128."""
    t = text.replace("_", "")
    try:
        if t.endswith("i"):
            body = t[:-1]
            split = max((i for i, c in enumerate(body) if c in "+-" and i and body[i - 1] not in "eEpP"),
                        default=0)
            if split:   # 1+2i: a real and an imaginary part
                return complex(_number(body[:split], where), _number(body[split:], where))
            return complex(0, _number(body, where))
        sign = -1 if t.startswith("-") else 1
        t = t.lstrip("+-")
        low = t.lower()
        if low.startswith("0x"):
            if "." in low or "p" in low:
                return sign * float.fromhex(t)
            return sign * int(t, 16)
        if low.startswith(("0b", "0o")):
            return sign * int(t, 0)
        if any(c in low for c in ".e"):
            return sign * float(t)
        if len(t) > 1 and t.startswith("0"):
            return sign * int(t, 8)   # Go's legacy octal: 0377
        return sign * int(t)
    except ValueError:
        raise GoTemplateError(f"{where}: bad number syntax: {text!r}") from None


def _unquote(text: str, where: str) -> str:
    """A Go interpreted string or character literal's value (Go's escapes are Python's)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise GoTemplateError(f"{where}: bad quoted string {text!r}") from None


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
class LoopControl:
    kind: str                # "break" | "continue"


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
        return ("lit", _unquote(text, where)), i + 1
    if kind == "raw":
        return ("lit", text[1:-1]), i + 1
    if kind == "char":
        char = _unquote(text, where)
        if len(char) != 1:
            raise GoTemplateError(f"{where}: malformed character constant {text}")
        return ("lit", ord(char)), i + 1
    if kind == "num":
        return ("lit", _number(text, where)), i + 1
    if kind == "ident":
        if text in ("true", "false"):
            return ("lit", text == "true"), i + 1
        if text == "nil":
            return ("nil",), i + 1
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


@dataclass
class TemplateCall:
    """{{ template "name" pipeline }} (pipe None when there is no pipeline)."""

    name: str
    pipe: Pipe | None


@dataclass
class _Define:
    """The frame of a {{ define "name" }} or {{ block "name" pipeline }} being parsed."""

    name: str
    body: list
    call: TemplateCall | None = None      # a block: the call left where the block stands


class Tree(list):
    """A parsed template: its top-level nodes, and `defines`, the set of named templates it can call
    (shared with every template parsed into the same set, as Go's associated templates are)."""

    def __init__(self, nodes=(), defines: dict | None = None):
        super().__init__(nodes)
        self.defines: dict[str, list] = {} if defines is None else defines


def _is_empty(nodes: list) -> bool:
    """parse.IsEmptyTree: nothing but white space (comments are already gone)."""
    return all(isinstance(n, Text) and not n.text.strip(" \t\r\n") for n in nodes)


def _template_name(toks: list, where: str, head: str) -> tuple[str, list]:
    if len(toks) < 2 or toks[1][0] not in ("str", "raw"):
        raise GoTemplateError(f"{where}: unexpected name in {head} clause")
    kind, text = toks[1]
    return (_unquote(text, where) if kind == "str" else text[1:-1]), toks[2:]


def parse(src: str, defines: dict | None = None) -> Tree:
    """Parse a template into a node list (a Tree, whose `defines` gets its {{ define }}s and {{ block }}s).

    Args:
        defines: a set of named templates to parse into (Go's Template.Parse on an existing set): a new
            non-empty definition replaces an older one; within one text two non-empty ones are an error.

    Raises:
        GoTemplateError: a construct outside the supported subset, or unbalanced blocks.
    """
    root = Tree(defines=defines)
    own: dict[str, list] = {}       # this text's definitions (parse's treeSet)
    stack: list[tuple[list, Any]] = [(root, None)]

    def add(name: str, body: list, where: str) -> None:
        if name in own and not _is_empty(own[name]) and not _is_empty(body):
            raise GoTemplateError(f"{where}: template: multiple definition of template {name!r}")
        if name not in own or _is_empty(own[name]):
            own[name] = body

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
            if len(stack) == 1 or isinstance(stack[-1][1], _Define):
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
            _, frame = stack.pop()
            if isinstance(frame, _Define):
                add(frame.name, frame.body, where)
                if frame.call is not None:
                    stack[-1][0].append(frame.call)
            while len(stack) > 1 and isinstance(stack[-1][1], _Chained):
                stack.pop()
        elif head in ("break", "continue"):
            if len(toks) > 1:
                raise GoTemplateError(f"{where}: unexpected {toks[1][1]!r} in {head}")
            in_range = False
            for _, b in reversed(stack):
                if isinstance(b, _Define):
                    break
                if isinstance(b, Branch) and b.kind == "range":
                    in_range = True
                    break
            if not in_range:
                raise GoTemplateError(f"{where}: {{{{{head}}}}} outside {{{{range}}}}")
            stack[-1][0].append(LoopControl(head))
        elif head == "define":
            if len(stack) != 1:
                raise GoTemplateError(f"{where}: unexpected <define> in command")
            name, rest = _template_name(toks, where, "define")
            if rest:
                raise GoTemplateError(f"{where}: unexpected {rest[0][1]!r} in define clause")
            frame = _Define(name, [])
            stack.append((frame.body, frame))
        elif head == "block":
            name, rest = _template_name(toks, where, "block")
            if not rest:
                raise GoTemplateError(f"{where}: missing value for block clause")
            frame = _Define(name, [], TemplateCall(name, _parse_pipe(rest, where)))
            stack.append((frame.body, frame))
        elif head == "template":
            name, rest = _template_name(toks, where, "template")
            stack[-1][0].append(TemplateCall(name, _parse_pipe(rest, where) if rest else None))
        else:
            stack[-1][0].append(Action(_parse_pipe(toks, where)))
    text = src[pos:]
    if trim_next:
        text = text.lstrip(" \t\r\n")
    if text:
        stack[-1][0].append(Text(text))
    if len(stack) != 1:
        raise GoTemplateError("template: unclosed block (missing {{ end }})")
    for name, body in own.items():   # Template.AddParseTree: an empty body never replaces a defined one
        if name not in root.defines or not _is_empty(body):
            root.defines[name] = body
    return root


@dataclass
class _Chained:
    """Marks an `else if` frame: the `end` that closes the nested if closes this one too."""

    outer: Branch


# ------------------------------------------------------------------------------------------- execution

_NO_VALUE = object()   # Go's invalid reflect.Value: a missing key, nil interface; prints "<no value>"


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


def _kind(v: Any) -> str:
    """Go's basicKind for a value (or 'invalid' for nil, 'other' for maps, slices, structs)."""
    if v is None or v is _NO_VALUE:
        return "invalid"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, complex):
        return "complex"
    if isinstance(v, str):
        return "string"
    return "other"


def _truth(v: Any) -> bool:
    if v is None or v is _NO_VALUE:
        return False
    if isinstance(v, (bool, int, float, complex)):
        return bool(v)
    if isinstance(v, (str, list, tuple, dict)):
        return len(v) > 0
    return True   # a struct (pointer) is true


def _go_float(f: float, verb: str = "v", prec: int = -1) -> str:
    """strconv.FormatFloat as fmt uses it: %v/%g shortest ('1e+06', '15.1'), %e, %f."""
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    if verb in ("e", "E"):
        out = f"{f:.{6 if prec < 0 else prec}e}"
        mant, exp = out.split("e")
        out = f"{mant}e{exp[0]}{int(exp[1:]):02d}"
        return out.upper() if verb == "E" else out
    if verb == "f":
        return f"{f:.{6 if prec < 0 else prec}f}"
    if prec >= 0:   # %.Ng
        digits = Decimal(f"{f:.{max(prec, 1)}e}")
    else:
        digits = Decimal(repr(f))
    sign, ds, exp = digits.as_tuple()
    ds = list(ds)
    while len(ds) > 1 and ds[-1] == 0:
        ds.pop()
        exp += 1
    nd = len(ds)
    dp = nd + exp             # the decimal point's position in the digit string
    eprec = 6 if prec < 0 else (prec if prec else 1)
    if prec >= 0 and eprec > nd and nd >= dp:
        eprec = nd
    x = dp - 1
    text = "".join(map(str, ds))
    minus = "-" if sign else ""
    if f == 0:
        return minus + "0"
    if x < -4 or x >= eprec:
        mant = text[0] + ("." + text[1:] if nd > 1 else "")
        return f"{minus}{mant}e{'-' if x < 0 else '+'}{abs(x):02d}"
    if dp <= 0:
        return f"{minus}0.{'0' * -dp}{text}"
    if dp >= nd:
        return minus + text + "0" * (dp - nd)
    return f"{minus}{text[:dp]}.{text[dp:]}"


class GoStruct:
    """A Go struct as a template sees it. A subclass lists FIELDS (exported Go name -> attribute, in
    declaration order), JSON (json.Marshal's fields: (key, attribute, omitempty) triples; None: the Go names,
    none omitted), POINTER (the template holds a *T), and may define String() (a fmt.Stringer) or
    MarshalJSON() (a json.Marshaler, returning the JSON text)."""

    FIELDS: dict[str, str] = {}
    JSON: list[tuple[str, str, bool]] | None = None
    POINTER = False


class GoList(list):
    """A typed Go slice; `GoList()` is the nil slice (json `null`), `GoList([])` an empty one (`[]`)."""

    def __init__(self, items=None):
        super().__init__(items or ())
        self.is_nil = items is None


class GoMap(dict):
    """A typed Go map (sorted keys when ranged, printed or marshalled); `GoMap()` is the nil map. With
    missingkey=zero a missing key reads as zero() (the element type's zero value)."""

    def __init__(self, items=None):
        super().__init__(items or ())
        self.is_nil = items is None

    def zero(self):
        return _NO_VALUE


def _fmt(v: Any, top: bool = False, depth: int = 0, verb: str = "v") -> str:
    """Go's fmt %v of a template value (or %s: `verb`, applied inside composites as fmt does, so a
    number there prints as `%!s(int=0)`). `top`: an action's output (text/template's printableValue: nil
    prints `<no value>`, a pointer is printed as what it points to); `depth` > 0: inside a composite, where
    Go prints a pointer to a struct as its address, which nothing can reproduce (so: an error)."""
    if v is _NO_VALUE or (top and v is None):
        return "<no value>"
    if hasattr(v, "String"):
        return v.String()
    if verb == "s" and not isinstance(v, (str, list, tuple, dict, GoStruct)):
        return "%!s(<nil>)" if v is None else f"%!s({_go_type(v)}={_fmt(v)})"
    if v is None:
        return "<nil>"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return _go_float(v)
    if isinstance(v, complex):
        imag = _go_float(v.imag)
        return f"({_go_float(v.real)}{'' if imag.startswith(('-', '+')) else '+'}{imag}i)"
    if isinstance(v, str):
        return v
    inner = {"depth": depth + 1, "verb": verb}
    if isinstance(v, (list, tuple)):
        return "[" + " ".join(_fmt(x, **inner) for x in v) + "]"
    if isinstance(v, dict):
        return "map[" + " ".join(f"{_fmt(k, **inner)}:{_fmt(v[k], **inner)}" for k in sorted(v)) + "]"
    if isinstance(v, GoStruct):
        if v.POINTER and (depth or not v.FIELDS):
            raise GoTemplateError(f"Go prints this {type(v).__name__} pointer as a memory address")
        body = "{" + " ".join(_fmt(getattr(v, a), **inner) for a in v.FIELDS.values()) + "}"
        return "&" + body if v.POINTER and not top else body
    return str(v)


def _go_type(v: Any) -> str:
    """%T of a value as Go names its type (data from JSON: float64, map[string]interface {}, ...)."""
    return {"bool": "bool", "int": "int", "float": "float64", "complex": "complex128", "string": "string",
            "invalid": "<nil>"}.get(_kind(v)) or (
        "[]interface {}" if isinstance(v, (list, tuple)) else "map[string]interface {}" if isinstance(v, dict)
        else f"*template.{type(v).__name__}")


_VERB = re.compile(r"%([-+# 0]*)(\*|\d+)?(?:\.(\*|\d*))?([a-zA-Z%])")


def _printf(fmt: Any, *args) -> str:
    """Go's fmt.Sprintf for the verbs templates use (%v %s %d %q %x %X %o %b %c %e %f %g %t %T %%),
    with flags, width and precision; a wrong or missing operand prints Go's %!verb(...) note."""
    if not isinstance(fmt, str):
        raise GoTemplateError(f"wrong type for value; expected string; got {_go_type(fmt)}")
    out, pos, argi = [], 0, 0
    args = list(args)
    for m in _VERB.finditer(fmt):
        out.append(fmt[pos:m.start()])
        pos = m.end()
        flags, width, prec, verb = m.group(1), m.group(2), m.group(3), m.group(4)
        if verb == "%":
            out.append("%")
            continue
        if argi >= len(args):
            out.append(f"%!{verb}(MISSING)")
            continue
        v = args[argi]
        argi += 1
        p = int(prec) if prec not in (None, "", "*") else (0 if prec == "" else -1)
        text = _format_one(v, verb, flags, p)
        if width and width != "*" and len(text) < int(width):
            pad = int(width) - len(text)
            if "-" in flags:
                text += " " * pad
            elif "0" in flags and verb not in "sqvtT" and isinstance(v, (int, float)) and not isinstance(v, bool):
                sign = text[0] if text[:1] in "+-" else ""
                text = sign + "0" * pad + text[len(sign):]
            else:
                text = " " * pad + text
        out.append(text)
    out.append(fmt[pos:])
    if argi < len(args):
        out.append("%!(EXTRA " + ", ".join(f"{_go_type(a)}={_fmt(a)}" for a in args[argi:]) + ")")
    return "".join(out)


def _format_one(v: Any, verb: str, flags: str, prec: int) -> str:
    k = _kind(v)
    bad = f"%!{verb}({_go_type(v)}={_fmt(v)})"
    if verb == "T":
        return _go_type(v)
    if verb == "v":
        return _fmt(v)
    if verb == "s":
        if k == "string":
            return v[:prec] if prec >= 0 else v
        return _fmt(v, verb="s") if k == "other" else bad
    if verb == "q":
        if k == "string":
            return json.dumps(v, ensure_ascii=False).replace("\\u007f", "\\x7f")
        if k == "int":
            return "'" + chr(v) + "'"
        return bad
    if verb == "t":
        return _fmt(v) if k == "bool" else bad
    if verb in "dxXobc" and k == "int":
        if verb == "c":
            return chr(v)
        base = {"d": "d", "x": "x", "X": "X", "o": "o", "b": "b"}[verb]
        text = format(abs(v), base)
        if "#" in flags and verb in "xX":
            text = ("0x" if verb == "x" else "0X") + text
        sign = "-" if v < 0 else ("+" if "+" in flags else "")
        return sign + text
    if verb in "xX" and k == "string":
        text = v.encode().hex()
        return text.upper() if verb == "X" else text
    if verb in "eEfFgG" and k in ("float", "int") and not isinstance(v, bool):
        if k == "int":
            return bad
        text = _go_float(float(v), {"F": "f", "G": "g"}.get(verb, verb), prec)
        return ("+" + text if "+" in flags and not text.startswith("-") else text)
    if verb in "eEfFgG" and k == "complex":
        re_, im = _format_one(v.real, verb, flags, prec), _format_one(v.imag, verb, "+", prec)
        return f"({re_}{im}i)"
    return bad


def _sprint(*args) -> str:
    """fmt.Sprint: operands printed with %v, a space between two operands when neither is a string."""
    out = []
    for i, a in enumerate(args):
        if i and not isinstance(a, str) and not isinstance(args[i - 1], str):
            out.append(" ")
        out.append(_fmt(a))
    return "".join(out)


def _compare(name: str, a: Any, b: Any) -> bool:
    ka, kb = _kind(a), _kind(b)
    if ka in ("invalid", "other") or kb in ("invalid", "other") or ka == "bool" or kb == "bool":
        raise GoTemplateError(f"error calling {name}: invalid type for comparison")
    if ka != kb:
        raise GoTemplateError(f"error calling {name}: incompatible types for comparison")
    if ka == "complex":
        raise GoTemplateError(f"error calling {name}: invalid type for comparison")
    return {"lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b}[name]


def _eq(a: Any, *bs) -> bool:
    if not bs:
        raise GoTemplateError("error calling eq: missing argument for comparison")
    ka = _kind(a)
    for b in bs:
        kb = _kind(b)
        if ka != kb:
            if ka != "invalid" and kb != "invalid":
                raise GoTemplateError("error calling eq: incompatible types for comparison")
            continue
        if ka == "other":
            raise GoTemplateError(f"error calling eq: non-comparable type {_fmt(a)}: {_go_type(a)}")
        if ka == "invalid" or a == b:
            return True
    return False


def _ne(a: Any, b: Any) -> bool:
    return not _eq(a, b)


def _length(v: Any) -> int:
    if isinstance(v, (str, list, tuple, dict)):
        return len(v.encode() if isinstance(v, str) else v)
    raise GoTemplateError(f"error calling len: len of {'nil pointer' if v in (None, _NO_VALUE) else 'type ' + _go_type(v)}")


def _int_arg(x: Any, fn: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise GoTemplateError(f"error calling {fn}: cannot index slice/array with type {_go_type(x)}")
    return x


def _index(v: Any, *keys) -> Any:
    for k in keys:
        if isinstance(v, dict):
            if not isinstance(k, str):
                raise GoTemplateError(f"error calling index: value has type {_go_type(k)}; should be string")
            # a missing key: the element type's zero value (nil for interface{})
            v = v[k] if k in v else v.zero() if isinstance(v, GoMap) else None
        elif isinstance(v, (list, tuple, str)):
            i = _int_arg(k, "index")
            if not 0 <= i < len(v):
                raise GoTemplateError(f"error calling index: index out of range: {i}")
            v = v.encode()[i] if isinstance(v, str) else v[i]
        else:
            raise GoTemplateError(f"error calling index: can't index item of type {_go_type(v)}")
    return v


def _slice(v: Any, *idx) -> Any:
    if not isinstance(v, (str, list, tuple)):
        raise GoTemplateError(f"error calling slice: can't slice item of type {_go_type(v)}")
    if len(idx) > 3:
        raise GoTemplateError(f"error calling slice: too many slice indexes: {len(idx)}")
    if isinstance(v, str) and len(idx) == 3:
        raise GoTemplateError("error calling slice: cannot 3-index slice a string")
    ix = [_int_arg(i, "slice") for i in idx]
    n = len(v.encode()) if isinstance(v, str) else len(v)
    bounds = [0, n, n][:3]
    for j, i in enumerate(ix):
        if not 0 <= i <= n:
            raise GoTemplateError(f"error calling slice: index out of range: {i}")
        bounds[j] = i
    if len(ix) >= 2 and ix[0] > ix[1] or len(ix) == 3 and ix[1] > ix[2]:
        raise GoTemplateError(f"error calling slice: invalid slice index: {ix[0]} > {ix[1]}")
    lo, hi = bounds[0], bounds[1] if len(ix) >= 2 else n
    if isinstance(v, str):
        return v.encode()[lo:hi].decode(errors="replace")
    if isinstance(v, GoList):   # a typed slice keeps its type (and String method); nil stays nil
        return type(v)(None if v.is_nil else list(v[lo:hi]))
    return list(v[lo:hi])


def _json_float(f: float) -> str:
    """encoding/json's float64: the shortest digits, fixed notation unless < 1e-6 or >= 1e21 (then
    `1e+21`, `1e-7`)."""
    if math.isnan(f) or math.isinf(f):
        raise GoTemplateError(f"json: unsupported value: {_go_float(f)}")
    if f == 0:
        return "-0" if math.copysign(1, f) < 0 else "0"
    sign, digits, exp = Decimal(repr(f)).as_tuple()
    ds = "".join(map(str, digits)).rstrip("0") or "0"
    exp += len("".join(map(str, digits))) - len(ds)      # ds * 10**exp
    minus = "-" if sign else ""
    if abs(f) < 1e-6 or abs(f) >= 1e21:
        x = exp + len(ds) - 1
        mant = ds[0] + ("." + ds[1:] if len(ds) > 1 else "")
        return f"{minus}{mant}e{'-' if x < 0 else '+'}{abs(x):02d}".replace("e-0", "e-")
    point = len(ds) + exp
    if point <= 0:
        return f"{minus}0.{'0' * -point}{ds}"
    if point >= len(ds):
        return minus + ds + "0" * (point - len(ds))
    return f"{minus}{ds[:point]}.{ds[point:]}"


def _json_string(s: str) -> str:
    r"""encoding/json's string: HTML-safe (<, >, & as \u003c...), U+2028/9 escaped, invalid UTF-16
    surrogates as U+FFFD; \b and \f short as Go >= 1.22 (Ollama's toolchain) writes them."""
    s = re.sub("[\ud800-\udfff]", "\ufffd", s)
    return (json.dumps(s, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _json_empty(x: Any) -> bool:
    """omitempty: false, 0, "", nil, and empty slices and maps."""
    if x is None or x is _NO_VALUE:
        return True
    if isinstance(x, (bool, int, float, str, list, tuple, dict)):
        return not x
    return False


def _json(x: Any) -> str:
    if x is None or x is _NO_VALUE:
        return "null"
    if hasattr(x, "MarshalJSON"):
        return x.MarshalJSON()
    if isinstance(x, GoStruct):
        fields = x.JSON if x.JSON is not None else [(k, a, False) for k, a in x.FIELDS.items()]
        return "{" + ",".join(f"{_json_string(k)}:{_json(getattr(x, a))}" for k, a, omit in fields
                              if not (omit and _json_empty(getattr(x, a)))) + "}"
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return _json_float(x)
    if isinstance(x, str):
        return _json_string(x)
    if isinstance(x, dict):
        if getattr(x, "is_nil", False):
            return "null"
        return "{" + ",".join(f"{_json_string(str(k))}:{_json(x[k])}" for k in sorted(x)) + "}"
    if isinstance(x, (list, tuple)):
        if getattr(x, "is_nil", False):
            return "null"
        return "[" + ",".join(_json(i) for i in x) + "]"
    if isinstance(x, complex):
        raise GoTemplateError("json: unsupported type: complex128")
    raise GoTemplateError(f"json: unsupported type {type(x).__name__}")


def _go_json(v: Any) -> str:
    """Ollama's `json`: Go's json.Marshal, its error dropped (an unsupported value gives "")."""
    try:
        return _json(v)
    except GoTemplateError:
        return ""


def _date(days_ago: int, args: tuple) -> str:
    """Ollama's currentDate / yesterdayDate: the server's local date (a format argument is accepted and
    ignored, as Ollama does)."""
    for a in args:
        if not isinstance(a, str):
            raise GoTemplateError(f"wrong type for value; expected string; got {_go_type(a)}")
    return (datetime.date.today() - datetime.timedelta(days=days_ago)).isoformat()


def _escaper_text(args: tuple) -> str:
    """text/template's evalArgs: one string as is, else fmt.Sprint, with nil shown as <no value>."""
    if len(args) == 1 and isinstance(args[0], str):
        return args[0]
    return _sprint(*(_NO_VALUE_TEXT if a is None else a for a in args))


class _NoValueText(str):
    pass


_NO_VALUE_TEXT = _NoValueText("<no value>")


def _js(*args) -> str:
    text = _escaper_text(args)
    out = []
    for c in text:
        if c in "\\'\"":
            out.append("\\" + c)
        elif c in "<>&=":
            out.append(f"\\u{ord(c):04X}")
        elif c == "\n":
            out.append("\\n")
        elif c == "\r":
            out.append("\\r")
        elif c == "\t":
            out.append("\\t")
        elif ord(c) < 0x20:
            out.append(f"\\u{ord(c):04X}")
        else:
            out.append(c)
    return "".join(out)


def _html(*args) -> str:
    text = _escaper_text(args)
    return (text.replace("\0", "\uFFFD").replace("&", "&amp;").replace("'", "&#39;").replace("<", "&lt;")
            .replace(">", "&gt;").replace('"', "&#34;"))


_FUNCS = {
    "and": None, "or": None,   # short-circuit: handled in _Exec.command
    "not": lambda v: not _truth(v),
    "eq": _eq, "ne": _ne,
    "lt": lambda a, b: _compare("lt", a, b), "le": lambda a, b: _compare("le", a, b),
    "gt": lambda a, b: _compare("gt", a, b), "ge": lambda a, b: _compare("ge", a, b),
    "len": _length,
    "index": _index,
    "slice": _slice,
    "print": _sprint,
    "println": lambda *a: " ".join(_fmt(x) for x in a) + "\n",
    "printf": _printf,
    "html": _html,
    "js": _js,
    "urlquery": lambda *a: urllib.parse.quote_plus(_escaper_text(a), safe=""),
    "json": _go_json,
    "currentDate": lambda *a: _date(0, a),
    "yesterdayDate": lambda *a: _date(1, a),
    "toTypeScriptType": lambda v: v.ToTypeScriptType() if hasattr(v, "ToTypeScriptType") else "any",
}
# Ollama's own functions (template/template.go funcs), absent from the bare template of a legacy last turn.
_OLLAMA_FUNCS = {"json", "currentDate", "yesterdayDate", "toTypeScriptType"}
_ARITY = {"toTypeScriptType": 1, "not": 1, "ne": 2, "lt": 2, "le": 2, "gt": 2, "ge": 2, "len": 1, "json": 1}


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
            v = v[name] if name in v else v.zero() if isinstance(v, GoMap) else _NO_VALUE
        elif hasattr(v, "FIELDS"):   # a struct: only its exported fields exist
            if name not in v.FIELDS:
                raise GoTemplateError(f"can't evaluate field {name} in type {type(v).__name__}")
            v = getattr(v, v.FIELDS[name])
        elif v is None or v is _NO_VALUE:
            v = _NO_VALUE   # a field of nil data (an interface holding nothing) is the zero value
        else:
            raise GoTemplateError(f"can't evaluate field {name} in type {_go_type(v)}")
    return v


_MAX_DEPTH = 200   # nested {{ template }} calls (Go allows 100000; Python's stack gives out long before)


class _Exec:
    def __init__(self, root: Any, defines: dict, ollama_funcs: bool, out: list | None = None, depth: int = 0):
        self.scope = _Scope(root)
        self.defines = defines
        self.ollama_funcs = ollama_funcs
        self.out: list[str] = [] if out is None else out
        self.depth = depth

    def operand(self, node: tuple, dot: Any):
        kind = node[0]
        if kind == "lit":
            return node[1]
        if kind == "nil":
            return None
        if kind == "field":
            return _field(dot, node[1])
        if kind == "var":
            return self.scope.get(node[1])
        if kind == "pipe":
            return self.pipe(node[1], dot)
        if kind == "chain":
            if node[1][0] == "nil":
                raise GoTemplateError("indirection through explicit nil")
            return _field(self.operand(node[1], dot), node[2])
        raise GoTemplateError(f"{node[1]!r} is a function: call it with arguments")

    def command(self, cmd: list, dot: Any, piped=_NO_VALUE):
        first = cmd[0]
        if first[0] == "nil":
            raise GoTemplateError("nil is not a command")
        if first[0] != "func":
            if len(cmd) > 1 or piped is not _NO_VALUE:
                what = "field" if first[0] == "field" and first[1] else "non-function"
                raise GoTemplateError(f"can't give argument to {what} {first[1] if what == 'field' else ''}".strip())
            return self.operand(first, dot)
        name = first[1]
        raw = list(cmd[1:])
        if name in ("and", "or"):
            values = [lambda n=n: self.operand(n, dot) for n in raw]
            if piped is not _NO_VALUE:
                values.append(lambda: piped)
            if not values:
                raise GoTemplateError(f"wrong number of args for {name}: want at least 1 got 0")
            result = None
            for get in values:
                result = get()
                if _truth(result) != (name == "and"):
                    return result
            return result
        if name in _OLLAMA_FUNCS and not self.ollama_funcs:
            raise GoTemplateError(f"{name!r} is not a defined function")
        args = [self.operand(n, dot) for n in raw]
        if piped is not _NO_VALUE:
            args.append(piped)
        args = [None if a is _NO_VALUE else a for a in args]
        if name in _ARITY and len(args) != _ARITY[name]:
            raise GoTemplateError(f"wrong number of args for {name}: want {_ARITY[name]} got {len(args)}")
        if name == "printf" and not args:
            raise GoTemplateError("wrong number of args for printf: want at least 1 got 0")
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
                    self.out.append(_fmt(value, top=True))
            elif isinstance(node, Branch):
                self.branch(node, dot)
            elif isinstance(node, LoopControl):
                raise _Break() if node.kind == "break" else _Continue()
            elif isinstance(node, TemplateCall):
                self.call(node, dot)

    def call(self, node: TemplateCall, dot: Any) -> None:
        """{{ template }}: the named template over the pipeline's value, with only `$` (that value) defined."""
        body = self.defines.get(node.name)
        if body is None:
            raise GoTemplateError(f"template {node.name!r} not defined")
        value = self.pipe(node.pipe, dot) if node.pipe is not None else _NO_VALUE
        if self.depth + 1 >= _MAX_DEPTH:
            raise GoTemplateError(f"exceeded maximum template depth ({_MAX_DEPTH})")
        _Exec(value, self.defines, self.ollama_funcs, self.out, self.depth + 1).run(body, value)

    def branch(self, b: Branch, dot: Any) -> None:
        self.scope.frames.append({})
        try:
            if b.kind == "range":
                decl = b.pipe.decl
                value = self.pipe(Pipe([], False, b.pipe.cmds), dot)
                if isinstance(value, dict):
                    items = [(k, value[k]) for k in sorted(value)]
                elif isinstance(value, (list, tuple)):
                    items = list(enumerate(value))
                elif value is None or value is _NO_VALUE:
                    items = []
                elif isinstance(value, int) and not isinstance(value, bool):
                    raise GoTemplateError(f"range can't iterate over {value}")
                else:
                    raise GoTemplateError(f"range can't iterate over {_fmt(value)}")
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
                    try:
                        self.run(b.body, item)
                    except _Continue:
                        pass
                    except _Break:
                        break
                    finally:
                        self.scope.frames.pop()
                return
            value = self.pipe(b.pipe, dot)
            if _truth(value):
                self.run(b.body, value if b.kind == "with" else dot)
            elif b.else_body is not None:
                self.run(b.else_body, dot)
        finally:
            self.scope.frames.pop()


def execute(nodes: list, data: Any, ollama_funcs: bool = True) -> str:
    """Run parsed nodes over `data` (dicts, lists, GoStruct/GoList/GoMap values, strings, numbers, bools),
    with the named templates of `nodes.defines` (when `nodes` is a Tree).

    Args:
        ollama_funcs: False for a bare template without Ollama's functions (json, currentDate, ...), as
            Ollama executes a legacy template's last turn.
    """
    ex = _Exec(data, getattr(nodes, "defines", {}), ollama_funcs)
    try:
        ex.run(nodes, data)
    except RecursionError:
        raise GoTemplateError("template nesting too deep") from None
    return "".join(ex.out)


def identifiers(nodes: list) -> set[str]:
    """Every field and variable name the template and the templates it defines mention, lower-cased
    (Ollama's Template.Vars).

    Raises:
        GoTemplateError: a {{ template "name" }} without a pipeline (Ollama's Parse refuses it).
    """
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
            elif isinstance(n, TemplateCall):
                if n.pipe is None:
                    raise GoTemplateError(f"template {n.name!r}: undefined template specified (Ollama refuses a "
                                          "{{ template }} call without a pipeline)")
                from_pipe(n.pipe)

    walk(nodes)
    for body in getattr(nodes, "defines", {}).values():
        walk(body)
    return names


def cut_at_response(nodes: list) -> list:
    """Ollama's deleteNode with its predicate, node for node: walking the tree in order, the first
    `.Response` field argument is kept and marks the cut; every node walked after it is dropped (a
    command left without arguments drops its action). Branch conditions are not walked. Where Ollama's
    walk would panic (an `else` list reached after the cut), this raises, as Ollama's request fails."""
    cut = False

    def deleted(node) -> bool:          # Ollama's predicate
        nonlocal cut
        if isinstance(node, tuple) and node[0] == "field" and "Response" in node[1]:
            cut = True
            return False
        return cut

    def walk_list(ns: list) -> list | None:
        if deleted(ns):
            return None
        return [kept for n in ns if (kept := walk(n)) is not None]

    def walk_pipe(p: Pipe) -> Pipe | None:
        if deleted(p):
            return None
        cmds = []
        for cmd in p.cmds:
            args = [kept for a in cmd if (kept := walk_operand(a)) is not None]
            if not args:
                return None
            cmds.append(args)
        return Pipe(p.decl, p.assign, cmds) if cmds else None

    def walk_operand(op: tuple):
        if deleted(op):
            return None
        if op[0] == "pipe":
            inner = walk_pipe(op[1])
            return ("pipe", inner) if inner is not None else None
        return op

    def walk(n):
        if deleted(n):
            return None
        if isinstance(n, Action):
            pipe = walk_pipe(n.pipe)
            return Action(pipe) if pipe is not None else None
        if isinstance(n, Branch):
            body = walk_list(n.body)
            else_body = None
            if n.else_body is not None:
                else_body = walk_list(n.else_body)
                if else_body is None:
                    raise GoTemplateError("template: the cut at {{ .Response }} empties an else branch "
                                          "(Ollama's deleteNode panics on this template)")
            return Branch(n.kind, n.pipe, body if body is not None else [], else_body)
        return n

    return walk_list(nodes) or []
