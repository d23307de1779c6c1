"""The learned weight of every window layer's DiJiang branch, head by head: softplus(window_mix).

A window hybrid adds its linear branch to the softmax window with one weight per head (0.1 at init,
`window_mix_init`). The training log keeps only their minimum, mean and maximum; this reads each head's weight
from a saved model's safetensors (no model is built, so it runs anywhere in a second) and says where training
turned the branch up or down.

    python scripts/branch_weights.py RUN=MODEL_DIR [RUN=MODEL_DIR ...] [--json out.json] [--plot out.png]
        [--against NAME=PROBE.json ...]

MODEL_DIR is a folder written by `dijiang train` / `save_pretrained` (its *.safetensors files); a JSON file
written by --json before stands for the runs it holds, so a plot can be redrawn without the models (RUN=FILE.json
renames the one run it holds). --against ranks the heads against the teacher's own, from
scripts/probe_far_attention.py: do the heads that training turned up retrieve, or look far, in the teacher?
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from safetensors import safe_open

from dijiang.files import read_json, write_text_atomic

MIX_KEY = re.compile(r"layers\.(\d+)\..*window_mix$")
HIGH, LOW = 0.2, 0.05  # "turned up" = twice the init's 0.1, "turned down" = half of it


def softplus(x: float) -> float:
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def read_weights(model_dir: Path) -> dict[int, list[float]]:
    """{layer index: [softplus(window_mix) per head]} from every *.safetensors file of model_dir."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{model_dir}: no *.safetensors files (a folder written by save_pretrained)")
    weights = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                match = MIX_KEY.search(key)
                if match:
                    weights[int(match.group(1))] = [softplus(v) for v in f.get_tensor(key).float().flatten().tolist()]
    return dict(sorted(weights.items()))


