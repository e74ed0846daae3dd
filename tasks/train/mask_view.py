"""Show one prepared training row exactly as training tokenizes it, with the tokens the loss sees marked.

Run it:
    python -m tasks.train.mask_view --recipe slipstream [--row N] [--split train] [--template qwen2.5]
"""

from __future__ import annotations

import argparse
import sys

from tasks.data.prepare import prepare_splits
from tasks.models.bootstrap import resolve_base_model
from tasks.models.chat_templates import NAMED_TEMPLATES, template_fingerprint
from tasks.recipe import load_recipe
from tasks.run import SPLITS
from tasks.train.worker import prepare_tokenizer, tokenize_row


def highlight_mask(tokenizer, input_ids: list[int], mask: list[int], color: bool) -> str:
    """The decoded row with trained-on spans in bold green (color) or wrapped in [[...]] (plain)."""
    out, start = [], 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or mask[i] != mask[start]:
            text = tokenizer.decode(input_ids[start:i], skip_special_tokens=False)
            if mask[start]:
                text = f"\x1b[1;32m{text}\x1b[0m" if color else f"[[{text}]]"
            out.append(text)
            start = i
    return "".join(out)


def show_row(recipe_name: str, row: int, split: str, template: str | None, color: bool) -> str:
    """One prepared row of a recipe, rendered and tokenized exactly as training sees it, mask highlighted.

    Raises:
        IndexError: `row` is not a row of the split.
    """
    from transformers import AutoTokenizer

    recipe = load_recipe(recipe_name)
    rows = prepare_splits.fn(recipe.data, recipe.model.system_prompt, recipe.task)["rows"][split]
    if not 0 <= row < len(rows):
        raise IndexError(f"--row {row}: the {split} split has rows 0..{len(rows) - 1}")
    model = recipe.model.model_copy(update={"chat_template": template}) if template else recipe.model
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(resolve_base_model(recipe.model)), model)
    tok = tokenize_row(rows[row], tokenizer, recipe.training.max_length)
    trained = sum(tok["completion_mask"])
    header = (f"# recipe {recipe.name}, {split} row {row}, template {model.chat_template} "
              f"({template_fingerprint(tokenizer)}): {len(tok['input_ids'])} tokens, {trained} trained on "
              f"({'highlighted' if color else 'inside [[...]]'})")
    return header + "\n" + highlight_mask(tokenizer, tok["input_ids"], tok["completion_mask"], color)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print one training row with the trained-on tokens highlighted.")
    parser.add_argument("--recipe", default="slipstream")
    parser.add_argument("--row", type=int, default=0, help="row index in the split")
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--template", choices=["model", *NAMED_TEMPLATES],
                        help="override the recipe's model.chat_template")
    args = parser.parse_args(argv)
    try:
        print(show_row(args.recipe, args.row, args.split, args.template, color=sys.stdout.isatty()))
    except (IndexError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
