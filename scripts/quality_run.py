"""The quality run: convert SmolLM2-135M, fine-tune within a token budget, evaluate against the teacher.

One job per invocation (so several can share one GPU as separate processes), then a report:

    python scripts/quality_run.py --job hybrid --model MODEL --corpus .corpus --runs runs/quality
    python scripts/quality_run.py --report runs/quality          # -> docs/results_512.md, docs/results_*.png
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
class KeepSoftmax(tuple):
    """A job's layer choice: these layers keep softmax attention, every other one is converted (the layer count is
    read from the model's config when the job is built)."""


def num_layers(model: str) -> int:
    """num_hidden_layers of a model name as `dijiang.load_pretrained` takes it (embedded, .gguf, directory, hub)."""
    from transformers import AutoConfig

    from dijiang.loading import EMBEDDED_MODELS, embedded_gguf

    path = Path(model).expanduser()
    if model in EMBEDDED_MODELS:
        folder, gguf = embedded_gguf(model)
        config = AutoConfig.from_pretrained(str(folder), gguf_file=gguf)
    elif path.suffix == ".gguf":
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        config = AutoConfig.from_pretrained(str(path) if path.exists() else model)
    return config.num_hidden_layers


def resolve_layers(name: str, layers, model: str):
    """The converted layer indices of job `name` for this model (None: all)."""
    if not isinstance(layers, KeepSoftmax):
        return layers
    count = num_layers(model)
    if any(not 0 <= i < count for i in layers):
        raise ValueError(f"job {name} keeps layers {list(layers)} as softmax, but {model} has {count} layers")
    return [i for i in range(count) if i not in layers]

JOBS = {
    "hybrid": ("window 64 + DiJiang, KD", {"window": 64}, None, "20M", {}),
    "hybrid-lp": ("window 64 + DiJiang, learned projection (init DCT x QMC), KD", {"window": 64, "learn_projection": True},
                  None, "3M", {}),
    "hybrid-w128": ("window 128 + DiJiang, KD", {"window": 128}, None, "3M", {}),
    "hybrid-w128-20m": ("the recipe: window 128 + DiJiang, KD (recipes/window128-1k-blocks.yaml)", {"window": 128}, None,
                        "20M", {"recipe": "recipes/window128-1k-blocks.yaml"}),
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
    "abl-hedgehog": ("ablation: hedgehog (learned softmax map, identity init, m = 2d)", {"feature_map": "hedgehog"},
                     None, "1M", {}),
    "abl-dijiang-2d": ("ablation: dijiang, m = 2d", {"num_features": 128}, None, "1M", {}),
    "abl-two-softmax": ("ablation: dijiang, layers 0 and 15 kept softmax", {}, KeepSoftmax((0, 15)), "1M", {}),
}
BASE_OPTIONS = dict(block_size=1024, batch_size=8, grad_accum=2, lr=1e-4, new_lr=1e-3, kd_weight=1.0, lm_weight=0.2,
                    warmup=0.05, eval_blocks=16, save_every=100, keep_checkpoints=1)


def corpus_parts(corpus: Path) -> list[str]:
    parts = sorted(str(p) for p in corpus.glob("part-*.jsonl*"))
    if not parts:
        raise FileNotFoundError(f"no part-*.jsonl[.xz] files in {corpus}: run scripts/build_corpus.py")
    return parts


