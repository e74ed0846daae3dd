"""Chat dataset formats: read, validate, write and convert, all through one canonical `Conversation`.

Run it:
    python -m tasks.data.formats convert IN.jsonl OUT.jsonl --to together [--from sharegpt]
    python -m tasks.data.formats validate FILE.jsonl --format together

| format         | one row                                                        | carries                      |
|----------------|----------------------------------------------------------------|------------------------------|
| sharegpt       | {"conversations": [{"from": system/human/gpt/observation, "value"}]} | everything            |
| sharegpt-roles | {"conversations": [{"role", "content"}]}  (Unsloth's spelling)   | everything                   |
| messages       | {"messages": [{"role", "content"}], "tools"?} (OpenAI chat)     | everything                   |
| together       | messages under Together's rules: no key but `tools`, weight 0/1 | no extra keys                |
| together-pc    | {"prompt", "completion"} (Together instruction format)         | one turn; no system, no keys |
| alpaca         | {"instruction", "input", "output", "system"?, "history"?}       | no tool turns, no weights    |
| datafactory    | {"instruction": system, "input": user, "output": assistant} (seed 002) | one turn, no tools    |

What a format cannot carry is refused (`on_loss="error"`, the default) or dropped with `on_loss="drop"`.
One exception keeps information instead of dropping it: Together's prompt/completion has no system field
and rejects extra keys, so a system prompt is written at the start of `prompt`, followed by a blank line;
reading with `system_prompt=` that same text splits it off again. Alpaca keeps a system prompt and earlier
turns in the `system`/`history` columns LLaMA-Factory defined. Extra top-level keys (e.g. `anchor`) ride
along in `Conversation.extra` wherever the format allows them. ShareGPT rows are written exactly as the
published dataset is (json.dumps, ensure_ascii=False), so sharegpt -> X -> sharegpt reproduces its bytes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.data.rows import read_json_lines
from tasks.run import atomic_write_jsonl

FORMATS = ("sharegpt", "sharegpt-roles", "messages", "together", "together-pc", "alpaca", "datafactory")
_SHAREGPT_FROM = {"system": "system", "human": "user", "gpt": "assistant", "observation": "tool",
                  "user": "user", "assistant": "assistant", "tool": "tool"}
_SHAREGPT_TO = {"system": "system", "user": "human", "assistant": "gpt", "tool": "observation"}
_ROLES = ("system", "user", "assistant", "tool")
_PC_SEPARATOR = "\n\n"


class FormatError(ValueError):
    """A row that breaks a format rule: '<file>:<line>: <rule>: <detail>' (or '<file>:<line>: not valid JSON')."""


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str
    weight: Literal[0, 1] | None = None


class Conversation(BaseModel):
    """The canonical record every format converts through."""

    model_config = ConfigDict(extra="forbid")

    messages: list[Message] = Field(min_length=1)
    tools: list | None = None
    extra: dict = {}


def _fail(where: str, rule: str, detail: str):
    raise FormatError(f"{where}: {rule}: {detail}")


def _check_turns(turns: list[dict], fmt: str, where: str, together: bool = False) -> None:
    """Rules every conversational format shares; `together` adds Together's ordering and weight rules."""
    roles = []
    for i, turn in enumerate(turns):
        unknown = set(turn) - {"role", "content", "weight"}
        if unknown:
            _fail(where, f"{fmt}.turn-keys", f"turn {i} has keys {sorted(unknown)} besides role/content/weight")
        role = turn.get("role")
        if role not in _ROLES:
            _fail(where, f"{fmt}.role", f"turn {i}: role {role!r} is not one of {list(_ROLES)}")
        if not isinstance(turn.get("content"), str):
            _fail(where, f"{fmt}.content",
                  f"turn {i}: content must be a string, got {type(turn.get('content')).__name__}")
        weight = turn.get("weight")
        if weight is not None and (type(weight) is not int or weight not in (0, 1)):
            _fail(where, f"{fmt}.weight", f"turn {i}: weight must be the integer 0 or 1, got {weight!r}")
        if role == "system" and i:
            _fail(where, f"{fmt}.system-first", f"turn {i}: a system turn may only come first")
        roles.append(role)
    if "assistant" not in roles:
        _fail(where, f"{fmt}.assistant", "needs at least one assistant turn")
    if together:
        expected = "user"
        for i, role in enumerate(roles):
            if role == "system" or (role == "tool" and roles[i - 1] in ("assistant", "tool")):
                continue
            if role != expected:
                _fail(where, "together.alternation", f"turn {i}: expected {expected!r} after the optional "
                      f"system turn (user and assistant alternate; tool follows assistant), got {role!r}")
            expected = "assistant" if role == "user" else "user"


