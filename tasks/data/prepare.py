"""Data preparation: read and validate the source JSONL, deduplicate, split without prompt leakage, format.

Splits are made over *unique normalised prompts*, so a prompt that occurs twice in the source can never
land in both train and test. Each row becomes chat `messages` with the recipe's system prompt.
Four source formats: Slipstream ShareGPT conversations (`sharegpt`), Data Factory instruction/input/output
rows (`datafactory`, seed 002; converted to ShareGPT first), the eval-file format of any task type
(`eval`, tasks/data/evalfile.py), whose expected answers become the assistant turns to train on, and
plain chat rows (`messages`, OpenAI/Together style, e.g. data/gerbil-qa.jsonl), whose last assistant turn
is the answer. With `data.test_file` the test split is that eval file's rows (scored by the recipe's task
type) and every source row is train or validation.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Callable

from prefect import task

from tasks.data.dedupe import eval_prompts_from_file, merge_contamination, remove_contaminated, remove_duplicates
from tasks.data.evalfile import EvalFileError, gold_answer, load_eval_file, to_chat_row
from tasks.data.formats import FormatError, read_record, write_record
from tasks.data.rows import Example, normalise, read_json_lines
from tasks.tasktypes import task_type
from tasks.protocol import SlipParseError, parse_tqt
from tasks.recipe import DataConfig, repo_path
from tasks.synth.templates import generator_fingerprint, synthesize
from tasks.run import RunFolder, atomic_write_json, atomic_write_jsonl, resumable_stage, stage_timer

SYNTH_SOURCE = "templates"   # provenance of rows made by the template synthesis
_ROLE_MAP = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class DatasetError(ValueError):
    """A source row that is not usable; the message names file, line and rule."""


def _row_to_example(obj: object, where: str, line: int) -> Example:
    if not isinstance(obj, dict) or "conversations" not in obj:
        raise DatasetError(f"{where}: expected an object with a 'conversations' list")
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DatasetError(f"{where}: 'conversations' must be a non-empty list")
    roles, texts = [], []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DatasetError(f"{where}: turn {i} is not an object")
        speaker = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if speaker not in _ROLE_MAP or not isinstance(text, str):
            raise DatasetError(f"{where}: turn {i} needs from/value (or role/content) with a known role, "
                               f"got {speaker!r}")
        roles.append(_ROLE_MAP[speaker])
        texts.append(text)
    if roles[-2:] != ["user", "assistant"]:
        raise DatasetError(f"{where}: the last two turns must be user then assistant, got {roles[-2:]}")
    try:
        parsed = parse_tqt(texts[-1])
    except SlipParseError as exc:
        raise DatasetError(f"{where}: assistant answer is not a valid TQT answer: {exc}") from None
    return Example(prompt=texts[-2].strip(), answer=texts[-1].strip(), anchor=parsed.slip.anchor, line=line)


def _load_rows(path: Path, to_example: Callable[[object, str, int], Example]) -> list[Example]:
    """Every non-blank line of a source JSONL as an Example (`to_example(obj, '<file>:<line>', line)`),
    its provenance the file's name: the one reading loop of the line-based formats.

    Raises:
        DatasetError: a missing or empty file, or '<file>:<line>: <rule>' for the first bad line.
    """
    path = repo_path(path)
    if not path.exists():
        raise DatasetError(f"{path}: dataset file not found")
    examples = [to_example(obj, where, line_no) for line_no, obj, where in read_json_lines(path, DatasetError)]
    if not examples:
        raise DatasetError(f"{path}: no rows")
    return [replace(ex, source=path.name) for ex in examples]


def _read_as(obj: object, fmt: str, where: str):
    """One row read as a tasks.data.formats conversation, its FormatError (file:line: field) a DatasetError."""
    try:
        return read_record(obj, fmt, where)
    except FormatError as exc:
        raise DatasetError(str(exc)) from None


def load_examples(path: Path) -> list[Example]:
    """Read a ShareGPT JSONL file, validating every line.

    Raises:
        DatasetError: '<file>:<line>: <rule>' for the first bad line (not JSON, wrong shape, bad answer).
    """
    return _load_rows(path, _row_to_example)


def synthetic_examples(cfg: DataConfig) -> list[Example]:
    """`cfg.synth_rows` rows from the template synthesis (tasks/synth/templates.py): each names its
    recipient, which is its SLIP dst, and each answer passed the strict TQT parser when it was rendered."""
    records = synthesize(cfg.synth_rows, cfg.synth_seed)
    return [Example(prompt=r.instruction, answer=r.answer(), anchor=r.anchor, line=i, source=SYNTH_SOURCE)
            for i, r in enumerate(records, 1)]


def mix_counts(rows: dict[str, list[dict]]) -> dict:
    """Provenance of every split: {split: {source: {anchor: rows}}}, anchors by count."""
    return {name: {source: dict(Counter(r.get("anchor") for r in part if r.get("source") == source).most_common())
                   for source in sorted({r.get("source", "") for r in part})}
            for name, part in rows.items()}


def load_datafactory_examples(path: Path) -> list[Example]:
    """Read a Data Factory file (seed 002: instruction = system prompt, input = user, output = assistant),
    convert each row to ShareGPT with tasks.data.formats, then validate it like any ShareGPT row.

    Raises:
        DatasetError: '<file>:<line>: <rule>' for the first bad line.
    """
    def to_example(obj: object, where: str, line_no: int) -> Example:
        sharegpt = write_record(_read_as(obj, "datafactory", where), "sharegpt", where)
        return _row_to_example(sharegpt, where, line_no)

    return _load_rows(path, to_example)


def load_eval_examples(path: Path, task: str) -> list[Example]:
    """Read an eval-format file (tasks/data/evalfile.py) as training examples; rows without an answer are refused.

    Raises:
        DatasetError: '<file>:<line>: <reason>' for the first bad line.
    """
    path = repo_path(path)
    try:
        rows = load_eval_file(path, task)
    except EvalFileError as exc:
        raise DatasetError(str(exc)) from None
    examples = []
    for row in rows:
        answer = gold_answer(row)
        if answer is None:
            raise DatasetError(f"{path}: row {row.id!r} has no 'expected' answer to train on")
        prompt = row.prompt if row.prompt is not None else row.messages[-1].content
        group = task_type(task).split_group(row)
        line = int(row.id.removeprefix("line-")) if row.id.startswith("line-") else 0
        examples.append(Example(prompt=prompt.strip(), answer=answer, anchor=group, line=line, row=row))
    return examples


def load_chat_examples(path: Path) -> list[Example]:
    """Read chat rows ({"messages": [...]}, optional `tools`): the last turn must be the assistant's answer,
    the one before it the user's prompt (earlier turns and the row's own system prompt are not kept: the
    recipe's system prompt is what training and evaluation use).

    Raises:
        DatasetError: '<file>:<line>: <rule>' for the first bad line.
    """
    def to_example(obj: object, where: str, line_no: int) -> Example:
        conv = _read_as(obj, "messages", where)
        roles = [m.role for m in conv.messages]
        if roles[-2:] != ["user", "assistant"]:
            raise DatasetError(f"{where}: the last two turns must be user then assistant, got {roles[-2:]}")
        return Example(prompt=conv.messages[-2].content.strip(), answer=conv.messages[-1].content.strip(),
                       anchor="", line=line_no)

    return _load_rows(path, to_example)


def split_examples(examples: list[Example], cfg: DataConfig) -> dict[str, list[Example]]:
    """Seeded train/val/test split over unique normalised prompts (no prompt shared across splits)."""
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(normalise(ex.prompt), []).append(ex)
    keys = sorted(groups)
    random.Random(cfg.seed).shuffle(keys)
    n_test = 0 if cfg.test_file else max(1, round(len(keys) * cfg.test_ratio))
    n_val = round(len(keys) * cfg.val_ratio)
    parts = {"test": keys[:n_test], "val": keys[n_test:n_test + n_val], "train": keys[n_test + n_val:]}
    return {name: [ex for k in part for ex in groups[k]] for name, part in parts.items()}


def mix_lines(stats: dict | None) -> list[str]:
    """Markdown table of the mix (data/stats.json 'mix'): rows per anchor and source in the train and test
    splits (and in the rows trained, where the report adds them), with the provenance of each source. Empty
    for stats without a mix."""
    mix = (stats or {}).get("mix")
    if not mix:
        return []
    # "trained": the rows a time budget kept (the report adds it), beside the whole train split
    cols = [(split, source) for split in ("trained", "train", "test") for source in sorted(mix.get(split, {}))]
    anchors = sorted({a for split, source in cols for a in mix[split][source]},
                     key=lambda a: -sum(mix[s][src].get(a, 0) for s, src in cols))
    provenance = {SYNTH_SOURCE: f"template synthesis (tasks/synth/templates.py over data/slipstream-templates.yaml, "
                                f"{stats.get('synth_rows')} rows asked; the recipient named in each prompt is its "
                                "SLIP dst)"}
    lines = ["", "### Training mix: rows per anchor and source", "",
             *[f"- `{source}`: {provenance.get(source, 'the recipe source file (data/README.md says where it is from)')}"
               for source in sorted({src for _, src in cols})], "",
             "| anchor | " + " | ".join(f"{split}: {source}" for split, source in cols) + " |",
             "|---|" + "---|" * len(cols)]
    lines += [f"| {a} | " + " | ".join(str(mix[s][src].get(a, 0)) for s, src in cols) + " |" for a in anchors]
    lines.append("| **total** | " + " | ".join(str(sum(mix[s][src].values())) for s, src in cols) + " |")
    return lines


def to_messages(ex: Example, system_prompt: str) -> dict:
    """A chat row with the recipe's system prompt; `anchor` kept for evaluation."""
    if ex.row is not None:
        return to_chat_row(ex.row, system_prompt)
    return {"messages": [{"role": "system", "content": system_prompt},
                         {"role": "user", "content": ex.prompt},
                         {"role": "assistant", "content": ex.answer}],
            "anchor": ex.anchor, "source": ex.source}


