#!/usr/bin/env python3
"""Tables and plots of the long-context ablation from each run's `dijiang eval` JSON and training log.

Reads RUNS/JOB/eval.json (or RUNS/JOB/eval/eval.json, as the GPU driver leaves them) and RUNS/JOB/log.jsonl
for every recipe of recipes/long-context/, prints the markdown tables that docs/results.md shows and writes
its plots. Nothing is written into docs/ unless --out says so.

    python scripts/long_context_report.py docs/bench_data/long_context --out docs
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from dijiang.evaluate import markdown_table  # noqa: E402

WINDOWS = (512, 2048, 8192)
TEXTS = {"pydoc": "pydoc", "austen-pride-and-prejudice.txt": "Austen", "python-stdlib.txt": "code"}
ORDER = ("baseline", "chi-decay", "transform", "transform-mix1", "layer-hybrid", "pure")  # lever by lever


def load_runs(root: Path) -> dict[str, dict]:
    """{job: {"eval": ..., "log": [...]}} for every job folder under root that holds an eval.json."""
    runs = {}
    rank = {job: i for i, job in enumerate(ORDER)}
    for folder in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: (rank.get(p.name, len(ORDER)), p.name)):
        found = [f for f in (folder / "eval.json", folder / "eval" / "eval.json") if f.is_file()]
        if not found:
            continue
        log = folder / "log.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
        runs[folder.name] = {"eval": json.loads(found[0].read_text()), "log": records}
    if not runs:
        raise SystemExit(f"no JOB/eval.json under {root}")
    return runs


def _row(rows: list[dict], text: str, window: int, model: str) -> dict | None:
    return next((r for r in rows if (r["text"], r["window"], r["model"]) == (text, window, model)), None)


def quality_table(runs: dict[str, dict]) -> list[dict]:
    """One row per job: ratio to the teacher per text and window, the branch's worth at 8k, passkey."""
    table = []
    for job, run in runs.items():
        rows, row = run["eval"]["context"], {"run": job}
        for text, label in TEXTS.items():
            cells = [_row(rows, text, w, job) for w in WINDOWS]
            row[label] = " / ".join(f"{c['ratio']:.3f}" if c else "-" for c in cells)
            off = _row(rows, text, WINDOWS[-1], f"{job}, branch off")
            row[f"{label} off"] = f"{100 * off['branch_worth']:+.1f} %" if off else "-"
        passkey = run["eval"].get("passkey", {}).get(job, [])
        row["passkey"] = " / ".join(f"{100 * r['accuracy']:.0f}" for r in passkey) or "-"
        table.append(row)
    return table


def teacher_table(runs: dict[str, dict]) -> list[dict]:
    evaluation = next(iter(runs.values()))["eval"]
    row = {"model": "teacher"}
    for text, label in TEXTS.items():
        row[label] = " / ".join(f"{_row(evaluation['context'], text, w, 'teacher')['perplexity']:.2f}"
                                for w in WINDOWS)
    row["passkey"] = " / ".join(f"{100 * r['accuracy']:.0f}" for r in evaluation["passkey"]["teacher"])
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


def plot_context(runs: dict[str, dict], out: Path) -> Path:
    from dijiang.plots import plot_context as draw

    rows = [dict(r, text=TEXTS.get(r["text"], r["text"])) for run in runs.values() for r in run["eval"]["context"]
            if r["model"] != "teacher"]
    return draw(rows, out)


def plot_training(runs: dict[str, dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for job, run in runs.items():
        evals = [r for r in run["log"] if "eval_pydoc_ppl" in r]
        tokens = [r["tokens"] / 1e6 for r in evals]
        axes[0].plot(tokens, [r["eval_pydoc_ppl"] for r in evals], marker="o", label=job)
        if evals and "mix_mean" in evals[0]:
            axes[1].plot(tokens, [r["mix_mean"] for r in evals], marker="o", label=job)
        axes[2].plot(tokens, [r["slowest_gamma_max"] for r in evals], marker="o", label=job)
    for ax, title in zip(axes, ("block-eval perplexity, pydoc (4 x 4096 tokens)", "mean linear weight (mix)",
                                "slowest decay gamma")):
        ax.set_title(title)
        ax.set_xlabel("training tokens (M)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="folder of JOB/ folders (eval.json, log.jsonl)")
    parser.add_argument("--out", type=Path, help="write long_context.png and long_context_training.png here")
    args = parser.parse_args(argv)
    runs = load_runs(args.runs)
    columns = ["run", *(label for label in TEXTS.values()),
               *(f"{label} off" for label in TEXTS.values()), "passkey"]
    print("ratio to the teacher at 512 / 2048 / 8192; 'off': perplexity rise at 8192 with the DiJiang branch "
          "switched off; passkey % at 1k / 2k / 4k / 8k\n")
    print(markdown_table(quality_table(runs), columns))
    print("\nteacher perplexity at 512 / 2048 / 8192; passkey % at 1k / 2k / 4k / 8k\n")
    print(markdown_table(teacher_table(runs), ["model", *TEXTS.values(), "passkey"]))
    print("\nlinear weight min / mean / max and slowest decay per layer, at the last training eval\n")
    print(markdown_table(gate_table(runs), ["run", "mix", "slowest", "tokens"]))
    if args.out:
        print(plot_context(runs, args.out / "long_context.png"))
        print(plot_training(runs, args.out / "long_context_training.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