def _conversation_key(obj: dict, key: str, fmt: str, where: str) -> list:
    turns = obj.get(key)
    if not isinstance(turns, list) or not turns:
        _fail(where, f"{fmt}.shape", f"expected a non-empty list under {key!r}")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            _fail(where, f"{fmt}.turn", f"turn {i} is not an object")
    return turns


def _read_sharegpt(obj: dict, fmt: str, where: str) -> Conversation:
    turns = _conversation_key(obj, "conversations", fmt, where)
    if fmt == "sharegpt":
        for i, t in enumerate(turns):
            if "from" not in t or "value" not in t:
                _fail(where, "sharegpt.turn", f"turn {i} needs 'from' and 'value' (role/content is 'sharegpt-roles')")
            if set(t) - {"from", "value", "weight"}:
                _fail(where, "sharegpt.turn-keys", f"turn {i} has keys {sorted(set(t) - {'from', 'value', 'weight'})}")
            if t["from"] not in _SHAREGPT_FROM:
                _fail(where, "sharegpt.role", f"turn {i}: from {t['from']!r} is not one of {sorted(_SHAREGPT_FROM)}")
        turns = [{"role": _SHAREGPT_FROM[t["from"]], "content": t["value"],
                  **({"weight": t["weight"]} if "weight" in t else {})} for t in turns]
    _check_turns(turns, fmt, where)
    extra = {k: v for k, v in obj.items() if k not in ("conversations", "tools")}
    return Conversation(messages=turns, tools=obj.get("tools"), extra=extra)


def _read_messages(obj: dict, fmt: str, where: str) -> Conversation:
    turns = _conversation_key(obj, "messages", fmt, where)
    together = fmt == "together"
    if together:
        for key in obj:
            if key not in ("messages", "tools"):
                _fail(where, "together.extra-column", f"column {key!r} is not allowed (only 'tools' may "
                      "accompany 'messages')")
    _check_turns(turns, fmt, where, together=together)
    extra = {k: v for k, v in obj.items() if k not in ("messages", "tools")}
    return Conversation(messages=turns, tools=obj.get("tools"), extra=extra)


