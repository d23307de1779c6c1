"""The quality run: convert SmolLM2-135M, fine-tune within a token budget, evaluate against the teacher.

One job per invocation (so several can share one GPU as separate processes), then a report:

    python scripts/quality_run.py --job hybrid --model MODEL --corpus .corpus --runs runs/quality
    python scripts/quality_run.py --report runs/quality          # -> docs/results.md, docs/results_*.png
    python scripts/quality_run.py --list

MODEL is the embedded name (smollm2), a .gguf or a saved HF folder. Every job trains on the corpus built by
scripts/build_corpus.py (no Python documentation in it) and is evaluated on CPython's pydoc topics text and on
data/heldout/austen-pride-and-prejudice.txt, neither of which is in the corpus.
"""
from __future__ import annotations

import argparse
import os
import datetime
import json
import math
import platform
import statistics
import sys
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "data" / "heldout" / "austen-pride-and-prejudice.txt"
EVAL_TEXTS = {"pydoc": "pydoc", "austen": str(HELDOUT)}
FINAL_WINDOW, FINAL_WINDOWS = 512, 40  # the calibration run's held-out protocol (ANCHORS.md)

# name -> (description, DiJiang settings, converted layers or None, token budget, extra training options)
ALL_BUT = lambda *kept: [i for i in range(30) if i not in kept]  # noqa: E731  (SmolLM2 has 30 layers)
JOBS = {
    "hybrid": ("window 64 + DiJiang, KD", {"window": 64}, None, "20M", {}),
    "hybrid-lp": ("window 64 + DiJiang, learned projection (init DCT x QMC), KD", {"window": 64, "learn_projection": True},
                  None, "3M", {}),
    "hybrid-w128": ("window 128 + DiJiang, KD", {"window": 128}, None, "3M", {}),
    "hybrid-w128-20m": ("the recipe: window 128 + DiJiang, KD (recipes/smollm2-135m.yaml)", {"window": 128}, None,
                        "20M", {"recipe": "recipes/smollm2-135m.yaml"}),
    "hybrid-at": ("window 64 + DiJiang, 0.5M attention transfer then KD", {"window": 64}, None, "2.5M",
                  {"attention_transfer_tokens": "0.5M"}),
    "pure": ("pure DiJiang (paper setting), KD", {}, None, "5M", {}),
    "pure-chi": ("pure DiJiang with chi radii, KD", {"radius": "chi"}, None, "5M", {}),
    "abl-dijiang": ("ablation: dijiang (DCT + QMC + weights), m = d", {}, None, "1M", {}),
    "abl-dijiang-chi": ("ablation: dijiang with chi radii", {"radius": "chi"}, None, "1M", {}),
    "abl-official": ("ablation: official feature map", {"feature_map": "official"}, None, "1M", {}),
    "abl-pff": ("ablation: pff (QMC, orthogonal, no DCT/weights)", {"feature_map": "pff"}, None, "1M", {}),
    "abl-performer": ("ablation: performer (Monte Carlo)", {"feature_map": "performer"}, None, "1M", {}),
    "abl-elu": ("ablation: elu + 1", {"feature_map": "elu"}, None, "1M", {}),
    "abl-dijiang-2d": ("ablation: dijiang, m = 2d", {"num_features": 128}, None, "1M", {}),
    "abl-two-softmax": ("ablation: dijiang, layers 0 and 15 kept softmax", {}, ALL_BUT(0, 15), "1M", {}),
}
BASE_OPTIONS = dict(block_size=1024, batch_size=8, grad_accum=2, lr=1e-4, new_lr=1e-3, kd_weight=1.0, lm_weight=0.2,
                    warmup=0.05, eval_blocks=16, save_every=100, keep_checkpoints=1)


def corpus_parts(corpus: Path) -> list[str]:
    parts = sorted(str(p) for p in corpus.glob("part-*.jsonl*"))
    if not parts:
        raise FileNotFoundError(f"no part-*.jsonl[.xz] files in {corpus}: run scripts/build_corpus.py")
    return parts


