"""Eval files: plain JSONL a person can write by hand, validated line by line (format: docs/eval-file-format.md).

One JSON object per line describes one request and what a correct answer is:

    {"id": "st-001", "task": "structured", "prompt": "...", "schema": {...}, "expected": {...}}
    {"id": "tc-001", "task": "toolcall", "prompt": "...", "tools": [...], "expected": {"name": "...", "arguments": {...}}}
    {"task": "slipstream", "prompt": "...", "expected": "THOUGHT: ...\\nSLIP: SLIP v1 ..."}
    {"task": "keyword", "prompt": "...", "keywords": ["...", "..."]}

A bad line fails the whole file with `<file>:<line>: <field>: <reason>`. The fields every row shares are
checked here; the rules of its task type (and its gold answer and instruction) come from the task-type
registry (tasks/tasktypes). Rows become chat rows (`messages` ending with the gold assistant answer,
plus the fields the scorer needs), the one shape that training, evaluation and the runners share. The
instructions that tell a model the schema or the tools are rendered here, once, so every model (SLM,
fine-tuned, LLM) is asked the same question.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.data.rows import read_json_lines
from tasks.tasktypes import TASK_TYPES, task_type


class EvalFileError(ValueError):
    """An eval file that cannot be used; the message names the file and line."""


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class Tool(BaseModel):
    """An OpenAI function definition: name, description, JSON Schema of the arguments."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str = ""
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})

    @field_validator("parameters")
    @classmethod
    def _valid_schema(cls, value: dict) -> dict:
        jsonschema.Draft202012Validator.check_schema(value)
        return value


class EvalRow(BaseModel):
    """One line of an eval file."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    task: str = Field(description="A registered task type (tasks/tasktypes).")
    prompt: str | None = Field(None, min_length=1)
    messages: list[Message] | None = None
    system: str | None = None
    expected: Any = None
    json_schema: dict | None = Field(None, alias="schema")
    tools: list[Tool] | None = None
    keywords: list[str] | None = None
    metadata: dict = Field(default_factory=dict)

    @field_validator("tools", mode="before")
    @classmethod
    def _unwrap_function(cls, value):
        # Accept OpenAI's {"type": "function", "function": {...}} wrapper as well as the bare function.
        if isinstance(value, list):
            return [t["function"] if isinstance(t, dict) and t.get("type") == "function" and "function" in t
                    else t for t in value]
        return value

    @field_validator("task")
    @classmethod
    def _registered_task(cls, value: str) -> str:
        if value not in TASK_TYPES:
            raise ValueError(f"got {value!r}; allowed values: {sorted(TASK_TYPES)}")
        return value

    @model_validator(mode="after")
    def _check_task_fields(self) -> "EvalRow":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' (text) or 'messages' (chat turns ending with a user turn)")
        if self.messages is not None and (not self.messages or self.messages[-1].role != "user"):
            raise ValueError("'messages' must end with a user turn (put the gold answer in 'expected')")
        task_type(self.task).check_row(self)
        return self


def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg   # row-level rules name their fields themselves


def load_eval_file(path: str | Path, task: str | None = None) -> list[EvalRow]:
    """Read and validate every line of an eval file.

    Args:
        path: the JSONL file.
        task: the task type the caller evaluates; rows may omit `task` and then take this one.

    Raises:
        EvalFileError: '<file>:<line>: <reason>' for the first bad line (not JSON, wrong fields, an
            answer that does not satisfy its own schema, a task other than `task`, a duplicate id).
    """
    path = Path(path)
    if not path.exists():
        raise EvalFileError(f"{path}: eval file not found")
    rows: list[EvalRow] = []
    seen: dict[str, int] = {}
    for line_no, obj, where in read_json_lines(path, EvalFileError):
        if not isinstance(obj, dict):
            raise EvalFileError(f"{where}: a line must be a JSON object, got {type(obj).__name__}")
        if task is not None:
            obj.setdefault("task", task)
        try:
            row = EvalRow.model_validate(obj)
        except ValidationError as exc:
            raise EvalFileError(f"{where}: " + "; ".join(_describe(e) for e in exc.errors())) from None
        if task is not None and row.task != task:
            raise EvalFileError(f"{where}: task {row.task!r} but this evaluation is {task!r}")
        row.id = row.id or f"line-{line_no}"
        if row.id in seen:
            raise EvalFileError(f"{where}: id {row.id!r} already used on line {seen[row.id]}")
        seen[row.id] = line_no
        rows.append(row)
    if not rows:
        raise EvalFileError(f"{path}: no rows")
    return rows


def gold_answer(row: EvalRow) -> str | None:
    """The assistant text a perfect model writes (what training teaches); None when there is none."""
    return task_type(row.task).gold_answer(row)


def system_prompt_for(row: EvalRow, system_prompt: str) -> str:
    """The recipe's (or the row's own) system prompt plus the task's instruction (schema, tool list)."""
    base = row.system if row.system is not None else system_prompt
    extra = task_type(row.task).instruction(row)
    if not extra:
        return base
    return f"{base}\n\n{extra}" if base else extra


def to_chat_row(row: EvalRow, system_prompt: str) -> dict:
    """The shared chat-row shape: messages (with the gold answer last, when known) plus scorer fields."""
    system = system_prompt_for(row, system_prompt)
    turns = [m.model_dump() for m in row.messages] if row.messages else [{"role": "user", "content": row.prompt}]
    if turns[0]["role"] == "system":
        turns = turns[1:]
    messages = ([{"role": "system", "content": system}] if system else []) + turns
    gold = gold_answer(row)
    if gold is not None:
        messages.append({"role": "assistant", "content": gold})
    chat = {"id": row.id, "task": row.task, "messages": messages, "expected": row.expected,
            "has_gold": gold is not None, "metadata": row.metadata}
    chat.update(task_type(row.task).chat_fields(row))
    if row.json_schema is not None:
        chat["schema"] = row.json_schema
    if row.tools is not None:
        chat["tools"] = [t.model_dump() for t in row.tools]
    if row.keywords is not None:
        chat["keywords"] = row.keywords
    return chat


def prompt_messages(chat_row: dict) -> list[dict]:
    """The turns sent to a model: everything but the gold answer."""
    messages = chat_row["messages"]
    has_gold = chat_row.get("has_gold", messages[-1]["role"] == "assistant")
    return messages[:-1] if has_gold else messages

