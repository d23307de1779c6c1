"""PNG plots of training and evaluation results (matplotlib, headless): the figures `dijiang demo` and
`dijiang eval` write into their --out folders."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dijiang.files import read_jsonl  # noqa: E402


def loss_records(log: str | Path | Sequence[dict]) -> list[dict]:
    """Training records that carry a loss (a log may also hold eval or summary lines)."""
    records = read_jsonl(log) if isinstance(log, (str, Path)) else list(log)
    return [r for r in records if isinstance(r.get("loss"), (int, float))]


def _draw_loss(ax, records: Sequence[dict]) -> None:
    if not records:
        ax.text(0.5, 0.5, "no training log", ha="center", va="center", transform=ax.transAxes)
        return
    use_tokens = all("tokens" in r for r in records)
    xs = [r["tokens"] if use_tokens else r.get("step", i) for i, r in enumerate(records)]
    ax.plot(xs, [r["loss"] for r in records], lw=1.2)
    ax.set_xlabel("training tokens" if use_tokens else "step")
    ax.set_ylabel("loss")
    ax.set_title("fine-tune loss (training objective)")
    ax.grid(alpha=0.3)


def _save(fig, out_path: str | Path, layout: bool = True) -> Path:
    """layout=False: the caller laid the figure out (a tight_layout here would undo room left for a legend)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if layout:
        fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def palette(names: Sequence[str]) -> dict:
    """A colour per name, distinct for up to 20 names (tab10, or tab20 beyond ten)."""
    colours = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"].colors
    return {name: colours[i % len(colours)] for i, name in enumerate(names)}


def save_with_legend_below(fig, ax, out_path: str | Path) -> Path:
    """Save `fig` with the legend of `ax`'s lines below every panel, in up to 6 columns: a dozen models stay
    readable where a legend inside a panel would cover the lines."""
    handles, labels = ax.get_legend_handles_labels()
    columns = max(1, min(6, len(labels)))
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.035 * (-(-len(labels) // columns)), 1, 1))
    return _save(fig, out_path, layout=False)


def plot_loss_curve(log: str | Path | Sequence[dict], out_path: str | Path) -> Path:
    """Loss against training tokens (or steps) from a `dijiang train` JSONL log or its records."""
    fig, ax = plt.subplots(figsize=(6, 4))
    _draw_loss(ax, loss_records(log))
    return _save(fig, out_path)


def plot_fidelity(rows: Sequence[dict], out_path: str | Path) -> Path:
    """Per-layer bars: cosine similarity and relative MSE of student vs teacher attention outputs."""
    labels = [_short_layer_name(r["layer"]) for r in rows]
    fig, (ax_cos, ax_mse) = plt.subplots(2, 1, figsize=(max(6, 0.3 * len(rows) + 2), 6), sharex=True)
    ax_cos.bar(labels, [r["cosine"] for r in rows], color="tab:blue")
    ax_cos.set_ylabel("cosine similarity")
    ax_cos.set_ylim(min(0.0, min(r["cosine"] for r in rows)), 1.0)
    ax_cos.set_title("attention output fidelity per layer (student vs teacher)")
    ax_mse.bar(labels, [r["relative_mse"] for r in rows], color="tab:red")
    ax_mse.set_ylabel("relative MSE")
    ax_mse.set_xlabel("layer")
    for ax in (ax_cos, ax_mse):
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, out_path)


def _short_layer_name(name: str) -> str:
    """'model.layers.3.self_attn' -> '3'; other names unchanged."""
    numbers = [part for part in name.split(".") if part.isdigit()]
    return numbers[-1] if numbers else name


def plot_demo(perplexity_rows: Sequence[dict], log: str | Path | Sequence[dict] | None, out_path: str | Path
              ) -> Path:
    """The demo figure: perplexity bars per model (log scale) next to the fine-tune loss curve."""
    fig, (ax_ppl, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["model"] for r in perplexity_rows]
    values = [r["perplexity"] for r in perplexity_rows]
    bars = ax_ppl.bar(range(len(names)), values, color=["tab:gray", "tab:red", "tab:orange", "tab:green"][:len(names)]
                      if len(names) <= 4 else None)
    ax_ppl.set_xticks(range(len(names)), names, rotation=15, ha="right", fontsize=8)
    ax_ppl.set_yscale("log")
    ax_ppl.set_ylabel("perplexity (log scale)")
    ax_ppl.set_title("perplexity on the evaluation text")
    for bar, value in zip(bars, values):
        ax_ppl.annotate(f"{value:.4g}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom",
                        fontsize=8)
    _draw_loss(ax_loss, loss_records(log) if log is not None else [])
    return _save(fig, out_path)


def plot_context(rows: Sequence[dict], out_path: str | Path, family=None, goal: float | None = None) -> Path:
    """Ratio of perplexity to the teacher's against the evaluation window, one panel per text, one line per
    model (a model with its DiJiang branch switched off dashed, in its model's colour); one legend below the
    panels, so that a dozen models stay readable. ``family(model)``: models of one family share a colour, those
    not named as the family drawn with square markers (e.g. one ablation with and without a change). ``goal``: a
    ratio to draw as a dotted line (what the models are asked to reach)."""
    texts = list(dict.fromkeys(r["text"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows if r["model"] != "teacher"))
    family = family or (lambda model: model)
    colours = palette(list(dict.fromkeys(family(model.removesuffix(", branch off")) for model in models)))
    fig, axes = plt.subplots(1, len(texts), figsize=(5 * len(texts), 4), squeeze=False)
    for ax, text in zip(axes[0], texts):
        for model in models:
            base = model.removesuffix(", branch off")
            points = sorted((r["window"], r["ratio"]) for r in rows if r["text"] == text and r["model"] == model)
            if points:
                ax.plot(*zip(*points), marker="o" if family(base) == base else "s", lw=1.5, label=model,
                        color=colours[family(base)], ls="--" if model != base else "-")
        ax.axhline(1.0, color="k", lw=0.8, label="teacher")
        if goal is not None:
            ax.axhline(goal, color="k", lw=0.8, ls=":", label=f"goal {goal:g}x")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # a pure model at 10x beside hybrids at 1.1x
        windows = sorted({r["window"] for r in rows if r["text"] == text})
        ax.set_xticks(windows, [str(w) for w in windows])
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
        ax.set_xlabel("evaluation window (tokens)")
        ax.set_ylabel("perplexity / teacher's (log scale)")
        ax.set_title(text)
        ax.grid(alpha=0.3)
    return save_with_legend_below(fig, axes[0][0], out_path)

