"""How far from its teacher does a conversion start, for each weight of its linear branch at init?

On the recall probe (scripts/probe_recall.py) a window's state learned far more when its branch started at weight
1.0 than at the library's 0.1. A converted pretrained model pays for a heavy branch at init: its untrained state
adds to what the window already gets right. This probe converts the model by a recipe's `attention:` settings
with `window_mix_init` set to each weight asked, untrained, and prints its perplexity next to the teacher's.

    python scripts/probe_branch_init.py --recipe recipes/long-context/transform-8k-sinks-deltanet.yaml \
        --mix 0.03,0.1,0.3,1.0 [--text pydoc] [--windows 512,2048] [--max-windows 4] [--json out.json [--overwrite]]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import dijiang  # noqa: E402
from dijiang.arguments import Number, non_empty_int_list, positive_float, positive_int  # noqa: E402
from dijiang.evaluate import load_text, perplexity  # noqa: E402
from dijiang.files import refuse_to_replace, write_text_atomic  # noqa: E402
from dijiang.tables import markdown_table  # noqa: E402
from dijiang.train_config import load_recipe  # noqa: E402


def branch_settings(recipe: dict, weight: float) -> dict:
    """The recipe's layer settings with the branch's weight at init; `checkpoint` only matters in training."""
    settings = {k: v for k, v in recipe.get("attention", {}).items() if k != "checkpoint"}
    if not settings.get("window"):
        raise ValueError("the recipe's layers have no softmax window, so no branch weight to set")
    return settings | {"window_mix_init": weight}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, required=True, help="a recipe with window layers (its attention:)")
    parser.add_argument("--mix", type=non_empty_int_list(positive_float), default=[0.1, 1.0],
                        help="branch weights at init, each > 0 (a softplus; the list parser takes any Number)")
    parser.add_argument("--model", help="default: the recipe's model")
    parser.add_argument("--text", default="pydoc")
    parser.add_argument("--windows", type=non_empty_int_list(Number(int, 2)), default=[512, 2048],
                        help="evaluation windows")
    parser.add_argument("--max-windows", type=positive_int, default=4, help="windows scored a length (from the start)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--overwrite", action="store_true", help="replace --json when it exists")
    args = parser.parse_args(argv)
    if args.json:
        try:
            refuse_to_replace(args.json, args.overwrite, "--json")
        except ValueError as error:
            parser.error(str(error))
    recipe = load_recipe(args.recipe)
    try:
        settings = {w: branch_settings(recipe, w) for w in args.mix}
    except ValueError as error:
        parser.error(f"{args.recipe}: {error}")
    teacher, tokenizer = dijiang.load_pretrained(args.model or recipe.get("model", "smollm2"), device=args.device)
    teacher.eval()
    text = load_text(args.text)

    def scores(model) -> dict:
        return {str(w): perplexity(model, tokenizer, text, window=w, max_windows=args.max_windows,
                                   batch_size=1).perplexity for w in args.windows}

    rows = [{"model": "teacher", "weight": "-", **scores(teacher)}]
    for weight, layer_settings in settings.items():
        student = dijiang.convert(copy.deepcopy(teacher), layer_settings).eval()
        rows.append({"model": f"{args.recipe.stem}, untrained", "weight": weight, **scores(student)})
        del student
    print(markdown_table(rows, ["model", "weight", *((str(w), f"ppl at {w}") for w in args.windows)]))
    if args.json:
        write_text_atomic(args.json, json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                                 "text": args.text, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
