"""Benchmark: a CPU training run under glibc's malloc and under mimalloc (training.allocator), side by side.

    python bench/allocator_step.py                  # the slipstream recipe, its first 600 rows (300 steps)
    python bench/allocator_step.py --rows 200 --also /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
    python bench/allocator_step.py --rows 400 --compile     # also mimalloc + training.compile_layers

Each variant trains the same rows with the recipe's own settings in its own worker process
(`python -m tasks.train.worker`, the command the flow runs), started with the environment
tasks.train.command.training_env gives it ('system' and 'auto'; `--also LIB` adds an LD_PRELOAD of another
allocator; `--compile` adds mimalloc with training.compile_layers, whose first steps compile). Prints the seconds a step over each window of the run (the drift glibc's malloc shows), the
training time, the peak resident memory of the process, the final loss, and each variant's time against
'system'. Not a test: timings are figures; compare variants of one run only, with nothing else running.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.run import RunFolder, atomic_write_jsonl, read_json  # noqa: E402

STEP_LINE = re.compile(r"^\[train\] step (\d+)/(\d+) .*elapsed=(\d+)s")


def prepare(recipe_path: Path, rows: int):
    """The recipe's splits once; its training rows capped at `rows`, no time budget, no checkpoints."""
    from tasks.data.prepare import prepare_splits
    from tasks.recipe import load_recipe

    recipe = load_recipe(recipe_path, {"data.train_rows": rows, "training.time_budget_s": None,
                                       "training.save_steps": 10**6, "training.logging_steps": 5})
    prepared = prepare_splits.fn(recipe.data, recipe.model.system_prompt or "", recipe.task)["rows"]
    return recipe, prepared["train"][:rows], prepared["val"]


def run_variant(name: str, env: dict, recipe, train, val, base: Path, work: Path) -> dict:
    from tasks.train.command import training_command

    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run = RunFolder(run_dir)
    run_dir.mkdir(parents=True)
    run.recipe_json.write_text(recipe.model_dump_json(indent=2))
    atomic_write_jsonl(run.split("train"), train)
    atomic_write_jsonl(run.split("val"), val)
    cmd = training_command(recipe, run_dir, base, gpus=0)
    began = time.time()
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)   # this child's own peak RSS
    if status != 0:
        raise SystemExit(f"{name}: the worker failed; see {work / f'{name}.log'}")
    stats = read_json(run.training_stats)
    marks = [(int(m[1]), int(m[3])) for m in map(STEP_LINE.match, (work / f"{name}.log").read_text().splitlines()) if m]
    return {"name": name, "wall_s": time.time() - began, "train_s": stats["seconds"], "steps": stats["steps"],
            "allocator": stats.get("allocator"), "final_loss": stats["final_loss"], "peak_rss_gib": usage.ru_maxrss / 2**20,
            "marks": marks}


def windows(marks: list[tuple[int, int]], size: int) -> list[float]:
    """Seconds a step over consecutive windows of `size` steps (from the progress lines' elapsed)."""
    points = [(0, 0)] + [m for m in marks if m[0] % size == 0]
    return [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(points, points[1:]) if s1 > s0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="slipstream")
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--window", type=int, default=50, help="steps per window of the per-window table")
    ap.add_argument("--also", action="append", default=[], help="another allocator library to LD_PRELOAD")
    ap.add_argument("--compile", action="store_true", help="also mimalloc with training.compile_layers")
    ap.add_argument("--base", type=Path, help="HF folder of the base model (default: the recipe's)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/allocator-step"))
    args = ap.parse_args(argv)

    from tasks.models.bootstrap import resolve_base_model
    from tasks.train.allocator import allocator_env

    recipe_path = REPO / "recipes" / f"{args.recipe}.yaml" if not args.recipe.endswith(".yaml") else Path(args.recipe)
    args.work.mkdir(parents=True, exist_ok=True)
    recipe, train, val = prepare(recipe_path, args.rows)
    base = args.base or resolve_base_model(recipe.model)
    variants = {"system": (allocator_env("system", on_cpu=True), recipe),
                "mimalloc": (allocator_env("auto", on_cpu=True), recipe)}
    for lib in args.also:
        variants[Path(lib).name.split(".so")[0]] = ({**os.environ, "LD_PRELOAD": lib}, recipe)
    if args.compile:
        compiled = recipe.model_copy(update={"training": recipe.training.model_copy(update={"compile_layers": True})})
        variants["mimalloc+compile"] = (allocator_env("auto", on_cpu=True), compiled)
    print(f"[allocator] {len(train)} rows, batch {recipe.training.batch_size}, "
          f"{os.cpu_count()} CPUs; variants: {', '.join(variants)}", flush=True)
    results = []
    for name, (env, variant_recipe) in variants.items():
        results.append(run_variant(name, env, variant_recipe, train, val, base, args.work))
        r = results[-1]
        print(f"[allocator] {name}: {r['train_s']:.1f} s of training ({r['steps']} steps), "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB, final loss {r['final_loss']:.4f}", flush=True)

    reference = results[0]["train_s"]
    print(f"\n| allocator | s/step per {args.window}-step window | training s | vs system | peak RSS GiB | final loss |")
    print("|---|---|---|---|---|---|")
    for r in results:
        per = " ".join(f"{w:.2f}" for w in windows(r["marks"], args.window))
        print(f"| {r['name']} ({r['allocator']}) | {per} | {r['train_s']:.1f} | {r['train_s'] / reference:.2f}x | "
              f"{r['peak_rss_gib']:.2f} | {r['final_loss']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