def _read_pc(obj: dict, where: str, system_prompt: str | None) -> Conversation:
    for key in obj:
        if key not in ("prompt", "completion"):
            _fail(where, "together-pc.extra-column", f"column {key!r} is not allowed with prompt/completion")
    for key in ("prompt", "completion"):
        if not isinstance(obj.get(key), str):
            _fail(where, "together-pc.shape", f"{key!r} must be a string")
    prompt, turns = obj["prompt"], []
    if system_prompt is not None and prompt.startswith(system_prompt + _PC_SEPARATOR):
        turns.append({"role": "system", "content": system_prompt})
        prompt = prompt[len(system_prompt + _PC_SEPARATOR):]
    return Conversation(messages=turns + [{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": obj["completion"]}])


def _read_alpaca(obj: dict, fmt: str, where: str) -> Conversation:
    required = ("instruction", "output") if fmt == "alpaca" else ("output",)
    for key in required:
        if not isinstance(obj.get(key), str):
            _fail(where, f"{fmt}.shape", f"{key!r} must be a string")
    for key in ("instruction", "input", "system"):
        if key in obj and not isinstance(obj[key], str):
            _fail(where, f"{fmt}.shape", f"{key!r} must be a string when present")
    turns = []
    if fmt == "datafactory":
        for key in ("system", "history"):
            if key in obj:
                _fail(where, "datafactory.shape",
                      f"{key!r} is not a Data Factory field (instruction is the system prompt)")
        turns += [{"role": "system", "content": obj["instruction"]}] if obj.get("instruction") else []
        turns += [{"role": "user", "content": obj["input"]}] if obj.get("input") else []
        rest = ("instruction", "input", "output")
    else:
        history = obj.get("history", [])
        if not isinstance(history, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in history):
            _fail(where, "alpaca.history", "history must be a list of [user, assistant] string pairs")
        turns += [{"role": "system", "content": obj["system"]}] if "system" in obj else []
        for user, assistant in history:
            turns += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        # Alpaca's input is extra context for the instruction; LLaMA-Factory joins the two with a newline.
        query = obj["instruction"] + ("\n" + obj["input"] if obj.get("input") else "")
        turns.append({"role": "user", "content": query})
        rest = ("instruction", "input", "output", "system", "history")
    turns.append({"role": "assistant", "content": obj["output"]})
    return Conversation(messages=turns, extra={k: v for k, v in obj.items() if k not in rest})


def read_record(obj: object, fmt: str, where: str, system_prompt: str | None = None) -> Conversation:
    """Validate one row against `fmt` and return its canonical conversation.

    Raises:
        FormatError: '<where>: <format>.<rule>: <detail>' for the first broken rule.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {list(FORMATS)}")
    if not isinstance(obj, dict):
        _fail(where, f"{fmt}.shape", f"a row must be a JSON object, got {type(obj).__name__}")
    if fmt in ("sharegpt", "sharegpt-roles"):
        return _read_sharegpt(obj, fmt, where)
    if fmt in ("messages", "together"):
        if fmt == "together" and "messages" not in obj:
            _fail(where, "together.format", "no 'messages' column (prompt/completion rows are 'together-pc')")
        return _read_messages(obj, fmt, where)
    if fmt == "together-pc":
        return _read_pc(obj, where, system_prompt)
    return _read_alpaca(obj, fmt, where)


def detect_format(obj: object, where: str) -> str:
    """Guess a row's format from its keys. Data Factory rows with an `instruction` look like Alpaca:
    name that format explicitly."""
    if isinstance(obj, dict):
        if "messages" in obj:
            return "messages"
        turns = obj.get("conversations")
        if isinstance(turns, list) and turns and isinstance(turns[0], dict):
            return "sharegpt" if "from" in turns[0] else "sharegpt-roles"
        if "prompt" in obj and "completion" in obj:
            return "together-pc"
        if "output" in obj:
            return "alpaca" if "instruction" in obj else "datafactory"
    _fail(where, "format.detect", "cannot tell the format from the keys; name it with --from")


def _lose(where: str, fmt: str, what: str, on_loss: str) -> None:
    if on_loss == "error":
        _fail(where, f"{fmt}.cannot-carry", f"{what}; convert with on_loss='drop' (--drop-lossy) to drop it")


def write_record(conv: Conversation, fmt: str, where: str = "record", on_loss: str = "error") -> dict:
    """The row for `fmt`, refusing (or, with on_loss='drop', dropping) what the format cannot carry."""
    msgs = conv.messages
    weighted = any(m.weight is not None for m in msgs)
    if fmt in ("sharegpt", "sharegpt-roles", "messages", "together"):
        if fmt == "together" and conv.extra:
            _lose(where, fmt, f"extra keys {sorted(conv.extra)}", on_loss)
        turns = [m.model_dump(exclude_none=True) for m in msgs]
        if fmt == "sharegpt":
            turns = [{"from": _SHAREGPT_TO[t.pop("role")], "value": t.pop("content"), **t} for t in turns]
        key = "conversations" if fmt.startswith("sharegpt") else "messages"
        row = {key: turns, **({"tools": conv.tools} if conv.tools is not None else {})}
        return row if fmt == "together" else {**row, **conv.extra}
    system = msgs[0].content if msgs[0].role == "system" else None
    body = msgs[1:] if system is not None else msgs
    if conv.tools is not None or any(m.role == "tool" for m in body):
        _lose(where, fmt, "tool definitions or tool turns", on_loss)
        body = [m for m in body if m.role != "tool"]
    if weighted:
        _lose(where, fmt, "per-turn weights", on_loss)
    if len(body) < 2 or len(body) % 2 or [m.role for m in body[-2:]] != ["user", "assistant"]:
        _fail(where, f"{fmt}.shape", "needs user/assistant exchanges ending with an assistant turn")
    if fmt in ("together-pc", "datafactory") and len(body) > 2:
        _lose(where, fmt, f"{len(body) - 2} earlier turns (the format holds one exchange)", on_loss)
    user, answer = body[-2].content, body[-1].content
    if fmt == "together-pc":
        if conv.extra:
            _lose(where, fmt, f"extra keys {sorted(conv.extra)}", on_loss)
        return {"prompt": (system + _PC_SEPARATOR if system is not None else "") + user, "completion": answer}
    if fmt == "datafactory":
        return {**({"instruction": system} if system else {}), "input": user, "output": answer, **conv.extra}
    history = [[a.content, b.content] for a, b in zip(body[:-2:2], body[1:-2:2])]
    if any((a.role, b.role) != ("user", "assistant") for a, b in zip(body[:-2:2], body[1:-2:2])):
        _fail(where, "alpaca.history", "earlier turns must be user/assistant pairs")
    return {"instruction": user, "input": "", "output": answer, **({"system": system} if system is not None else {}),
            **({"history": history} if history else {}), **conv.extra}


def read_file(path: Path, fmt: str | None = None, system_prompt: str | None = None) -> list[Conversation]:
    """Every row of a JSONL file as canonical conversations (format detected from line 1 if not given).

    Raises:
        FormatError: '<file>:<line>: <rule>: <detail>'.
    """
    convs = []
    for _, obj, where in read_json_lines(path, FormatError):
        fmt = fmt or detect_format(obj, where)
        convs.append(read_record(obj, fmt, where, system_prompt))
    if not convs:
        _fail(f"{path}:1", "file.empty", "no rows")
    return convs


def validate_file(path: Path, fmt: str) -> int:
    """Check every row of a file against a format; for 'together', also one format per file.

    Returns the number of rows. Raises FormatError naming file, line and rule.
    """
    count, first = 0, None
    for line_no, obj, where in read_json_lines(path, FormatError):
        if fmt == "together":
            kind = "together-pc" if isinstance(obj, dict) and "prompt" in obj and "messages" not in obj else \
                "text" if isinstance(obj, dict) and set(obj) == {"text"} else "together"
            first = first or (kind, line_no)
            if kind != first[0]:
                _fail(where, "together.one-format", f"this row is {kind!r} but line {first[1]} is {first[0]!r}; "
                      "a Together file holds one format")
            if kind == "text":
                if not isinstance(obj["text"], str):
                    _fail(where, "together.shape", "'text' must be a string")
            else:
                read_record(obj, kind, where)
        else:
            read_record(obj, fmt, where)
        count += 1
    if not count:
        _fail(f"{path}:1", f"{fmt}.empty", "no rows (Together needs at least one sample)")
    return count


def convert_file(src: Path, dst: Path, to: str, src_format: str | None = None, on_loss: str = "error",
                 system_prompt: str | None = None) -> int:
    """Convert a JSONL file to another format (written atomically); returns the number of rows."""
    rows = [write_record(c, to, f"{src} record {i}", on_loss)
            for i, c in enumerate(read_file(src, src_format, system_prompt), start=1)]
    atomic_write_jsonl(dst, rows)
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert and validate chat dataset formats.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert IN to OUT")
    conv.add_argument("input", type=Path)
    conv.add_argument("output", type=Path)
    conv.add_argument("--to", required=True, choices=FORMATS)
    conv.add_argument("--from", dest="src_format", choices=FORMATS, help="input format (default: detect)")
    conv.add_argument("--drop-lossy", action="store_true", help="drop what the target format cannot carry")
    conv.add_argument("--system-prompt", help="together-pc input: split this system prompt off `prompt`")
    val = sub.add_parser("validate", help="check a file against a format's rules")
    val.add_argument("file", type=Path)
    val.add_argument("--format", required=True, choices=FORMATS)
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            n = convert_file(args.input, args.output, args.to, args.src_format,
                             "drop" if args.drop_lossy else "error", args.system_prompt)
            print(f"wrote {n} rows to {args.output} ({args.to})")
        else:
            n = validate_file(args.file, args.format)
            print(f"{args.file}: {n} rows pass the {args.format} rules")
    except (FormatError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
