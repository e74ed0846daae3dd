"""Structured output: the answer is one JSON value that must satisfy the row's JSON Schema.

Metrics: valid JSON, valid against the schema, per-field exact match (primary), whole-object match;
the breakdown is the accuracy of each field.
"""

from __future__ import annotations

import json

import jsonschema

from tasks.tasktypes.base import TaskType, parse_json_answer

INSTRUCTION = "Answer with only a JSON value that is valid against this JSON Schema, and nothing else:\n{schema}"


def check_row(row) -> None:
    if row.json_schema is None:
        raise ValueError("structured: 'schema' (a JSON Schema) is required")
    try:
        jsonschema.Draft202012Validator.check_schema(row.json_schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"structured: 'schema' is not a valid JSON Schema: {exc.message}") from None
    errors = sorted(jsonschema.Draft202012Validator(row.json_schema).iter_errors(row.expected), key=str)
    if row.expected is None or errors:
        reason = errors[0].message if errors else "missing"
        raise ValueError(f"structured: 'expected' does not match 'schema': {reason}")


def score(row: dict, answer: str, tool_calls=None, count_tokens=None) -> dict:
    ok, value = parse_json_answer(answer)
    expected = row["expected"]
    schema_valid = ok and jsonschema.Draft202012Validator(row["schema"]).is_valid(value)
    fields = {}
    if isinstance(expected, dict):
        for key, gold in expected.items():
            fields[key] = float(ok and isinstance(value, dict) and key in value and value[key] == gold)
    else:
        fields["<value>"] = float(ok and value == expected)
    return {"valid_json": float(ok), "schema_valid": float(schema_valid),
            "field_accuracy": sum(fields.values()) / len(fields) if fields else float(ok and value == expected),
            "exact_match": float(ok and value == expected), "fields": fields,
            "group": None, "error": None if ok else "not JSON" if answer.strip() else "empty answer"}


STRUCTURED = TaskType(
    name="structured",
    metrics=(("valid_json", "valid JSON"), ("schema_valid", "schema-valid"), ("field_accuracy", "field acc."),
             ("exact_match", "exact match")),
    primary_metric="field_accuracy",
    check_row=check_row,
    gold_answer=lambda row: json.dumps(row.expected, ensure_ascii=False),
    score=score,
    instruction=lambda row: INSTRUCTION.format(schema=json.dumps(row.json_schema, ensure_ascii=False)),
    request_fields=lambda chat_row: {"json_schema": chat_row.get("schema")},
    split_group=lambda row: row.json_schema.get("title", ""),
    breakdown=("per_field", "field"),
    group_scores=lambda scores: scores["fields"],
)
