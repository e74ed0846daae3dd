"""Recipe variants at the CPU demo's training budget, trained and scored side by side (issue #13).

Each variant is the recipe plus `--set`-style overrides (and, optionally, the share of published rows among
its training rows), trained with Slipway's own worker (`tasks.train.worker.train`) and scored with Slipway's
own metrics on the same rows for every variant: the recipe's test split and its eval files (the hand-written
prompts). On a GPU a variant takes about a minute, so a sweep answers in one device call what the 2-core CPU
answers in 13 minutes a variant; `recipes/calibration/` keeps the figures that decided the CPU recipe.

    python bench/quality_sweep.py --recipe slipstream --variants bench/sweeps/slipstream-s8.yaml \
        --seeds 1,2 --jobs 4 --base <HF folder of the base model> --out /tmp/sweep.json

The variants file maps a name to {set: {field: value}, published_share: 0..1, seeds: [..] (default --seeds)}. Only `training.*`, `lora.*`,
`data.train_rows`, `model.dtype` and `model.system_prompt` may change: every variant is scored on the same test split,
made once (a variant's system prompt replaces the recipe's in its copy of every row, as training and evaluation see it).
Prints one line per finished job, then a table of the means over seeds (anchor and recipient accuracy on
the test split, its template and published rows, and the eval files).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.run import RunFolder, atomic_write_json, atomic_write_jsonl, read_json, read_jsonl  # noqa: E402

PUBLISHED = "slipstream-tqt"   # prefix of the published rows' `source`; template rows are "templates"
ALLOWED = ("training.", "lora.", "data.train_rows", "model.dtype", "model.system_prompt")


def variant_recipe(recipe_path: Path, overrides: dict, seed: int):
    from tasks.recipe import load_recipe

    bad = [k for k in overrides if not k.startswith(ALLOWED)]
    if bad:
        raise SystemExit(f"{', '.join(bad)}: a variant may only change {', '.join(ALLOWED)} (one shared test split)")
    return load_recipe(recipe_path, {**overrides, "training.seed": seed})


def with_system_prompt(rows: list[dict], system_prompt: str | None) -> list[dict]:
    """The rows with their system message saying `system_prompt`, as tasks.data.evalfile.to_chat_row renders one
    (none for an empty prompt); None: the rows as they are."""
    if system_prompt is None:
        return rows
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [{**row, "messages": system + [m for m in row["messages"] if m["role"] != "system"]} for row in rows]


def pick_train_rows(rows: list[dict], n: int, published_share: float | None, seed: int) -> list[dict]:
    """The first `n` training rows, or `n` rows of which `published_share` are published rows (split order kept)."""
    if published_share is None:
        return rows[:n]
    published = [r for r in rows if not r.get("source", "").startswith("templates")]
    templates = [r for r in rows if r.get("source", "").startswith("templates")]
    k = round(n * published_share)
    if k > len(published) or n - k > len(templates):
        raise SystemExit(f"published_share {published_share}: {k} published / {n - k} template rows wanted, "
                         f"{len(published)} / {len(templates)} available")
    chosen = published[:k] + templates[:n - k]
    random.Random(seed).shuffle(chosen)
    return chosen


def score(run: RunFolder, base: Path, split: str, batch_size: int, max_new_tokens: int) -> dict:
    """Greedy generation with the merged adapter on one row file of the run; per-row records kept."""
    from tasks.eval.measure import run_and_score
    from tasks.eval.runners import HFRunner

    rows = read_jsonl(run.split(split))
    runner = HFRunner(base, split, max_new_tokens, batch_size, adapter_dir=run.lora_dir)
    model, tokenizer, device = runner.load()
    runner._loaded = (model.merge_and_unload(), tokenizer, device)   # one matmul a layer, as deployed
    summary, records = run_and_score(runner, rows, run.name)
    atomic_write_jsonl(run.predictions(split), records)
    by_source: dict[str, list[float]] = {}
    for row, rec in zip(rows, records):
        source = "published" if row.get("source", "").startswith(PUBLISHED) else (
            "templates" if row.get("source") else "file")
        by_source.setdefault(source, []).append(rec["anchor_accuracy"])
    return {"parse": summary["strict_parse"], "anchor": summary["anchor_accuracy"],
            "recipient": summary.get("dst_accuracy"),
            **{f"anchor_{k}": round(statistics.mean(v), 4) for k, v in by_source.items()}}


def job(run_dir: Path, base: Path) -> int:
    """One variant and seed: train (Slipway's worker), then score every row file but train/val."""
    from tasks.recipe import Recipe
    from tasks.train.engines import import_engine

    run = RunFolder(run_dir)
    recipe = Recipe.model_validate_json(run.recipe_json.read_text())
    import_engine(recipe.training.engine)
    from tasks.train.worker import train

    stats = train(recipe, run_dir, base)
    result = {"train_s": stats["seconds"], "steps": stats["steps"], "final_loss": stats["final_loss"],
              "eval_loss": stats["eval_loss"], "tokens": stats["tokens_seen"]}
    for split in read_json(run_dir / "splits.json"):
        result[split] = score(run, base, split, recipe.eval.batch_size, recipe.eval.max_new_tokens)
    atomic_write_json(run_dir / "result.json", result)
    return 0


def prepare(recipe_path: Path, work: Path) -> dict[str, list[dict]]:
    """The recipe's splits, made once, with every training row (variants take their own number)."""
    from tasks.data.evalfile import load_eval_file, to_chat_row
    from tasks.data.prepare import prepare_splits
    from tasks.recipe import load_recipe, repo_path

    recipe = load_recipe(recipe_path, {"data.train_rows": 0})
    prepared = prepare_splits.fn(recipe.data, recipe.model.system_prompt or "", recipe.task)
    rows = dict(prepared["rows"])
    for f in recipe.data.eval_files:
        rows[Path(f).stem] = [to_chat_row(r, recipe.model.system_prompt or "")
                              for r in load_eval_file(repo_path(f), recipe.task)]
    atomic_write_json(work / "splits-stats.json", {k: len(v) for k, v in rows.items()})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="slipstream")
    ap.add_argument("--variants", type=Path)
    ap.add_argument("--only", help="comma-separated variant names to run (default: all)")
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--base", type=Path, help="HF folder of the base model (default: the recipe's, bootstrapped)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/quality-sweep"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--budget", type=float, default=0, help="start no job after this many seconds (0: no limit)")
    ap.add_argument("--eval-rows", type=int, default=0, help="score only the first N rows of each file (smoke test)")
    ap.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.job:
        return job(args.job, args.base)

    recipe_path = REPO / "recipes" / f"{args.recipe}.yaml" if not args.recipe.endswith(".yaml") else Path(args.recipe)
    variants = yaml.safe_load(args.variants.read_text()) if args.variants else {"recipe": {}}
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only.split(",")}
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.base is None:
        from tasks.models.bootstrap import resolve_base_model
        from tasks.recipe import load_recipe
        args.base = resolve_base_model(load_recipe(recipe_path).model)
    args.work.mkdir(parents=True, exist_ok=True)
    began = time.time()
    rows = prepare(recipe_path, args.work)
    print(f"[sweep] splits: {json.dumps({k: len(v) for k, v in rows.items()})} ({time.time() - began:.0f}s)", flush=True)

    runs = []
    for name, spec in variants.items():
        spec = spec or {}
        for seed in spec.get("seeds", seeds):
            recipe = variant_recipe(recipe_path, spec.get("set", {}), seed)
            run_dir = args.work / f"{name}-s{seed}"
            run = RunFolder(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            run.recipe_json.write_text(recipe.model_dump_json(indent=2))
            train = pick_train_rows(rows["train"], recipe.data.train_rows or len(rows["train"]),
                                    spec.get("published_share"), seed)
            system = spec.get("set", {}).get("model.system_prompt")
            atomic_write_jsonl(run.split("train"), with_system_prompt(train, system))
            scored = [s for s in rows if s not in ("train",)]
            for split in scored:
                atomic_write_jsonl(run.split(split), with_system_prompt(rows[split][:args.eval_rows or None], system))
            atomic_write_json(run_dir / "splits.json", [s for s in scored if s != "val"])
            runs.append((name, seed, run_dir, len(train)))

    def launch(item):
        name, seed, run_dir, n = item
        if args.budget and time.time() - began > args.budget:
            return name, seed, None, "skipped (budget)"
        t0 = time.time()
        with open(run_dir / "job.log", "w") as log:
            rc = subprocess.run([sys.executable, __file__, "--job", str(run_dir), "--base", str(args.base)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ}).returncode
        result = read_json(run_dir / "result.json", missing_ok=True) if rc == 0 else None
        if result:
            result["train_rows"] = n
        line = (f"{name} s{seed}: {json.dumps(result)}" if result else
                f"{name} s{seed}: FAILED rc={rc}: " + " | ".join((run_dir / 'job.log').read_text().splitlines()[-5:]))
        print(f"[sweep +{time.time() - began:.0f}s, {time.time() - t0:.0f}s] {line}", flush=True)
        return name, seed, result, None

    with cf.ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(launch, runs))
    results = [{"variant": n, "seed": s, "spec": variants[n], **(r or {}), **({"error": e} if e else {})}
               for n, s, r, e in done]
    if args.out:
        atomic_write_json(args.out, results)
    print_table(results)
    return 0


