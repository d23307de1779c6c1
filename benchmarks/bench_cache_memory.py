"""Generation-cache memory of layer hybrids against the teacher's KV cache, measured after a prefill.

Each model is the teacher with some layers converted (untrained: a cache's size does not depend on the weights),
prefilled with T random tokens through its own cache (``DiJiangCache`` for converted models, transformers'
``DynamicCache`` for the teacher); the table gives the bytes the cache then holds (``dijiang.evaluate.cache_memory``,
as ``dijiang eval --cache-memory``: softmax keys and values plus DiJiang states and window buffers). Models are
built one at a time, so only one is in memory. Prints a table, writes its plot and JSON.

    python benchmarks/bench_cache_memory.py --contexts 1024,2048,4096,8192 --out docs/bench_data/cache_memory
    python benchmarks/bench_cache_memory.py --contexts 512,1024 \
      --recipe additive=recipes/long-context/transform-8k-sinks.yaml \
      --recipe deltanet=recipes/long-context/transform-8k-sinks-deltanet.yaml   # a recipe's layers, as converted
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import dijiang  # noqa: E402
from dijiang.evaluate import cache_memory  # noqa: E402
from dijiang.tables import markdown_table  # noqa: E402

# softmax layers each model keeps (docs/results.md: the retrieval heads' four; the sixteen the cut probe needs)
KEPT = {
    "all window": [],
    "layer hybrid, 4 softmax": [7, 18, 21, 23],
    "layer hybrid, 16 softmax": [4, 6, 7, 8, 12, 13, 14, 15, 16, 17, 18, 20, 21, 22, 23, 26],
}


def build(model_name: str, kept: list[int] | None, window: int, dtype: torch.dtype, recipe: Path | None = None):
    """The teacher (kept None), the teacher with every layer but `kept` converted to the window hybrid, or, with
    a recipe, converted as that recipe converts it (its `attention` settings, its `layers` if it names them)."""
    model, _ = dijiang.load_pretrained(model_name)
    model.to(dtype).eval()
    if recipe is not None:
        from dijiang.train_config import load_recipe

        settings = load_recipe(recipe)
        dijiang.convert(model, settings.get("attention") or {}, layers=settings.get("layers"))
    elif kept is not None:
        num_layers = model.config.num_hidden_layers
        if any(not 0 <= i < num_layers for i in kept):
            raise SystemExit(f"softmax layers {kept} do not all exist in a model of {num_layers} layers (--kept)")
        layers = [i for i in range(num_layers) if i not in kept]
        dijiang.convert(model, {"window": window}, layers=layers)
    return model


def plot(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["model"] for r in rows):
        points = [r for r in rows if r["model"] == name]
        ax.plot([r["context"] for r in points], [r["MiB"] for r in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("generation cache (MiB)")
    ax.set_title("cache after a prefill, SmolLM2-135M, batch 1", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--contexts", default="1024,2048,4096,8192")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--kept", action="append", metavar="NAME=I,J,...",
                        help="a model keeping softmax layers I, J, ... (repeatable; default: SmolLM2's three above; "
                        "NAME= with no layers converts every layer)")
    parser.add_argument("--recipe", action="append", metavar="NAME=PATH",
                        help="a model converted as the recipe at PATH converts it (repeatable; replaces the default "
                        "models, as --kept does)")
    parser.add_argument("--out", type=Path, help="folder for cache_memory.json and cache_memory.png")
    args = parser.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    for spec in (args.kept or []) + (args.recipe or []):
        if "=" not in spec:
            parser.error(f"--kept and --recipe take NAME=..., got {spec!r}")
    kept_sets = KEPT if not (args.kept or args.recipe) else {
        name: [int(i) for i in layers.split(",") if i] for name, layers in (k.split("=", 1) for k in args.kept or [])}
    recipes = {name: Path(path) for name, path in (r.split("=", 1) for r in args.recipe or [])}
    for name, path in recipes.items():
        if not path.is_file():
            parser.error(f"--recipe {name}={path}: no such file")
    dtype = getattr(torch, args.dtype)
    rows = []
    models = {"teacher": (None, None), **{n: (k, None) for n, k in kept_sets.items()},
              **{n: ([], path) for n, path in recipes.items()}}
    for name, (kept, recipe) in models.items():
        model = build(args.model, kept, args.window, dtype, recipe)
        for context in tqdm(contexts, desc=name, leave=False):
            measured = cache_memory({name: model}, [context], model.config.vocab_size)[0]
            rows.append({"model": name, "context": context, "MiB": measured["mib"]})
            tqdm.write(f"{name}, {context} tokens: {rows[-1]['MiB']:.2f} MiB")
        del model
    teacher = {r["context"]: r["MiB"] for r in rows if r["model"] == "teacher"}
    table = [{**r, "MiB": f"{r['MiB']:.2f}", "of teacher": f"{100 * r['MiB'] / teacher[r['context']]:.1f} %"}
             for r in rows]
    print(markdown_table(table, ["model", "context", "MiB", "of teacher"]))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cache_memory.json").write_text(json.dumps(
            {"model": args.model, "dtype": args.dtype, "window": args.window, "kept": kept_sets,
             "recipes": {n: str(p) for n, p in recipes.items()}, "rows": rows}, indent=1) + "\n")
        print(plot(rows, args.out / "cache_memory.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
