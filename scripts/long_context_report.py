#!/usr/bin/env python3
"""Tables and plots of the long-context ablation from each run's `dijiang eval` JSON and training log.

Reads RUNS/JOB/eval.json (or RUNS/JOB/eval/eval.json, as the GPU driver leaves them) and RUNS/JOB/log.jsonl
(or log.jsonl.xz, as docs/bench_data keeps them: a tenth of the size, and every GPU call carries the tree) for
every recipe of recipes/long-context/, prints the markdown tables that docs/results.md shows and writes its plots.
Nothing is written into docs/ unless --out says so.

    python scripts/long_context_report.py docs/bench_data/long_context --out docs
"""
from __future__ import annotations

import argparse
import json
import lzma
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from dijiang.evaluate import markdown_table, passkey_past  # noqa: E402

WINDOWS = (512, 2048, 8192)
TEXTS = {"pydoc": "pydoc", "austen-pride-and-prejudice.txt": "Austen", "python-stdlib.txt": "code"}
ORDER = ("baseline", "chi-decay", "transform", "transform-mix1", "transform-8k", "transform-at", "transform-at-8k",
         "transform-8k-retrieval", "transform-8k-performer", "transform-8k-m128", "transform-8k-sinks",
         "transform-8k-10m", "transform-8k-sinks-20m", "transform-8k-sinks-lr3-20m", "transform-8k-sinks-w64",
         "transform-8k-sinks-performer", "transform-8k-sinks-gate", "transform-8k-sinks-at", "transform-8k-sinks-at-32m",
         "transform-8k-sinks-deltanet", "transform-8k-sinks-deltanet-at", "transform-8k-sinks-mix1",
         "transform-8k-sinks-deltanet-mix1", "transform-8k-sinks-mixlr", "transform-8k-sinks-deltanet-mixlr",
         "transform-8k-sinks-retrieval", "transform-8k-sinks-deltanet-retrieval",
         "layer-hybrid", "layer-hybrid-8k", "layer-hybrid-8k-retrieval", "layer-hybrid-8k-20m", "layer-hybrid-8k-sinks",
         "layer-hybrid-8k-sinks-20m", "layer-hybrid-8k-sinks-ppl", "layer-hybrid-8k-sinks-ppl-20m",
         "head-hybrid6-8k-sinks", "head-hybrid8-8k-sinks", "layer-hybrid8-8k",
         "layer-hybrid12-8k", "layer-hybrid16-8k", "layer-choice", "layer-choice-at", "pure",
         "pure-8k", "pure-gate-8k", "pure-lr3-8k", "pure-at-8k", "pure-hedgehog-at-8k",
         "pure-hedgehog-at-gate-lr3-8k", "pure-hedgehog-at-lr3-deltanet-8k", "pure-hedgehog-at-gate-lr3-8k-20m",
         "pure-hedgehog-at-gate-lr3-8k-40m",
         "map-dijiang-chi", "map-dijiang-normal", "map-performer", "map-pff", "map-hedgehog",
         "map-sinks-dijiang-chi", "map-sinks-dijiang-normal", "map-sinks-performer", "map-sinks-pff",
         "map-sinks-hedgehog")  # lever by lever
# every student's softmax keys (window, or window 124 + 4 sinks): needles farther back need the far context
SOFTMAX_WINDOW = 128


PURE_GOAL = 2.0  # the goal for pure linear attention: at most 2x the teacher's perplexity at every window


def is_map_run(job: str) -> bool:
    """The feature-map ablation (recipes/long-context/map-*.yaml: 2M tokens) gets its own table and plot."""
    return job.startswith("map-")


def is_pure_run(job: str) -> bool:
    """Pure DiJiang (no window, no softmax layer: 3-19x the teacher) gets plots of its own, so that the hybrids'
    differences stay readable in theirs."""
    return job == "pure" or job.startswith("pure-")


def _read_text(path: Path) -> str:
    return lzma.decompress(path.read_bytes()).decode() if path.suffix == ".xz" else path.read_text()


def load_runs(root: Path) -> dict[str, dict]:
    """{job: {"eval": ... or None, "log": [...]}} for every job folder under root that holds an eval.json or a
    training log (a run stopped before its evaluation still has a training curve)."""
    runs = {}
    rank = {job: i for i, job in enumerate(ORDER)}
    folders = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: (rank.get(p.name, len(ORDER)), p.name))
    for folder in folders:
        found = [f for f in (folder / "eval.json", folder / "eval" / "eval.json") if f.is_file()]
        logs = [f for f in (folder / "log.jsonl", folder / "log.jsonl.xz") if f.is_file()]
        if not found and not logs:
            continue
        records = [json.loads(line) for line in _read_text(logs[0]).splitlines() if line.strip()] if logs else []
        runs[folder.name] = {"eval": json.loads(found[0].read_text()) if found else None, "log": records}
    if not any(run["eval"] for run in runs.values()):
        raise SystemExit(f"no JOB/eval.json under {root}")
    return runs


