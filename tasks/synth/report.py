"""Account for every requested record of a synthesis run and write the records and the report.

Output folder (one per run; tasks.run.SynthFolder names each file):
    synthetic.jsonl          ShareGPT rows shaped like data/slipstream-tqt.jsonl (system, human, gpt), the
                             same rows the template synthesizer writes; tasks.data.prepare and tasks.data.formats read them
    ledger.jsonl             one line per requested record: id, kept/repaired/dropped, the repairs or the
                             drop reason, its row in synthetic.jsonl, the model's raw record for drops
    responses.jsonl          each batch's raw answer (or error), tokens, retries and whether it came from cache
    synthesis-report.json    counts, reasons, repairs, retries, tokens and cost (estimated and used)
    synthesis-report.md      the same for people; also a Prefect artifact `synthesis-report`
    COMPLETE                 written last
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.data.dedupe import NearIndex, word_rank, word_set
from tasks.data.rows import normalise
from tasks.recipe import REPO_ROOT
from tasks.run import SynthFolder, atomic_write_json, atomic_write_jsonl, atomic_write_text, new_synth_dir
from tasks.synth.repair import Drop, Repaired, extract_items, repair_llm_record


class SynthesisAccountingError(RuntimeError):
    """Requested records do not add up to kept + repaired + dropped (a bug, never a data problem)."""


@task(name="create-synthesis-folder")
def create_output_dir(output_dir: str | None) -> SynthFolder:
    """A fresh folder for this run (default runs/synth-<UTC time>, claimed atomically: `-2`, ... when
    another synthesis started in the same second).

    Raises:
        FileExistsError: the folder exists and is not empty (a run never overwrites another).
    """
    if not output_dir:
        return SynthFolder(new_synth_dir(REPO_ROOT / "runs").resolve())
    path = Path(output_dir)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path}: output folder exists and is not empty")
    path.mkdir(parents=True, exist_ok=True)
    return SynthFolder(path.resolve())


def _missing_reason(text: str, items: list, finish_reason: str | None) -> str:
    reason = "empty response" if not text.strip() else "no complete JSON record in response" if not items \
        else "not returned"
    return reason + (" (cut at max_tokens)" if finish_reason == "length" else "")


@dataclass
class _Candidate:
    id: str
    repaired: Repaired
    fixes: list[str]
    raw: object
    examples: set[str]


def _candidates(specs: list, outcomes: list[dict], drop) -> tuple[list[_Candidate], int]:
    """Pass 1: every requested slot becomes a candidate record or a drop with its reason; also returns how
    many records came back beyond the number asked for (ignored)."""
    found, surplus = [], 0
    for spec, out in zip(specs, outcomes, strict=True):
        ids = [f"b{spec.index:04d}-r{slot:03d}" for slot in range(spec.count)]
        if "error" in out:
            for record_id in ids:
                drop(record_id, f"request failed: {out['error']}")
            continue
        # Models often echo the prompt's own example; it would be one record repeated across every batch.
        examples = {normalise(m) for m in re.findall(r'"instruction":\s*"([^"]+)"', spec.prompt)}
        items, text_repairs = extract_items(out["text"])
        surplus += max(0, len(items) - spec.count)
        for slot, record_id in enumerate(ids):
            if slot >= len(items):
                drop(record_id, _missing_reason(out["text"], items, out["finish_reason"]))
                continue
            try:
                rec = repair_llm_record(items[slot])
            except Drop as exc:
                drop(record_id, str(exc), items[slot])
                continue
            found.append(_Candidate(record_id, rec, text_repairs + rec.repairs, items[slot], examples))
    return found, surplus


@task(name="assemble-records")
def assemble_records(specs: list, outcomes: list[dict], source: str, near_duplicate_jaccard: float) -> dict:
    """Validate, repair and deduplicate (exact normalised prompt, then word-set Jaccard as tasks.data.dedupe
    does) every requested record, dropping echoes of the prompt's own example; count each outcome.

    Raises:
        SynthesisAccountingError: the counts do not add up (an internal invariant).
    """
    rows, ledger, dropped, repairs, anchors = [], [], Counter(), Counter(), Counter()

    def drop(record_id: str, reason: str, raw: object = None) -> None:
        dropped[reason] += 1
        ledger.append({"id": record_id, "status": "dropped", "reason": reason, "raw": raw})

    candidates, surplus = _candidates(specs, outcomes, drop)
    near = NearIndex(near_duplicate_jaccard, word_rank(word_set(c.repaired.instruction) for c in candidates))
    seen: set[str] = set()
    for c in candidates:
        key, words = normalise(c.repaired.instruction), word_set(c.repaired.instruction)
        if key in c.examples:
            drop(c.id, "copies the prompt's example", c.raw)
        elif key in seen:
            drop(c.id, "duplicate prompt", c.raw)
        elif near.best_match(words):
            drop(c.id, f"near-duplicate prompt (Jaccard >= {near_duplicate_jaccard:g})", c.raw)
        else:
            seen.add(key)
            near.add(words, c.id)
            repairs.update(c.fixes)
            anchors[c.repaired.anchor] += 1
            ledger.append({"id": c.id, "status": "repaired" if c.fixes else "kept", "row": len(rows),
                           "anchor": c.repaired.anchor, "repairs": c.fixes})
            rows.append(c.repaired.record.to_sharegpt())
    ledger.sort(key=lambda entry: entry["id"])
    status = Counter(entry["status"] for entry in ledger)
    requested = sum(s.count for s in specs)
    if len(ledger) != requested or len({e["id"] for e in ledger}) != requested:
        raise SynthesisAccountingError(f"{requested} requested but the ledger has {len(ledger)} entries "
                                       f"({dict(status)})")
    fresh = [o for o in outcomes if not o["cached"]]
    retry_causes = Counter(r["cause"] for o in fresh for r in o["retries"])
    return {"rows": rows, "ledger": ledger, "responses": outcomes, "source": source,
            "counts": {"requested": requested, "kept": status["kept"], "repaired": status["repaired"],
                       "dropped": status["dropped"], "written": len(rows)},
            "dropped_by_reason": dict(dropped.most_common()), "repairs_by_kind": dict(repairs.most_common()),
            "anchors": dict(anchors.most_common()),
            "surplus_ignored": surplus,
            "batches": {"total": len(outcomes), "failed": sum("error" in o for o in outcomes),
                        "from_cache": len(outcomes) - len(fresh)},
            "retries": {"total": sum(retry_causes.values()), "by_cause": dict(retry_causes.most_common())},
            "tokens": {"prompt": sum(o["prompt_tokens"] for o in fresh),
                       "completion": sum(o["completion_tokens"] for o in fresh),
                       "cached_prompt": sum(o["prompt_tokens"] for o in outcomes if o["cached"]),
                       "cached_completion": sum(o["completion_tokens"] for o in outcomes if o["cached"])}}


def _table(title: str, counts: dict, total: int | None = None) -> list[str]:
    if not counts:
        return [f"**{title}:** none", ""]
    lines = [f"| {title} | records |", "|---|---:|"]
    lines += [f"| {name} | {n}" + (f" ({100 * n / total:.0f} %)" if total else "") + " |" for name, n in counts.items()]
    return lines + [""]


def render_markdown(report: dict) -> str:
    c, t, est = report["counts"], report["tokens"], report["estimate"]
    lines = [f"# Synthesis report: {report['endpoint']['provider']} / {report['endpoint']['model']}", "",
             f"**{c['requested']} requested = {c['kept']} kept + {c['repaired']} repaired + "
             f"{c['dropped']} dropped** → {c['written']} records written (no duplicate prompts).", "",
             f"Requests: {report['batches']['total']} batches of up to {report['config']['batch_size']}, "
             f"{report['batches']['failed']} failed after retries, {report['batches']['from_cache']} from cache; "
             f"{report['retries']['total']} retries this run.", "",
             "| tokens | prompt | completion | USD |", "|---|---:|---:|---:|",
             f"| estimated before the run | {est['prompt_tokens']} | {est['completion_tokens']} | {est['usd']:.4f} |",
             f"| used (reported by the API) | {t['prompt']} | {t['completion']} | {report['usd_used']:.4f} |",
             f"| reused from cache (free) | {t['cached_prompt']} | {t['cached_completion']} | 0 |", ""]
    lines += _table("dropped: reason", report["dropped_by_reason"], c["requested"])
    lines += _table("repair", report["repairs_by_kind"])
    lines += _table("retry cause", report["retries"]["by_cause"])
    lines += _table("anchor", report["anchors"])
    if report["surplus_ignored"]:
        lines.append(f"{report['surplus_ignored']} records returned beyond the number asked for were ignored.")
    return "\n".join(lines) + "\n"


@task(name="write-synthesis")
def write_synthesis(out_dir: Path | SynthFolder, config: dict, endpoint: dict, estimate: dict, result: dict) -> dict:
    """Write the records, the rejects and the report (JSON, Markdown, Prefect artifact); COMPLETE last."""
    out = SynthFolder(out_dir)
    t = result["tokens"]
    usd = (t["prompt"] * estimate["input_cost_per_mtok"] + t["completion"] * estimate["output_cost_per_mtok"]) / 1e6
    report = {"endpoint": endpoint, "config": config, "estimate": estimate, "usd_used": round(usd, 4),
              **{k: v for k, v in result.items() if k not in ("rows", "ledger", "responses")}}
    atomic_write_jsonl(out.records, result["rows"])
    atomic_write_jsonl(out.ledger, result["ledger"])
    atomic_write_jsonl(out.responses, result["responses"])
    atomic_write_json(out.report_json, report)
    markdown = render_markdown(report)
    atomic_write_text(out.report_md, markdown)
    create_markdown_artifact(markdown=markdown, key="synthesis-report", description=str(out))
    c = report["counts"]
    create_table_artifact(key="synthesis-counts", description=f"records kept / repaired / dropped in {out}",
                          table=[{"outcome": k, "records": c[k]} for k in ("requested", "kept", "repaired", "dropped")]
                          + [{"outcome": f"dropped: {reason}", "records": n}
                             for reason, n in report.get("dropped_by_reason", {}).items()])
    get_run_logger().info(
        "Synthesis done: %d requested = %d kept + %d repaired + %d dropped; tokens used %d prompt + %d completion "
        "(~$%.4f); %d retries; %s", c["requested"], c["kept"], c["repaired"], c["dropped"], t["prompt"],
        t["completion"], usd, report["retries"]["total"], out)
    atomic_write_json(out.complete_marker, {"counts": c})
    return report


@task(name="write-template-synthesis")
def write_template_synthesis(out_dir: Path | SynthFolder, config: dict, rows: list[dict]) -> dict:
    """Records of the template synthesizer (tasks/synth/templates.py) in the same folder layout: every
    requested record is made or the generator raises, so all are kept."""
    out = SynthFolder(out_dir)
    counts = {"requested": config["n"], "kept": len(rows), "repaired": 0, "dropped": 0, "written": len(rows)}
    report = {"method": "templates", "config": config, "counts": counts}
    atomic_write_jsonl(out.records, rows)
    atomic_write_jsonl(out.ledger, [{"id": f"t{i:06d}", "status": "kept", "row": i} for i in range(len(rows))])
    atomic_write_json(out.report_json, report)
    markdown = (f"# Synthesis report: templates\n\n**{counts['requested']} requested = {counts['kept']} kept** "
                f"(tasks/synth/templates.py, seed {config['seed']}).\n")
    atomic_write_text(out.report_md, markdown)
    create_markdown_artifact(markdown=markdown, key="synthesis-report", description=str(out))
    atomic_write_json(out.complete_marker, {"counts": counts})
    return report