def summarise(weights: dict[int, list[float]]) -> dict:
    flat = sorted(w for heads in weights.values() for w in heads)
    if not flat:
        return {"heads": 0}
    return {"heads": len(flat), "median": flat[len(flat) // 2], "min": flat[0], "max": flat[-1],
            "heads_up": sum(w > HIGH for w in flat), "heads_down": sum(w < LOW for w in flat),
            "layers_with_a_head_up": [layer for layer, heads in weights.items() if max(heads) > HIGH]}


def load_runs(specs: list[str]) -> dict[str, dict[int, list[float]]]:
    runs = {}
    for spec in specs:
        if spec.endswith(".json") and "=" not in spec:
            runs.update(read_runs_json(spec))
            continue
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{spec!r}: expected RUN=MODEL_DIR or a JSON file written by --json")
        if path.endswith(".json") and Path(path).is_file():  # RUN=file.json renames the one run it holds
            held = read_runs_json(path)
            if len(held) != 1:
                raise SystemExit(f"{spec!r}: {path} holds {len(held)} runs ({', '.join(held)}); RUN= names one")
            runs[name] = next(iter(held.values()))
            continue
        if not Path(path).is_dir():
            raise SystemExit(f"{path}: not a folder")
        runs[name] = read_weights(Path(path))
    return runs


def read_runs_json(path: str) -> dict[str, dict[int, list[float]]]:
    record = read_json(path)
    if not isinstance(record, dict) or not isinstance(record.get("runs"), dict):
        raise SystemExit(f"{path}: not a JSON written by --json (no 'runs')")
    return {name: {int(layer): heads for layer, heads in run["layers"].items()} for name, run in record["runs"].items()}


def read_head_scores(path: str) -> dict[int, list[float]]:
    """{layer: [score per head]} from a scripts/probe_far_attention.py JSON: its retrieval-head score
    (needle_mass, with --needles) or its far-attention mass (layers[i].far_mass, without)."""
    record = read_json(path)
    if isinstance(record, dict) and isinstance(record.get("needle_mass"), list):
        return dict(enumerate(record["needle_mass"]))
    if isinstance(record, dict) and isinstance(record.get("layers"), list):
        return {i: layer["far_mass"] for i, layer in enumerate(record["layers"])}
    raise SystemExit(f"{path}: not a JSON of scripts/probe_far_attention.py (no needle_mass, no layers' far_mass)")


def compare(weights: dict[int, list[float]], scores: dict[int, list[float]], top: int) -> dict:
    """Spearman's rho between a run's head weights and a probe's head scores over the heads both have, and how
    many of the run's `top` heaviest heads are among the probe's `top` highest; the same rho within layers."""
    from scipy.stats import rankdata, spearmanr

    pairs = [((layer, head), w, scores[layer][head]) for layer, heads in weights.items() if layer in scores
             for head, w in enumerate(heads) if head < len(scores[layer])]
    if len(pairs) < 3:
        raise SystemExit(f"only {len(pairs)} heads in common with the probe: is it the same model?")
    rho, p = spearmanr([w for _, w, _ in pairs], [s for _, _, s in pairs])
    # Both can simply grow with depth; ranks taken within each layer, then pooled, ask about the heads themselves.
    within_w, within_s = [], []
    for layer in sorted({key[0] for key, _, _ in pairs}):
        rows = [(w, s) for key, w, s in pairs if key[0] == layer]
        within_w += list(rankdata([w for w, _ in rows]))
        within_s += list(rankdata([s for _, s in rows]))
    rho_within, p_within = spearmanr(within_w, within_s)
    heaviest = {key for key, _, _ in sorted(pairs, key=lambda t: -t[1])[:top]}
    highest = {key for key, _, _ in sorted(pairs, key=lambda t: -t[2])[:top]}
    return {"heads": len(pairs), "spearman": float(rho), "p": float(p), "spearman_within_layers": float(rho_within),
            "p_within_layers": float(p_within), "top": top, "top_shared": len(heaviest & highest)}


def table(runs: dict[str, dict[int, list[float]]]) -> str:
    lines = [f"| run | heads | median | min / max | heads > {HIGH} | heads < {LOW} | layers with a head > {HIGH} |",
             "|---|---:|---:|---|---:|---:|---|"]
    for name, weights in runs.items():
        s = summarise(weights)
        if not s["heads"]:
            lines.append(f"| {name} | 0 | - | - | - | - | - |")
            continue
        up = s["layers_with_a_head_up"]
        layers = "every layer" if len(up) == len(weights) else ", ".join(str(i) for i in up) or "-"
        lines.append(f"| {name} | {s['heads']} | {s['median']:.3f} | {s['min']:.3f} / {s['max']:.3f} | "
                     f"{s['heads_up']} | {s['heads_down']} | {layers} |")
    return "\n".join(lines)


def plot(runs: dict[str, dict[int, list[float]]], out: Path) -> None:
    """One heatmap per run, layers down, heads across, on a log colour scale centred on the init's 0.1."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    shown = {name: weights for name, weights in runs.items() if weights}
    fig, axes = plt.subplots(1, len(shown), figsize=(2.6 * len(shown) + 1, 6), squeeze=False, sharey=True)
    norm = LogNorm(vmin=0.01, vmax=1.0)
    for ax, (name, weights) in zip(axes[0], shown.items()):
        layers = sorted(weights)
        image = ax.imshow([weights[i] for i in layers], aspect="auto", cmap="RdBu_r", norm=norm,
                          interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("head")
        ax.set_yticks(range(0, len(layers), 2), [str(layers[i]) for i in range(0, len(layers), 2)], fontsize=7)
    axes[0][0].set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), label="softplus(window_mix); white: 0.1, the library's init")
    fig.suptitle("the DiJiang branch's weight per head after training")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN=MODEL_DIR", help="a saved model, or a JSON from --json")
    parser.add_argument("--json", type=Path, help="write every head's weight here")
    parser.add_argument("--plot", type=Path, help="write the heatmaps here (PNG)")
    parser.add_argument("--against", action="append", default=[], metavar="NAME=PROBE.json",
                        help="rank-correlate each run's head weights with a scripts/probe_far_attention.py JSON of the "
                        "same model (its retrieval-head score or far-attention mass); repeatable")
    parser.add_argument("--top", type=int, default=18, help="--against also counts shared heads among the top N")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error("--top must be at least 1")
    probes = {}
    for spec in args.against:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            parser.error(f"--against {spec!r}: expected NAME=PROBE.json")
        probes[name] = read_head_scores(path)
    runs = load_runs(args.runs)
    print(table(runs))
    comparisons = {}
    if probes:
        print(f"\n| run | against | heads | Spearman rho (p) | within layers (p) | shared of the top {args.top} |\n"
              "|---|---|---:|---:|---:|---:|")
        for run, weights in runs.items():
            for name, scores in probes.items():
                c = comparisons.setdefault(run, {})[name] = compare(weights, scores, args.top)
                print(f"| {run} | {name} | {c['heads']} | {c['spearman']:+.3f} ({c['p']:.1g}) | "
                      f"{c['spearman_within_layers']:+.3f} ({c['p_within_layers']:.1g}) | {c['top_shared']} |")
    if args.json:
        record = {"runs": {name: {"layers": {str(i): heads for i, heads in weights.items()},
                                  "summary": summarise(weights)} for name, weights in runs.items()}}
        if comparisons:
            record["against"] = {"probes": {spec.partition("=")[0]: spec.partition("=")[2] for spec in args.against},
                                 "runs": comparisons}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.json, json.dumps(record, indent=1) + "\n")
    if args.plot:
        if not any(runs.values()):
            raise SystemExit("no run has a window layer: nothing to plot")
        plot(runs, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
