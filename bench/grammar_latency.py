"""Benchmark: what deploy.constrain_output costs a llama-server request (Slipstream's TQT grammar).

    python bench/grammar_latency.py                          # the embedded SmolLM2 GGUF (untrained base)
    python bench/grammar_latency.py --gguf RUN/gguf/model-q8_0.gguf --rows 40   # a fine-tuned run's GGUF

Starts the same GGUF twice (once more each with --repeat 2, the order reversed) through Slipway's ManagedLlamaServer (one slot, the machine's threads), once
plain and once with `--grammar-file` (tasks.protocol.tqt_gbnf, the file a constrained run writes), and sends
each the same chat requests (the test split's prompts under the recipe's system prompt, greedy, the recipe's
max_new_tokens). Prints per mode: seconds per request (mean, p50, p95), completion tokens per request, ms
per completion token (the figure to compare: a constrained base model writes longer answers), and the share
of answers that parse strictly. Not a test: timings are figures; run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def prompts(rows: int) -> list[str]:
    """Test-split-like prompts: the first `rows` of the published dataset's instructions (never hand-written)."""
    from tasks.data.prepare import load_examples
    from tasks.recipe import DATA_DIR

    return [ex.prompt for ex in load_examples(DATA_DIR / "slipstream-tqt.jsonl")[:rows]]


def run_mode(gguf: Path, grammar: Path | None, texts: list[str], system: str, max_tokens: int, log: Path) -> dict:
    from openai import OpenAI

    from tasks.llamacpp.serve import ManagedLlamaServer
    from tasks.protocol import SlipParseError, parse_tqt

    seconds, tokens, parsed = [], [], 0
    with ManagedLlamaServer(gguf, log, parallel=1, grammar_file=grammar) as server:
        client = OpenAI(base_url=server.base_url, api_key="unused")
        client.chat.completions.create(model=server.alias, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        for text in texts:   # timed after one warm-up request (the first one pays for loading the weights)
            start = time.perf_counter()
            reply = client.chat.completions.create(
                model=server.alias, temperature=0, max_tokens=max_tokens,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": text}])
            seconds.append(time.perf_counter() - start)
            tokens.append(reply.usage.completion_tokens)
            try:
                parse_tqt(reply.choices[0].message.content or "")
                parsed += 1
            except SlipParseError:
                pass
    ordered = sorted(seconds)
    return {"requests": len(texts), "mean_s": statistics.mean(seconds), "p50_s": statistics.median(seconds),
            "p95_s": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "completion_tokens": statistics.mean(tokens),
            "ms_per_token": 1000 * sum(seconds) / max(1, sum(tokens)), "strict_parse": parsed / len(texts)}


def main() -> None:
    from tasks.models.bootstrap import embedded_gguf_path
    from tasks.protocol import tqt_gbnf
    from tasks.recipe import load_recipe

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF to serve (default: the embedded SmolLM2)")
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=2, help="passes per mode, alternating which goes first")
    args = parser.parse_args()
    recipe = load_recipe("slipstream")
    gguf = args.gguf or embedded_gguf_path()
    texts = prompts(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        grammar = Path(tmp) / "answer.gbnf"
        grammar.write_text(tqt_gbnf())
        modes = [("plain", None), ("constrained", grammar)]
        runs: dict[str, list[dict]] = {"plain": [], "constrained": []}
        for i in range(args.repeat):
            for mode, path in (modes if i % 2 == 0 else modes[::-1]):
                runs[mode].append(run_mode(gguf, path, texts, recipe.model.system_prompt, recipe.eval.max_new_tokens,
                                           Path(tmp) / f"{mode}.log"))
        results = {mode: min(rs, key=lambda r: r["mean_s"]) for mode, rs in runs.items()}   # the quieter pass
    print(f"{gguf.name}: {args.rows} requests each, 1 slot, greedy, max_tokens {recipe.eval.max_new_tokens}")
    print(f"{'mode':<12} {'mean s':>7} {'p50 s':>7} {'p95 s':>7} {'tok/req':>8} {'ms/tok':>7} {'parse':>6}")
    for mode, r in results.items():
        print(f"{mode:<12} {r['mean_s']:7.3f} {r['p50_s']:7.3f} {r['p95_s']:7.3f} {r['completion_tokens']:8.1f} "
              f"{r['ms_per_token']:7.1f} {r['strict_parse']:6.1%}")
    plain, constrained = results["plain"], results["constrained"]
    print(f"constrained / plain: {constrained['ms_per_token'] / plain['ms_per_token']:.2f}x per token, "
          f"{constrained['mean_s'] / plain['mean_s']:.2f}x per request")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
