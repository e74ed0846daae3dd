"""Scores per row and one summary per model, for any registered task type (tasks/tasktypes).

A row's scores come from its task type's scorer; a model's summary is the mean of each metric, the
task's per-group breakdown and extra fields, the most common errors, latency, tokens and throughput.
"""

from __future__ import annotations

from collections import Counter

from tasks.tasktypes import task_of, task_type
from tasks.tasktypes.base import TokenCounter


def score_row(row: dict, answer: str, count_tokens: TokenCounter | None = None,
              tool_calls: list[dict] | None = None) -> dict:
    """Scores of one answer against one chat row (its task type decides the metrics)."""
    return task_of(row).score(row, answer, tool_calls, count_tokens)


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))], 3)


def aggregate(task: str, scored: list[dict], calls: list[dict], seconds: float) -> dict:
    """Per-model summary: metric means, per-group accuracy, errors, latency, tokens and throughput.

    Args:
        task: the task type's name.
        scored: one score dict per row (from `score_row`).
        calls: one dict per row with latency_s, prompt_tokens, completion_tokens (from the runner).
        seconds: wall time of the whole evaluation (throughput and hourly cost use it).
    """
    kind = task_type(task)
    n = len(scored)
    # A metric a row does not apply to is None there (Slipstream's dst_accuracy on rows without a named
    # recipient): the mean is over the rows it applies to, None when there are none.
    summary: dict = {key: _mean([s[key] for s in scored if s[key] is not None]) for key in kind.metric_keys}
    if kind.breakdown:
        groups: dict[str, list[float]] = {}
        for s in scored:
            for group, value in kind.groups_of(s).items():
                groups.setdefault(group, []).append(value)
        summary[kind.breakdown[0]] = {g: round(sum(v) / len(v), 3) for g, v in sorted(groups.items())}
    summary.update(kind.summarize(scored))
    summary["errors"] = dict(Counter(s["error"].split(":")[0][:60] for s in scored if s.get("error")).most_common(5))
    latencies = [c["latency_s"] for c in calls if c.get("latency_s") is not None]
    prompt_tokens = sum(c.get("prompt_tokens") or 0 for c in calls)
    completion_tokens = sum(c.get("completion_tokens") or 0 for c in calls)
    summary.update(
        rows=n, seconds=round(seconds, 2), failed_calls=sum(1 for c in calls if c.get("error")),
        latency_p50_s=_percentile(latencies, 0.5), latency_p95_s=_percentile(latencies, 0.95),
        prompt_tokens=prompt_tokens, generated_tokens=completion_tokens,
        mean_prompt_tokens=round(prompt_tokens / n, 1) if n else None,
        mean_completion_tokens=round(completion_tokens / n, 1) if n else None,
        tokens_per_second=round(completion_tokens / seconds, 1) if seconds else None,
        requests_per_second=round(n / seconds, 3) if seconds else None)
    return summary


def cost_per_1k_requests(summary: dict, input_usd_per_mtok: float | None = None,
                         output_usd_per_mtok: float | None = None, usd_per_hour: float | None = None) -> dict:
    """Estimated USD per 1,000 requests: per-token prices (a hosted LLM) or an hourly machine price (a
    self-hosted model, at the throughput measured here, batching and concurrency included)."""
    if input_usd_per_mtok is not None or output_usd_per_mtok is not None:
        usd = 1000 * ((summary["mean_prompt_tokens"] or 0) * (input_usd_per_mtok or 0)
                      + (summary["mean_completion_tokens"] or 0) * (output_usd_per_mtok or 0)) / 1e6
        return {"usd_per_1k_requests": round(usd, 5), "basis": f"${input_usd_per_mtok}/Mtok in, "
                f"${output_usd_per_mtok}/Mtok out"}
    if usd_per_hour is not None and summary.get("requests_per_second"):
        usd = 1000 / summary["requests_per_second"] / 3600 * usd_per_hour
        return {"usd_per_1k_requests": round(usd, 5), "basis": f"${usd_per_hour}/h at "
                f"{summary['requests_per_second']} req/s"}
    return {"usd_per_1k_requests": None, "basis": "no price configured"}
