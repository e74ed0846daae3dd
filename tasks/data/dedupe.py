"""Duplicate, near-duplicate and contamination removal over normalised prompts, with a report of why.

* exact duplicate: the same prompt after tasks.data.rows.normalise (case and whitespace); the first is kept.
* near duplicate: word-set Jaccard similarity >= a threshold (0.9 by default) with an earlier kept
  prompt. Found exactly, not by sampling: an inverted index over each set's *prefix* (its rarest words),
  because two sets with Jaccard >= t must share a word among the first |x| - ceil(t*|x|) + 1 words of
  each in one global order (the AllPairs prefix filter). 10k prompts take well under a second.
* contamination: a training prompt that equals or nearly equals an evaluation prompt (the test and val
  splits, user-supplied eval files, keyword-verify prompts). Those rows leave the training data.

Each function returns the kept rows and a report dict: counts, and up to five examples per reason.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Sequence

from tasks.data.formats import FormatError, detect_format, read_record
from tasks.data.rows import Example, normalise, read_json_lines

NEAR_DUPLICATE_JACCARD = 0.9
_EXAMPLES_KEPT = 5
_EPS = 1e-9


def word_set(text: str) -> frozenset[str]:
    """The words of a normalised text (punctuation dropped): what near-duplicate similarity compares."""
    return frozenset(re.findall(r"\w+", normalise(text)))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class NearIndex:
    """Exact Jaccard >= threshold search with prefix filtering; `rank` fixes the global word order."""

    def __init__(self, threshold: float, rank: dict[str, int]):
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold, self.rank = threshold, rank
        self.sets: list[frozenset[str]] = []
        self.labels: list[object] = []
        self.postings: dict[str, list[int]] = defaultdict(list)

    def _prefix(self, words: frozenset[str]) -> list[str]:
        # Rare words first: they make short posting lists. Words the rank never saw sort first (rank -1).
        ordered = sorted(words, key=lambda w: (self.rank.get(w, -1), w))
        return ordered[:len(words) - math.ceil(self.threshold * len(words) - _EPS) + 1]

    def add(self, words: frozenset[str], label: object) -> None:
        self.sets.append(words)
        self.labels.append(label)
        for w in self._prefix(words):
            self.postings[w].append(len(self.sets) - 1)

    def best_match(self, words: frozenset[str]) -> tuple[object, float] | None:
        """The most similar indexed set with Jaccard >= threshold, as (label, similarity), or None."""
        if not words:
            return None
        lo, hi = self.threshold * len(words) - _EPS, len(words) / self.threshold + _EPS
        best = None
        for i in {i for w in self._prefix(words) for i in self.postings.get(w, ())}:
            if lo <= len(self.sets[i]) <= hi:
                sim = jaccard(words, self.sets[i])
                if sim >= self.threshold - _EPS and (best is None or sim > best[1]):
                    best = (self.labels[i], sim)
        return best


def word_rank(texts: Iterable[frozenset[str]]) -> dict[str, int]:
    """The global word order of a NearIndex: rarest first (short posting lists), ties by the word."""
    counts = Counter(w for words in texts for w in words)
    return {w: i for i, (w, _) in enumerate(sorted(counts.items(), key=lambda kv: (kv[1], kv[0])))}


def _clip(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def remove_duplicates(examples: Sequence[Example], threshold: float = NEAR_DUPLICATE_JACCARD
                      ) -> tuple[list[Example], dict]:
    """Drop exact and near-duplicate prompts, keeping the first of each group (source order)."""
    words = [word_set(ex.prompt) for ex in examples]
    index = NearIndex(threshold, word_rank(words))
    first: dict[str, Example] = {}
    kept, exact, near, conflicting = [], [], [], 0
    for ex, ws in zip(examples, words):
        key = normalise(ex.prompt)
        if key in first:
            conflicting += normalise(first[key].answer) != normalise(ex.answer)
            exact.append({"line": ex.line, "duplicate_of_line": first[key].line, "prompt": _clip(ex.prompt)})
            continue
        match = index.best_match(ws)
        if match:
            other, sim = match
            near.append({"line": ex.line, "near_line": other.line, "jaccard": round(sim, 3),
                         "prompt": _clip(ex.prompt), "near_prompt": _clip(other.prompt)})
            continue
        first[key] = ex
        index.add(ws, ex)
        kept.append(ex)
    report = {"threshold": threshold,
              "exact_duplicates": {"removed": len(exact), "with_a_different_answer": conflicting,
                                   "examples": exact[:_EXAMPLES_KEPT]},
              "near_duplicates": {"removed": len(near), "examples": near[:_EXAMPLES_KEPT]}}
    return kept, report


def remove_contaminated(examples: Sequence[Example], eval_prompts: dict[str, Sequence[str]],
                        threshold: float = NEAR_DUPLICATE_JACCARD) -> tuple[list[Example], dict]:
    """Drop training rows whose prompt equals or nearly equals any evaluation prompt.

    Args:
        examples: the training rows.
        eval_prompts: source name (e.g. "test split", a file path) -> its prompts.
        threshold: Jaccard similarity from which a prompt counts as the same question.
    """
    all_eval = [(source, p) for source, prompts in eval_prompts.items() for p in prompts]
    eval_words = [word_set(p) for _, p in all_eval]
    index = NearIndex(threshold, word_rank(eval_words + [word_set(ex.prompt) for ex in examples]))
    exact = {}
    for (source, prompt), ws in zip(all_eval, eval_words):
        exact.setdefault(normalise(prompt), (source, prompt))
        index.add(ws, (source, prompt))
    kept, hits = [], []
    by_source: Counter = Counter()
    for ex in examples:
        match = (exact[normalise(ex.prompt)], 1.0) if normalise(ex.prompt) in exact else \
            index.best_match(word_set(ex.prompt))
        if match is None:
            kept.append(ex)
            continue
        (source, prompt), sim = match
        by_source[source] += 1
        hits.append({"line": ex.line, "source": source, "jaccard": round(sim, 3),
                     "prompt": _clip(ex.prompt), "eval_prompt": _clip(prompt)})
    return kept, {"threshold": threshold, "checked_against": {s: len(p) for s, p in eval_prompts.items()},
                  "removed": len(hits), "by_source": dict(by_source), "examples": hits[:_EXAMPLES_KEPT]}


def merge_contamination(*reports: dict) -> dict:
    """One report for several remove_contaminated passes (e.g. eval files before the split, held-out
    splits after it)."""
    by_source: Counter = Counter()
    for r in reports:
        by_source.update(r["by_source"])
    return {"threshold": reports[0]["threshold"],
            "checked_against": {s: n for r in reports for s, n in r["checked_against"].items()},
            "removed": sum(r["removed"] for r in reports), "by_source": dict(by_source),
            "examples": [e for r in reports for e in r["examples"]][:_EXAMPLES_KEPT]}


def eval_prompts_from_file(path: Path) -> list[str]:
    """The prompts of an evaluation JSONL: a `prompt` field (keyword-verify files, Together
    prompt/completion) or the last user turn of any chat format tasks.data.formats reads.

    Raises:
        tasks.data.formats.FormatError: '<file>:<line>: <rule>' for a row with no recognisable prompt.
    """
    prompts = []
    for _, obj, where in read_json_lines(path, FormatError):
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            prompts.append(obj["prompt"])
            continue
        users = [m.content for m in read_record(obj, detect_format(obj, where), where).messages
                 if m.role == "user"]
        if not users:
            raise FormatError(f"{where}: eval.prompt: the row has no user turn to compare")
        prompts.append(users[-1])
    return prompts