def job_config(name: str, model: str, corpus: Path, runs: Path, tokens: str | None = None, resume: bool = False):
    """The TrainConfig of one job; a job tied to a recipe file takes that file's options."""
    from dijiang.train import TrainConfig, load_recipe, parse_token_count

    if name not in JOBS:
        raise ValueError(f"unknown job {name!r}; known: {', '.join(JOBS)}")
    description, settings, layers, budget, extra = JOBS[name]
    budget = tokens or budget
    tokens_per_step = BASE_OPTIONS["block_size"] * BASE_OPTIONS["batch_size"] * BASE_OPTIONS["grad_accum"]
    evals = 20 if parse_token_count(budget) >= 5_000_000 else 4  # short ablation runs: a few points suffice
    eval_every = max(1, parse_token_count(budget) // evals // tokens_per_step)
    paths = dict(model=model, out=str(runs / name), data=corpus_parts(corpus), eval_data=list(EVAL_TEXTS.values()),
                 resume=resume, progress=sys.stderr.isatty())
    if "recipe" in extra:  # the job is the recipe file itself, with this machine's paths
        recipe = load_recipe(ROOT / extra["recipe"])
        if settings != recipe.get("attention") or parse_token_count(JOBS[name][3]) != parse_token_count(str(recipe["tokens"])):
            raise ValueError(f"job {name} is out of step with {extra['recipe']}")
        return TrainConfig.from_dict({**recipe, **paths, "tokens": budget})
    return TrainConfig(tokens=budget, attention=settings, layers=resolve_layers(name, layers, model),
                       eval_every=eval_every, **paths, **{**BASE_OPTIONS, **extra})


def run_job(name: str, model: str, corpus: Path, runs: Path, tokens: str | None = None, resume: bool = False) -> dict:
    from dijiang.loading import load_pretrained
    from dijiang.evaluate import load_text, perplexity
    from dijiang.train import train

    description, settings, _, _, _ = JOBS[name]
    config = job_config(name, model, corpus, runs, tokens, resume)
    layers = config.layers
    out = Path(config.out)
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


def teacher_block_eval(model: str, runs: Path) -> dict:
    """The teacher's perplexity under the training loop's block eval, so the curves have a reference line."""
    from accelerate import Accelerator
    from dijiang.loading import load_pretrained
    from dijiang.train import evaluate_loss, load_eval_blocks

    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher, tokenizer = load_pretrained(model, device=device)
    accelerator = Accelerator(mixed_precision="bf16" if device == "cuda" else "no")
    result = {"protocol": f"first {BASE_OPTIONS['eval_blocks']} blocks of {BASE_OPTIONS['block_size']} tokens, "
                          f"as the training loop's eval (teacher on {device})"}
    for name, source in EVAL_TEXTS.items():
        blocks = load_eval_blocks(source, tokenizer, BASE_OPTIONS["block_size"], BASE_OPTIONS["eval_blocks"])
        result[name] = math.exp(evaluate_loss(teacher, blocks, BASE_OPTIONS["batch_size"], accelerator))
    runs.mkdir(parents=True, exist_ok=True)
    (runs / "teacher_block_eval.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
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


def curve_table(result: dict, teacher: dict | None = None, marks=(1e6, 5e6, 20e6)) -> str:
    teacher = teacher or {}
    cell = lambda r, text: f"{_curve_value(r, text):.2f}" + (  # noqa: E731
        f" ({_curve_value(r, text) / teacher[text]:.3f}x)" if text in teacher else "")
    rows = ["| tokens | pydoc ppl (block eval) | austen ppl (block eval) |", "|---|---|---|"]
    if teacher:
        rows.append(f"| teacher | {teacher['pydoc']:.2f} | {teacher['austen']:.2f} |")
    for mark in marks:
        near = [r for r in result["curve"] if r["tokens"] <= mark * 1.02]
        if near and mark <= result["tokens"] * 1.02:
            r = near[-1]
            rows.append(f"| {r['tokens'] / 1e6:.1f}M | {cell(r, 'pydoc')} | {cell(r, 'austen')} |")
    return "\n".join(rows)


def _curve_value(record: dict, text: str) -> float:
    return next(v for k, v in record.items() if k.startswith(f"eval_{text}") and k.endswith("_ppl"))


LONG_RUNS = ("hybrid-w128-20m", "hybrid", "pure-chi", "pure")  # the curves worth a plot (>= 5M tokens)


def plot_curves(results: dict[str, dict], path: Path, teacher: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, text in zip(axes, ("pydoc", "austen")):
        for name in LONG_RUNS:
            r = results.get(name)
            if not r or not r["curve"]:
                continue
            xs = [c["tokens"] / 1e6 for c in r["curve"]]
            ys = [_curve_value(c, text) for c in r["curve"]]
            ax.plot(xs, ys, marker=".", label=f"{name}: {r['description']}")
        if teacher and text in teacher:
            ax.axhline(teacher[text], color="k", lw=1, label="teacher (same blocks)")
            ax.axhline(teacher[text] * 1.10, color="k", ls="--", lw=1, label="1.10 x teacher")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel("perplexity (16 blocks of 1024 tokens)")
        ax.set_title(f"{text}: perplexity vs training tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ablation_names(results: dict[str, dict]) -> list[str]:
    """The ablation jobs, best (lowest pydoc ratio) first."""
    return sorted((name for name in results if name.startswith("abl-")),
                  key=lambda name: results[name]["final"]["pydoc"]["ratio"])


def reproduce_command(name: str) -> str:
    return f"python scripts/quality_run.py --job {name} --model smollm2 --corpus .corpus --runs runs/quality"


def plot_ablation(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ablation_names(results)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.4
    for offset, text in ((-width / 2, "pydoc"), (width / 2, "austen")):
        ax.bar([i + offset for i in range(len(names))], [results[n]["final"][text]["ratio"] for n in names],
               width, label=text)
    ax.set_xticks(range(len(names)), [n.removeprefix("abl-") for n in names], rotation=20)
    ax.set_ylabel("student / teacher perplexity")
    ax.set_title("pure DiJiang ablation after 1M training tokens (lower is better)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ablation_table(results: dict[str, dict]) -> str:
    lines = ["| row | feature map / variant | tokens | pydoc ratio | austen ratio | reproduce |", "|---|---|---|---|---|---|"]
    for name in ablation_names(results):
        r = results[name]
        lines.append(f"| {name} | {r['description'].removeprefix('ablation: ')} | {r['tokens'] / 1e6:.1f}M "
                     f"| {r['final']['pydoc']['ratio']:.2f} | {r['final']['austen']['ratio']:.2f} "
                     f"| `{reproduce_command(name)}` |")
    return "\n".join(lines)


def write_report(runs: Path, out_md: Path) -> str:
    results = load_results(runs)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    if not results:
        raise FileNotFoundError(f"no */result.json under {runs}")
    order = [n for n in LONG_RUNS if n in results] + sorted(n for n in results if n not in LONG_RUNS)
    results = {name: results[name] for name in order}
    teacher_file = runs / "teacher_block_eval.json"
    teacher = json.loads(teacher_file.read_text()) if teacher_file.exists() else None
    plot_curves(results, out_md.parent / "results_curves.png", teacher)
    devices = sorted({f"{r['device']}, torch {r['torch']}, {r['date']}" for r in results.values()})
    parts = [
        "# Quality at 512-token windows: SmolLM2-135M-Instruct converted by DiJiang",
        "**512-token windows only.** Every figure on this page is a perplexity over windows of 512 tokens, where "
        "a 128-token softmax window does most of the work: they say nothing about longer context. "
        "docs/results.md has the long-context evaluation (512 / 2048 / 8192, the branch ablation, passkey).",
        f"Device: {'; '.join(devices)}. Final perplexities: {FINAL_WINDOWS} windows of {FINAL_WINDOW} tokens (the "
        "calibration protocol of ANCHORS.md), teacher and student on the same windows. Training corpus: "
        "docs/corpus.md (no Python documentation, no Austen).",
        results_table(results),
        "![perplexity vs training tokens](results_curves.png)",
    ]
    for name in LONG_RUNS:
        if name in results:
            parts += [f"## {name}: perplexity against training tokens", curve_table(results[name], teacher)]
    if teacher:
        parts.append(f"Block eval: {teacher['protocol']}; the ratio in brackets is "
                     f"against the teacher on the same blocks. The final table above uses the {FINAL_WINDOWS} x "
                     f"{FINAL_WINDOW} protocol.")
    if ablation_names(results):
        plot_ablation(results, out_md.parent / "results_ablation.png")
        parts += ["## Ablation (the analogue of the paper's Table 2), pure DiJiang, KD, 1M tokens each",
                  ablation_table(results), "![ablation](results_ablation.png)"]
    notes = out_md.parent / "results_notes.md"
    if notes.exists():  # hand-written reading of the numbers, kept beside the generated table
        parts.append(notes.read_text().strip())
    parts.append("## Reproduce\n\n" + "\n".join(
        f"- `{reproduce_command(name)}`" for name in results)
        + "\n- `python scripts/quality_run.py --teacher-blocks --model smollm2 --runs runs/quality` (the teacher's "
          "line in the curves)"
        + "\n- `python scripts/quality_run.py --report runs/quality` (this page and its plots)"
        + "\n\nBuild the corpus first with `python scripts/build_corpus.py`. On the lent GPU: "
        "`bash scripts/gpu_quality.sh start`, then `status`, then `collect` (the script's header says what it "
        "expects; `STREAMS` picks the jobs). Raw logs of every job: `docs/quality_logs/`.")
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
    parser.add_argument("--report", type=Path, default=None, help="write docs/results_512.md from RUNS/*/result.json")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--teacher-blocks", action="store_true",
                        help="write RUNS/teacher_block_eval.json (the teacher under the curves' block eval)")
    args = parser.parse_args(argv)
    if args.list:
        for name, (description, settings, layers, budget, _) in JOBS.items():
            print(f"{name:18s} {budget:>4s}  {description}  {settings}")
        return 0
    if args.report:
        print(write_report(args.report, ROOT / "docs" / "results_512.md"))
        return 0
    if args.teacher_blocks:
        teacher_block_eval(args.model, args.runs)
        return 0
    if not args.job:
        parser.error("give --job, --report, --teacher-blocks or --list")
    if args.smoke:
        global FINAL_WINDOW, FINAL_WINDOWS
        FINAL_WINDOW, FINAL_WINDOWS = 128, 2
        BASE_OPTIONS.update(block_size=128, batch_size=2, eval_blocks=2, save_every=2)
    run_job(args.job, args.model, args.corpus, args.runs, args.tokens, args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