def fingerprint(path: Path) -> str:
    """Content hash of the source file, part of the data-preparation cache key."""
    return hashlib.sha256(repo_path(path).read_bytes()).hexdigest()


def prepare_cache_key(context, parameters) -> str:
    """Inputs that decide the splits: the data section, the system prompt, the task type, the source and
    eval-file bytes, and the code that prepares them (this module, tasks/data/{rows,dedupe,formats}.py,
    tasks/data/evalfile.py and tasks/tasktypes/, which render eval-format rows)."""
    cfg: DataConfig = parameters["cfg"]
    here = Path(__file__).parent
    task_types = sorted((here.parent / "tasktypes").glob("*.py"))   # gold answers, instructions
    code = hashlib.sha256(b"".join((here / f).read_bytes()
                                   for f in ("prepare.py", "rows.py", "dedupe.py", "formats.py", "evalfile.py"))
                          + b"".join(p.read_bytes() for p in task_types))
    key = json.dumps([cfg.model_dump(), parameters["system_prompt"], parameters.get("task", "slipstream"),
                      fingerprint(cfg.source), [fingerprint(f) for f in cfg.eval_files],
                      fingerprint(cfg.test_file) if cfg.test_file else None, code.hexdigest()[:12],
                      generator_fingerprint() if cfg.synth_rows else None])
    return "prepare-splits-" + hashlib.sha256(key.encode()).hexdigest()


