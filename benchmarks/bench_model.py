"""Model-level benchmark report: prefill / decode (HF generate and dijiang.fast_decode) / memory / training
throughput, teacher vs converted (pure and window hybrid), measured by `dijiang.bench` (what `dijiang bench` runs),
written as a markdown report with a plot; see docs/bench_model.md. Nothing is written into docs/ unless --out says so.

GPU (the report in docs/):  python benchmarks/bench_model.py --model smollm2 --keep-going --out docs/bench_model.md --overwrite
Merge earlier runs' JSON:   python benchmarks/bench_model.py --from-json a.json,b.json --out docs/bench_model.md --overwrite
CPU smoke run (seconds):    python benchmarks/bench_model.py --model tiny --contexts 32,64 --batches 1,2 \
                                --batch-contexts 32 --new-tokens 8 --hf-new-tokens 4 --train-contexts 32 \
                                --train-tokens 64 --repeats 1 --out /tmp/bench.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dijiang.bench import add_arguments, measure, tables, write_json
from dijiang.files import read_json, refuse_to_replace

DEFAULT_REPORT = "runs/bench/bench_model.md"  # not docs/: a casual run must not replace the measured report


def report_paths(args) -> tuple[Path, Path]:
    """(report, plot) paths; ValueError when one (or --json) exists and --overwrite was not given."""
    out = Path(args.out)
    png = Path(args.png) if args.png else out.with_suffix(".png")
    for path in (out, png, *([Path(args.json)] if args.json else [])):
        refuse_to_replace(path, args.overwrite, "bench output")
    return out, png


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    groups = sorted({(r["kind"], r["batch"]) for r in rows if "error" not in r})
    for kind, batch in groups:
        sel = sorted((r for r in rows if r["kind"] == kind and r["batch"] == batch and "error" not in r),
                     key=lambda r: r["context"])
        ctx = [r["context"] for r in sel]
        ax_speed.plot(ctx, [r["fast_decode_tok_s"] for r in sel], "-o", label=f"{kind} B={batch} fast")
        if any("hf_decode_tok_s" in r for r in sel):
            ax_speed.plot(ctx, [r.get("hf_decode_tok_s", float("nan")) for r in sel], "--x",
                          label=f"{kind} B={batch} HF generate")
        mem_key = "fast_decode_peak_gib" if sel and sel[0].get("fast_decode_peak_gib") is not None else "cache_mib"
        ax_mem.plot(ctx, [r.get(mem_key) for r in sel], "-o", label=f"{kind} B={batch}")
        ax_mem.set_ylabel("peak GiB during fast decode" if mem_key.endswith("gib") else "cache MiB (state / KV)")
    for ax in (ax_speed, ax_mem):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (prompt tokens)")
        ax.grid(True, alpha=0.3)
    ax_speed.set_yscale("log")
    ax_speed.set_ylabel("decode tokens/s (all rows)")
    ax_speed.legend(fontsize=7)
    ax_mem.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(path: Path, inference_rows, training_rows, meta: dict) -> str:
    text = "\n".join([
        "# Model-level benchmark",
        "",
        f"- device: {meta['device']}",
        f"- torch {meta['torch']}, transformers {meta['transformers']}, python {meta['python']}",
        f"- date: {meta['date']}",
        f"- model: {meta['model']}, dtype {meta['dtype']}, window hybrid W={meta['window']}",
        f"- command: `{meta['command']}`",
        f"- decode: {meta['new_tokens']} new tokens on the fast path, {meta['hf_new_tokens']} with HF generate "
        "(its decode rate = (new - 1) tokens / (generate time - prefill time)); tokens/s count all rows.",
        "- fast path: `dijiang.fast_decode` (static state updated in place, torch.compile'd layer step, one CUDA "
        "graph per step on GPU; eager on CPU). Teacher rows run the same fast path with a static KV buffer "
        "(CUDA graph, not compiled).",
        "- peak GiB: torch.cuda.max_memory_allocated over the prefill, over HF generate, and over the fast decode "
        "loop alone (weights + static state); cache MiB: the decode cache after the prefill (DiJiang states or "
        "KV). greedy match: leading tokens where the fast path equals HF generate (worst row).",
        "",
        tables(inference_rows, training_rows),
        "",
        f"![tokens/s and memory vs context]({meta['png_name']})",
        "",
    ])
    path.write_text(text)
    return text


def _label_window(row: dict, meta: dict) -> dict:
    if row.get("kind") == "window" and meta.get("window") is not None:
        return {**row, "kind": f"window{meta['window']}"}
    return row


def report_from_json(args) -> int:
    """Merge the JSON of several runs (e.g. device calls split by batch size) into one report and plot."""
    inference_rows, training_rows, metas = [], [], []
    for name in args.from_json.split(","):
        data = read_json(name)
        metas.append(data["meta"])
        inference_rows += [_label_window(row, data["meta"]) for row in data["inference"]]
        training_rows += [_label_window(row, data["meta"]) for row in data["training"]]
    meta = dict(metas[0])
    if len({m.get("window") for m in metas}) > 1:  # runs with different windows: the rows name theirs
        meta["window"] = "/".join(sorted({str(m.get("window")) for m in metas}))
    meta["command"] = "; ".join(m["command"] for m in metas)
    meta["date"] = ", ".join(sorted({m["date"] for m in metas}))
    out, png = report_paths(args)
    meta["png_name"] = png.name
    plot(inference_rows, png)
    print(write_report(out, inference_rows, training_rows, meta))
    return 0


def run(args) -> int:
    out, png = report_paths(args)
    if args.from_json:
        return report_from_json(args)
    inference_rows, training_rows, meta = measure(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta["png_name"] = png.name
    if args.json:
        write_json(args.json, inference_rows, training_rows, meta)
    plot(inference_rows, png)
    print(write_report(out, inference_rows, training_rows, meta))
    print(f"wrote {out} and {png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--out", default=DEFAULT_REPORT, help=f"markdown report (default {DEFAULT_REPORT})")
    parser.add_argument("--png", default=None, help="plot path (default: --out with .png)")
    parser.add_argument("--from-json", default=None, help="comma-separated JSON files of earlier runs: only report")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
