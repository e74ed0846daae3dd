"""Tool calling: the answer is one call {"name", "arguments"} of one of the row's tools (as JSON text, or
natively as `tool_calls`).

Metrics: a parseable call, function name match, exact call (primary), argument F1, arguments valid
against the tool's parameter schema; the breakdown is the exact-call rate per gold function.
"""

from __future__ import annotations

import json

import jsonschema

from tasks.tasktypes.base import TaskType, f1, parse_json_answer

INSTRUCTION = ("You can call one of these tools:\n{tools}\nAnswer with only a JSON object "
               '{{"name": <tool name>, "arguments": {{...}}}} that calls the right tool, and nothing else.')


def check_row(row) -> None:
    if not row.tools:
        raise ValueError("toolcall: 'tools' (a non-empty list of functions) is required")
    exp = row.expected
    if not (isinstance(exp, dict) and set(exp) == {"name", "arguments"} and isinstance(exp["arguments"], dict)):
        raise ValueError("toolcall: 'expected' must be {\"name\": ..., \"arguments\": {...}}")
    tool = next((t for t in row.tools if t.name == exp["name"]), None)
    if tool is None:
        raise ValueError(f"toolcall: expected tool {exp['name']!r} is not in 'tools' "
                         f"{[t.name for t in row.tools]}")
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(tool.parameters).iter_errors(
        exp["arguments"]))
    if error is not None:
        raise ValueError(f"toolcall: expected arguments do not match {tool.name}'s parameters: {error.message}")


def parse_tool_call(answer: str, native: list[dict] | None = None) -> dict | None:
    """A call from native `tool_calls` (first one) or from a JSON answer {"name", "arguments"}."""
    if native:
        call = native[0]
        args = call.get("arguments")
        if isinstance(args, str):
            ok, args = parse_json_answer(args)
            if not ok:
                return None
        return {"name": call.get("name"), "arguments": args} if isinstance(args, dict) else None
    ok, value = parse_json_answer(answer)
    if not (ok and isinstance(value, dict) and isinstance(value.get("name"), str)):
        return None
    args = value.get("arguments", value.get("parameters", {}))
    return {"name": value["name"], "arguments": args} if isinstance(args, dict) else None


def score(row: dict, answer: str, tool_calls: list[dict] | None = None, count_tokens=None) -> dict:
    expected = row["expected"]
    call = parse_tool_call(answer, tool_calls)
    if call is None:
        return {"valid_call": 0.0, "name_accuracy": 0.0, "call_exact": 0.0, "argument_f1": 0.0,
                "arguments_valid": 0.0, "predicted_name": None, "group": expected["name"],
                "error": "no parseable tool call"}
    pairs = lambda args: [(k, json.dumps(v, sort_keys=True)) for k, v in args.items()]
    tool = next((t for t in row["tools"] if t["name"] == call["name"]), None)
    return {"valid_call": 1.0, "name_accuracy": float(call["name"] == expected["name"]),
            "call_exact": float(call == expected),
            "argument_f1": f1(pairs(call["arguments"]), pairs(expected["arguments"]))
            if call["name"] == expected["name"] else 0.0,
            "arguments_valid": float(tool is not None and jsonschema.Draft202012Validator(
                tool["parameters"]).is_valid(call["arguments"])),
            "predicted_name": call["name"], "group": expected["name"], "error": None}


TOOLCALL = TaskType(
    name="toolcall",
    metrics=(("valid_call", "valid call"), ("name_accuracy", "name acc."), ("call_exact", "exact call"),
             ("argument_f1", "argument F1"), ("arguments_valid", "args schema-valid")),
    primary_metric="call_exact",
    check_row=check_row,
    gold_answer=lambda row: json.dumps({"name": row.expected["name"], "arguments": row.expected["arguments"]},
                                       ensure_ascii=False),
    score=score,
    instruction=lambda row: INSTRUCTION.format(tools=json.dumps([t.model_dump() for t in row.tools],
                                                                ensure_ascii=False)),
    request_fields=lambda chat_row: {"tools": chat_row.get("tools")},
    split_group=lambda row: row.expected["name"],
    breakdown=("per_function", "function"),
)