@task(name="prepare-splits", cache_key_fn=prepare_cache_key, persist_result=True, result_serializer="json")
def prepare_splits(cfg: DataConfig, system_prompt: str, task: str = "slipstream") -> dict:
    """Validate, dedupe and split the source; returns chat rows per split and what was removed.

    Exact and near-duplicate prompts, and prompts of `cfg.eval_files`, leave the source before the split
    (so no such pair straddles train and test); training rows that still match a test/val prompt are
    removed after it.
    """
    loaders = {"eval": lambda p: load_eval_examples(p, task), "datafactory": load_datafactory_examples,
               "messages": load_chat_examples, "sharegpt": load_examples}
    examples = loaders[cfg.format](Path(cfg.source))
    if cfg.synth_rows:
        if task != "slipstream" or cfg.format != "sharegpt":
            raise DatasetError(f"data.synth_rows: the template synthesis makes Slipstream rows; this recipe's task "
                               f"is {task!r} with data.format {cfg.format!r}")
        examples += synthetic_examples(cfg)
    unique, dup_report = remove_duplicates(examples, cfg.near_duplicate_jaccard)
    held_out_files = [*cfg.eval_files, *([cfg.test_file] if cfg.test_file else [])]
    external = {f: eval_prompts_from_file(repo_path(f)) for f in held_out_files}
    unique, from_files = remove_contaminated(unique, external, cfg.near_duplicate_jaccard)
    splits = split_examples(unique, cfg)
    held_out = {f"{name} split": [ex.prompt for ex in splits[name]] for name in ("test", "val")}
    splits["train"], from_splits = remove_contaminated(splits["train"], held_out, cfg.near_duplicate_jaccard)
    contamination = merge_contamination(from_files, from_splits)
    rows = {name: [to_messages(ex, system_prompt) for ex in part] for name, part in splits.items()}
    if cfg.test_file:
        try:
            test_rows = load_eval_file(repo_path(cfg.test_file), task)
        except EvalFileError as exc:
            raise DatasetError(str(exc)) from None
        rows["test"] = [to_chat_row(row, system_prompt) for row in test_rows]
    if cfg.train_rows:
        rows["train"] = rows["train"][:cfg.train_rows]
    if cfg.eval_rows:
        rows["test"] = rows["test"][:cfg.eval_rows]
    test_prompts = {normalise(next(m["content"] for m in reversed(r["messages"]) if m["role"] == "user"))
                    for r in rows["test"]}
    leaked = sum(normalise(r["messages"][-2]["content"]) in test_prompts for r in rows["train"])
    if leaked:  # an invariant of split_examples; checked because a leak would inflate every number
        raise DatasetError(f"{leaked} training prompts also occur in the test split")
    return {"rows": rows, "stats": {"source_rows": len(examples),
                                    "duplicates_removed": dup_report["exact_duplicates"]["removed"],
                                    "near_duplicates_removed": dup_report["near_duplicates"]["removed"],
                                    "contaminated_removed": contamination["removed"],
                                    **{f"{k}_rows": len(v) for k, v in rows.items()},
                                    "synth_rows": cfg.synth_rows, "mix": mix_counts(rows),
                                    "dedupe": dup_report, "contamination": contamination}}


@task(name="write-eval-file-split")
def write_eval_file_split(run_dir: Path, eval_file: str, system_prompt: str, task: str, max_rows: int = 0) -> str:
    """A recipe eval file (data.eval_files, validated line by line) as a row file of the run, evaluated
    beside the test split (its first `max_rows` rows, 0 = all: data.eval_rows, as for the test split);
    returns its split name (the file's stem).

    Raises:
        EvalFileError: naming the file and line of the first bad row.
    """
    name = Path(eval_file).stem
    rows = [to_chat_row(r, system_prompt) for r in load_eval_file(repo_path(eval_file), task)]
    atomic_write_jsonl(RunFolder(run_dir).split(name), rows[:max_rows] if max_rows else rows)
    return name


@task(name="write-splits")
@resumable_stage("splits")   # a resumed run keeps its splits: the same data, the same order
def write_splits(run_dir: Path, prepared: dict) -> dict:
    """Write data/{train,val,test}.jsonl and data/stats.json into the run folder."""
    run = RunFolder(run_dir)
    with stage_timer(run, "data"):
        for name, rows in prepared["rows"].items():
            atomic_write_jsonl(run.split(name), rows)
        atomic_write_json(run.data_stats, prepared["stats"])
    return prepared["stats"]
