"""Benchmark: evaluation time of a run's GGUF through llama-server at several `deploy.parallel` slot counts.

    python bench/eval_parallel.py --run runs/slipstream-<time>                 # merged f16, test split, 2/4/8 slots
    python bench/eval_parallel.py --run RUN --gguf model-q8_0 --rows 60 --parallel 2,4

A 135M model's decode step on a CPU reads every weight once whatever the batch (270 MB in f16), so more slots decode
more answers for nearly the same step; this measures how much of that the demo's evaluation gets. Each slot count
starts the same GGUF through Slipway's own path (tasks.eval.runners.llama_cpp_runner: the run's answer grammar,
greedy, the recipe's max_new_tokens) and scores the same rows (tasks.eval.measure.run_and_score). Prints, per slot
count: wall seconds, seconds a row, the ratio to the first count, strict parse, anchor accuracy, and how many answers
differ from the first count's (batched decoding may round differently). Not a test: run it with nothing else on the
machine.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished run folder (its GGUFs, test split, recipe)")
    ap.add_argument("--gguf", default="f16", help="the run GGUF to serve: f16 (merged), q8_0, q4_k_m")
    ap.add_argument("--rows", type=int, default=60)
    ap.add_argument("--parallel", default="2,4,8")
    args = ap.parse_args(argv)

    from tasks.eval.measure import run_and_score
    from tasks.eval.runners import llama_cpp_runner
    from tasks.llamacpp.serve import answer_grammar
    from tasks.recipe import Recipe
    from tasks.run import RunFolder, read_jsonl
    from tasks.tasktypes import task_of

    run = RunFolder(args.run)
    recipe = Recipe.model_validate_json(run.recipe_json.read_text())
    rows = read_jsonl(run.split("test"))[:args.rows]
    grammar = answer_grammar(run, recipe.deploy, task_of(rows[0]).name)
    gguf = run.gguf(args.gguf)
    first: list[str] | None = None
    first_s = None
    print(f"{gguf.name}, {len(rows)} test rows, max_new_tokens {recipe.eval.max_new_tokens}, "
          f"grammar {'on' if grammar else 'off'}")
    print("| slots | wall s | s/row | vs first | parse | anchor | answers differing |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for parallel in (int(p) for p in args.parallel.split(",")):
            with llama_cpp_runner(gguf, Path(scratch) / f"server-{parallel}.log", "bench", recipe.eval.max_new_tokens,
                                  parallel=parallel, grammar_file=grammar) as runner:
                began = time.perf_counter()
                summary, records = run_and_score(runner, rows, "bench-eval-parallel")
                wall = time.perf_counter() - began
            answers = [r["answer"] for r in records]
            first = first or answers
            first_s = first_s or wall
            differ = sum(a != b for a, b in zip(answers, first))
            print(f"| {parallel} | {wall:.1f} | {wall / len(rows):.2f} | {wall / first_s:.2f}x | "
                  f"{summary['strict_parse']:.1%} | {summary['anchor_accuracy']:.1%} | {differ} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