def evaluated(runs: dict[str, dict]) -> dict[str, dict]:
    return {job: run for job, run in runs.items() if run["eval"] is not None}


def _row(rows: list[dict], text: str, window: int, model: str) -> dict | None:
    return next((r for r in rows if (r["text"], r["window"], r["model"]) == (text, window, model)), None)


def quality_table(runs: dict[str, dict], maps: bool = False) -> list[dict]:
    """One row per job: ratio to the teacher per text and window, the branch's worth at 8k, passkey.
    maps: the feature-map ablation's runs instead of the others."""
    table = []
    for job, run in evaluated(runs).items():
        if is_map_run(job) != maps:
            continue
        rows, row = run["eval"]["context"], {"run": job}
        for text, label in TEXTS.items():
            cells = [_row(rows, text, w, job) for w in WINDOWS]
            row[label] = " / ".join(f"{c['ratio']:.3f}" if c else "-" for c in cells)
            off = _row(rows, text, WINDOWS[-1], f"{job}, branch off")
            row[f"{label} off"] = f"{100 * off['branch_worth']:+.1f} %" if off else "-"
        row["passkey"] = passkey_cell(run["eval"].get("passkey", {}).get(job, []))
        row["past window"] = past_window_cell(run["eval"].get("passkey", {}).get(job, []))
        table.append(row)
    return table


def past_window_cell(rows: list[dict]) -> str:
    """'correct / trials' over the needles farther back than the softmax window, all lengths together
    ('-' for runs evaluated before passkey rows listed each needle's distance)."""
    correct, trials = passkey_past([r for r in rows if "needle_to_end" in r], SOFTMAX_WINDOW)
    return f"{correct} / {trials}" if trials else "-"


def retrieval_table(root: Path) -> list[dict]:
    """scripts/check_retrieval_data.py on facts no run trained on (seed 1): the teacher, then each
    *-retrieval run (in the training format; the passkey is the format they never saw)."""
    found = [("teacher", root / "retrieval_teacher.json")]
    found += [(f.parent.name, f) for f in sorted(root.glob("*/retrieval.json"))]
    table = []
    for model, path in found:
        if path.is_file():
            r = json.loads(path.read_text())
            table.append({"model": model, "exact": f"{r['exact']} / {r['questions']}",
                          "mean log p": f"{r['mean_logp']:.3f}"})
    return table


def passkey_cell(rows: list[dict]) -> str:
    """'1k 30 / 2k 0 ...': accuracy % at each context length (runs were evaluated at different lengths)."""
    def length(n: int) -> str:
        return f"{n // 1024}k" if n % 1024 == 0 else str(n)
    return " / ".join(f"{length(r['context'])} {100 * r['accuracy']:.0f}" for r in rows) or "-"


def teacher_table(runs: dict[str, dict]) -> list[dict]:
    # the teacher's passkey prompts depend on the lengths asked for (one seeded stream): take the widest run
    evaluation = max((run["eval"] for run in evaluated(runs).values()),
                     key=lambda e: len(e.get("passkey", {}).get("teacher", [])))
    row = {"model": "teacher"}
    for text, label in TEXTS.items():
        row[label] = " / ".join(f"{_row(evaluation['context'], text, w, 'teacher')['perplexity']:.2f}"
                                for w in WINDOWS)
    row["passkey"] = passkey_cell(evaluation["passkey"]["teacher"])
    return [row]


def gate_table(runs: dict[str, dict]) -> list[dict]:
    """Where the gates ended: the linear part's weight and each layer's slowest decay (last logged eval)."""
    table = []
    for job, run in runs.items():
        last = next((r for r in reversed(run["log"]) if "slowest_gamma_max" in r), None)
        if last is None:
            continue
        table.append({"run": job, "mix": (f"{last['mix_min']:.3f} / {last['mix_mean']:.3f} / {last['mix_max']:.3f}"
                                          if "mix_mean" in last else "-"),
                      "slowest": f"{last['slowest_gamma_min']:.5f} - {last['slowest_gamma_max']:.5f}",
                      "tokens": last["tokens"]})
    return table


def plot_context(runs: dict[str, dict], out: Path, maps: bool = False, pure: bool = False,
                 only: list[str] | None = None) -> Path:
    """dijiang eval's plot over the hybrid runs (maps: over the feature-map ablation's runs; pure: over the pure
    DiJiang runs): ratio to the teacher against the evaluation window, one panel per text, without the branch-off
    lines (the table has them); ``only``: these runs alone."""
    from dijiang.plots import plot_context as draw

    rows = [dict(r, text=TEXTS.get(r["text"], r["text"])) for job, run in evaluated(runs).items()
            if is_pure_run(job) == pure and is_map_run(job) == maps and (only is None or job in only)
            for r in run["eval"]["context"] if r["model"] in ("teacher", job)]
    # a map with sinks in the colour of the same map without them
    return draw(rows, out, family=(lambda job: job.replace("map-sinks-", "map-")) if maps else None,
                goal=PURE_GOAL if pure else None)