def run_job(name: str, model: str, corpus: Path, runs: Path, tokens: str | None = None, resume: bool = False) -> dict:
    from dijiang.conversion import load_pretrained
    from dijiang.evaluate import load_text, perplexity
    from dijiang.train import TrainConfig, parse_token_count, train

    description, settings, layers, budget, extra = JOBS[name]
    budget = tokens or budget
    out = runs / name
    tokens_per_step = BASE_OPTIONS["block_size"] * BASE_OPTIONS["batch_size"] * BASE_OPTIONS["grad_accum"]
    evals = 20 if parse_token_count(budget) >= 5_000_000 else 4  # short ablation runs: a few points suffice
    eval_every = max(1, parse_token_count(budget) // evals // tokens_per_step)
    paths = dict(model=model, out=str(out), data=corpus_parts(corpus), eval_data=list(EVAL_TEXTS.values()),
                 resume=resume, progress=sys.stderr.isatty())
    if "recipe" in extra:  # the job is the recipe file itself, with this machine's paths
        from dijiang.train import load_recipe

        recipe = load_recipe(ROOT / extra["recipe"])
        if settings != recipe.get("attention") or parse_token_count(budget) != parse_token_count(str(recipe["tokens"])):
            raise ValueError(f"job {name} is out of step with {extra['recipe']}")
        config = TrainConfig.from_dict({**recipe, **paths, "tokens": budget})
    else:
        config = TrainConfig(tokens=budget, attention=settings, layers=layers, eval_every=eval_every,
                             **paths, **{**BASE_OPTIONS, **extra})
    summary = train(config)
    student = summary.pop("model")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher, tokenizer = load_pretrained(model, device=device)
    final = {}
    for text_name, source in EVAL_TEXTS.items():
        text = load_text(source)
        t = perplexity(teacher, tokenizer, text, window=FINAL_WINDOW, max_windows=FINAL_WINDOWS)
        s = perplexity(student.to(device), tokenizer, text, window=FINAL_WINDOW, max_windows=FINAL_WINDOWS)
        final[text_name] = {"teacher": t.perplexity, "student": s.perplexity, "ratio": s.perplexity / t.perplexity}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    result = {
        "job": name, "description": description, "settings": settings, "layers": layers, "tokens": summary["tokens"],
        "final": final, "curve": [r for r in log if any(k.startswith("eval_") for k in r)],
        "train_tokens_per_s": statistics.median(r["tokens_per_s"] for r in log[len(log) // 10:]),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "date": str(datetime.date.today()),
        "command": f"python scripts/quality_run.py --job {name} --model MODEL --corpus CORPUS --runs RUNS",
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("job", "tokens", "final", "train_tokens_per_s")}))
    return result


# ----------------------------------------------------------------------------------------------- report

def load_results(runs: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(runs.glob("*/result.json"))}


def results_table(results: dict[str, dict]) -> str:
    lines = ["| job | what | tokens | pydoc ppl (teacher) | ratio | austen ppl (teacher) | ratio | train tok/s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        p, a = r["final"]["pydoc"], r["final"]["austen"]
        lines.append(f"| {name} | {r['description']} | {r['tokens'] / 1e6:.1f}M | {p['student']:.2f} ({p['teacher']:.2f}) "
                     f"| {p['ratio']:.3f} | {a['student']:.2f} ({a['teacher']:.2f}) | {a['ratio']:.3f} "
                     f"| {r['train_tokens_per_s'] / 1e3:.1f}k |")
    return "\n".join(lines)


def curve_table(result: dict, marks=(1e6, 5e6, 20e6)) -> str:
    rows = ["| tokens | pydoc ppl (block eval) | austen ppl (block eval) |", "|---|---|---|"]
    for mark in marks:
        near = [r for r in result["curve"] if r["tokens"] <= mark * 1.02]
        if near and mark <= result["tokens"] * 1.02:
            r = near[-1]
            rows.append(f"| {r['tokens'] / 1e6:.1f}M | {_curve_value(r, 'pydoc'):.2f} | {_curve_value(r, 'austen'):.2f} |")
    return "\n".join(rows)


def _curve_value(record: dict, text: str) -> float:
    return next(v for k, v in record.items() if k.startswith(f"eval_{text}") and k.endswith("_ppl"))


def plot_curves(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, text in zip(axes, ("pydoc", "austen")):
        for name, r in results.items():
            if not r["curve"]:
                continue
            xs = [c["tokens"] / 1e6 for c in r["curve"]]
            ys = [_curve_value(c, text) for c in r["curve"]]
            ax.plot(xs, ys, marker=".", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel("perplexity (16 blocks of 1024 tokens)")
        ax.set_title(f"{text}: perplexity vs training tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(runs: Path, out_md: Path) -> str:
    results = load_results(runs)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    if not results:
        raise FileNotFoundError(f"no */result.json under {runs}")
    plot_curves(results, out_md.parent / "results_curves.png")
    any_result = next(iter(results.values()))
    parts = [
        "# Quality run: SmolLM2-135M-Instruct converted by DiJiang",
        f"Device: {any_result['device']}, torch {any_result['torch']}, {any_result['date']}. "
        f"Final perplexities: {FINAL_WINDOWS} windows of {FINAL_WINDOW} tokens (the calibration protocol of "
        "ANCHORS.md), teacher and student on the same windows.",
        results_table(results),
        "![perplexity vs training tokens](results_curves.png)",
    ]
    for name in ("hybrid-w128-20m", "hybrid", "pure-chi", "pure"):
        if name in results:
            parts += [f"## {name}: perplexity against training tokens", curve_table(results[name])]
    notes = out_md.parent / "results_notes.md"
    if notes.exists():  # hand-written reading of the numbers, kept beside the generated table
        parts.append(notes.read_text().strip())
    parts.append("## Reproduce\n\n" + "\n".join(f"- `{r['command']}`" for r in results.values())
                 + "\n\nOn the lent GPU: `bash scripts/gpu_quality.sh start`, then `status`, then `collect` "
                 "(the script's header says what it expects).")
    text = "\n\n".join(parts) + "\n"
    out_md.write_text(text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", choices=sorted(JOBS))
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--corpus", type=Path, default=ROOT / ".corpus")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "quality")
    parser.add_argument("--tokens", default=None, help="override the job's token budget")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the pipeline on a CPU")
    parser.add_argument("--report", type=Path, default=None, help="write docs/results.md from RUNS/*/result.json")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    if args.list:
        for name, (description, settings, layers, budget, _) in JOBS.items():
            print(f"{name:18s} {budget:>4s}  {description}  {settings}")
        return 0
    if args.report:
        print(write_report(args.report, ROOT / "docs" / "results.md"))
        return 0
    if not args.job:
        parser.error("give --job, --report or --list")
    if args.smoke:
        global FINAL_WINDOW, FINAL_WINDOWS
        FINAL_WINDOW, FINAL_WINDOWS = 128, 2
        BASE_OPTIONS.update(block_size=128, batch_size=2, eval_blocks=2, save_every=2)
    run_job(args.job, args.model, args.corpus, args.runs, args.tokens, args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