def print_table(results: list[dict]) -> None:
    splits = sorted({k for r in results for k, v in r.items() if isinstance(v, dict) and "anchor" in v})
    head = ["variant", "n", "rows", "steps", "val loss"] + [f"{s} {m}" for s in splits for m in ("anchor", "recip.")] + [
        "test tmpl / pub"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name in dict.fromkeys(r["variant"] for r in results):
        ok = [r for r in results if r["variant"] == name and "steps" in r]
        if not ok:
            print(f"| {name} | 0 | failed |")
            continue

        def mean(get):
            vals = [v for v in (get(r) for r in ok) if v is not None]
            return statistics.mean(vals) if vals else None

        def pct(v):
            return "-" if v is None else f"{100 * v:.1f}"
        cells = [name, str(len(ok)), str(ok[0]["train_rows"]), str(ok[0]["steps"]),
                 f"{mean(lambda r: r['eval_loss']):.3f}" if mean(lambda r: r['eval_loss']) else "-"]
        for s in splits:
            cells += [pct(mean(lambda r: r[s]["anchor"])), pct(mean(lambda r: r[s]["recipient"]))]
        cells.append(f"{pct(mean(lambda r: r['test'].get('anchor_templates')))} / "
                     f"{pct(mean(lambda r: r['test'].get('anchor_published')))}")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