def plot_training(runs: dict[str, dict], out: Path, pure: bool = False, only: list[str] | None = None) -> Path:
    """Block-eval perplexity on pydoc, the mean linear weight and the slowest decay against training tokens, for
    the hybrid runs (pure: the pure DiJiang runs, which have no mix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dijiang.plots import palette, save_with_legend_below

    jobs = [job for job in runs if is_pure_run(job) == pure and not is_map_run(job) and (only is None or job in only)]
    colours = palette(jobs)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    # pure runs have no mix: their second panel is Austen's block-eval perplexity instead
    second = ("eval_austen-pride-and-prejudice.txt_ppl", "block-eval perplexity, Austen") if pure else (
        "mix_mean", "mean linear weight (mix)")
    for job in jobs:
        evals = [r for r in runs[job]["log"] if "eval_pydoc_ppl" in r]
        tokens = [r["tokens"] / 1e6 for r in evals]
        axes[0].plot(tokens, [r["eval_pydoc_ppl"] for r in evals], marker="o", color=colours[job], label=job)
        axes[1].plot(tokens, [r.get(second[0], float("nan")) for r in evals], marker="o", color=colours[job])
        axes[2].plot(tokens, [r["slowest_gamma_max"] for r in evals], marker="o", color=colours[job])
    titles = ("block-eval perplexity, pydoc (4 blocks of the run's size)", second[1],
              "slowest decay gamma (largest over layers)")
    for ax in axes[:2 if pure else 1]:
        low = min((y for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y)), default=1.0)
        # stage 1 of attention transfer starts far above: cut off (pure runs, 3-10x apart: a log scale)
        ax.set_ylim(0.9 * low, 3 * low) if pure else ax.set_ylim(0.95 * low, 1.6 * low)
        if pure:
            ax.set_yscale("log")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training tokens (M)")
        ax.grid(alpha=0.3)
    return save_with_legend_below(fig, axes[0], out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="folder of JOB/ folders (eval.json, log.jsonl)")
    parser.add_argument("--out", type=Path, help="write long_context.png, long_context_training.png, "
                        "long_context_maps.png, long_context_pure.png and long_context_pure_training.png here")
    parser.add_argument("--plot", metavar="RUN,RUN,...", help="the hybrid runs the context and training plots draw "
                        "(default: all; the tables always list every run, the map and pure plots all of theirs)")
    args = parser.parse_args(argv)
    runs = load_runs(args.runs)
    only = None if args.plot is None else [job for job in args.plot.split(",") if job]
    unknown = sorted(set(only or ()) - set(runs))
    if unknown:
        parser.error(f"--plot: no such run {', '.join(unknown)} under {args.runs} (there: {', '.join(runs)})")
    columns = ["run", *(label for label in TEXTS.values()),
               *(f"{label} off" for label in TEXTS.values()), "passkey", "past window"]
    print("ratio to the teacher at 512 / 2048 / 8192; 'off': perplexity rise at 8192 with the DiJiang branch "
          "switched off; passkey % at each context length; 'past window': needles farther back than the "
          f"{SOFTMAX_WINDOW}-token window retrieved\n")
    print(markdown_table(quality_table(runs), columns))
    maps = quality_table(runs, maps=True)
    if maps:
        print("\nfeature-map ablation (2M tokens each): ratio to the teacher at 512 / 2048 / 8192; 'off' as above\n")
        print(markdown_table(maps, columns[:-2]))
    retrieval = retrieval_table(args.runs)
    if retrieval:
        print("\nretrieval documents of facts no run trained on: answers exact (argmax over every answer token), mean "
              "log p of the answer tokens\n")
        print(markdown_table(retrieval, ["model", "exact", "mean log p"]))
    print("\nteacher perplexity at 512 / 2048 / 8192; passkey % at each context length\n")
    print(markdown_table(teacher_table(runs), ["model", *TEXTS.values(), "passkey"]))
    print("\nlinear weight min / mean / max and slowest decay per layer, at the last training eval\n")
    print(markdown_table(gate_table(runs), ["run", "mix", "slowest", "tokens"]))
    if args.out:
        print(plot_context(runs, args.out / "long_context.png", only=only))
        print(plot_training(runs, args.out / "long_context_training.png", only=only))
        if maps:
            print(plot_context(runs, args.out / "long_context_maps.png", maps=True))
        if any(is_pure_run(job) for job in evaluated(runs)):
            print(plot_context(runs, args.out / "long_context_pure.png", pure=True))
            print(plot_training(runs, args.out / "long_context_pure_training.png", pure=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
