"""How well does each feature map approximate softmax attention? (2-core CPU: ~100 s idle)

    python benchmarks/approx_error.py --out docs   # rewrites docs/approximation.md's block, docs/approximation*.png
    python benchmarks/approx_error.py --quick      # 2 seeds, tables printed only

d = 64, m in {d, 2d, 4d}, H = 4 heads (each head an independent draw), 128 queries x 128 keys,
full (non-causal) attention with temperature d^-0.5. Weighted DiJiang: log_weight fitted with Adam
(KL(softmax || approximation), fresh training draws every step) and evaluated on separate draws.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dijiang.feature_maps import approximation_error, build_feature_map

D, H, T = 64, 4, 128
SCALE = D**-0.5
M_VALUES = (D, 2 * D, 4 * D)


# ---------------------------------------------------------------------------------------------
# Input distributions: make(param_gen) fixes the per-head statistics and returns draw(gen) -> (q, k) [T, H, D]
# ---------------------------------------------------------------------------------------------


def gaussian(sigma: float):
    def make(_param_gen: torch.Generator):
        return lambda gen: (sigma * torch.randn(T, H, D, generator=gen), sigma * torch.randn(T, H, D, generator=gen))

    return make


def decaying_spectrum(param_gen: torch.Generator, sigma: float = 0.5, power: float = 1.0):
    """q, k ~ N(0, S) with S = U diag(lambda) U^T, lambda_j ~ j^-power, trace(S) = d sigma^2.

    U is random but fixed per head (drawn from param_gen): fitted weights see the same head statistics
    at training and evaluation, as a converted model's weights would.
    """
    lam = torch.arange(1, D + 1, dtype=torch.float32) ** -power
    lam = lam * (D * sigma**2 / lam.sum())
    mix = torch.linalg.qr(torch.randn(H, D, D, generator=param_gen))[0] * lam.sqrt()  # [H, D, D]

    def one(gen):
        return torch.einsum("hij,thj->thi", mix, torch.randn(T, H, D, generator=gen))

    return lambda gen: (one(gen), one(gen))


def shared_low_rank(param_gen: torch.Generator, rank: int = 4, signal: float = 1.5, noise: float = 0.3):
    """q = U a + noise, k = U b + noise: a fixed rank-4 subspace per head carries most of q.k."""
    basis = torch.linalg.qr(torch.randn(H, D, rank, generator=param_gen))[0]  # [H, D, r]

    def one(gen):
        coef = signal * torch.randn(T, H, rank, generator=gen)
        return torch.einsum("hdr,thr->thd", basis, coef) + noise * torch.randn(T, H, D, generator=gen)

    return lambda gen: (one(gen), one(gen))


DISTRIBUTIONS = {
    "gauss s=0.25": gaussian(0.25),
    "gauss s=0.5": gaussian(0.5),
    "gauss s=1": gaussian(1.0),
    "decay spectrum": decaying_spectrum,
    "shared low-rank": shared_low_rank,
}

# label -> (map name, build kwargs, fit weights?)
METHODS = {
    "performer (MC)": ("performer", {}, False),
    "orf-chi (MC radii, orth.)": ("pff", {"radius": "chi", "qmc": "random"}, False),
    "pff (QMC, orth.)": ("pff", {}, False),
    "pff-chi (QMC, orth.)": ("pff", {"radius": "chi"}, False),
    "dijiang (DCT+QMC)": ("dijiang", {}, False),
    "dijiang weighted": ("dijiang", {}, True),
    "dijiang-chi": ("dijiang", {"radius": "chi"}, False),
    "dijiang-chi weighted": ("dijiang", {"radius": "chi"}, True),
    "official": ("official", {}, False),
    "elu+1": ("elu", {}, False),
}
METRICS = ("attn_tv", "attn_rel_err", "kernel_rel_err", "kernel_raw_rel_err")


# ---------------------------------------------------------------------------------------------


def fit_log_weight(fmap, draw, gen: torch.Generator, steps: int, lr: float = 0.05) -> None:
    """Adam on log_weight only: KL(softmax || row-normalised linear attention), fresh draws each step."""
    opt = torch.optim.Adam([fmap.log_weight], lr=lr)
    for _ in range(steps):
        q, k = draw(gen)
        logits = SCALE * torch.einsum("thd,shd->hts", q, k)
        kernel = torch.einsum("thm,shm->hts", fmap(q), fmap(k))
        log_attn = torch.log(kernel.clamp_min(1e-30)) - torch.log(kernel.sum(-1, keepdim=True))
        target = torch.softmax(logits, -1)
        loss = (target * (torch.log_softmax(logits, -1) - log_attn)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def uniform_attention_tv(q: torch.Tensor, k: torch.Tensor) -> dict:
    """Reference: attention that ignores q and k entirely (every row 1/T)."""
    attn = torch.softmax(SCALE * torch.einsum("thd,shd->hts", q.double(), k.double()), -1)
    uniform = torch.full_like(attn, 1.0 / attn.shape[-1])
    rel = ((uniform - attn).norm(dim=(-2, -1)) / attn.norm(dim=(-2, -1))).mean().item()
    return {"attn_tv": (0.5 * (uniform - attn).abs().sum(-1)).mean().item(), "attn_rel_err": rel}


def run(seeds: int, fit_steps: int, stabilisers: tuple[str, ...]) -> dict:
    """results[stab][dist][method][m] = {metric: [per-seed values]}"""
    results: dict = {}
    for stab in stabilisers:
        for dist_name, make_sampler in DISTRIBUTIONS.items():
            for seed in range(seeds):
                draw = make_sampler(torch.Generator().manual_seed(30_000 + seed))
                q, k = draw(torch.Generator().manual_seed(10_000 + seed))
                ref = uniform_attention_tv(q, k)
                for m in M_VALUES:
                    cell = results.setdefault(stab, {}).setdefault(dist_name, {}).setdefault("uniform attention", {})
                    for key, val in ref.items():
                        cell.setdefault(m, {}).setdefault(key, []).append(val)
                    for label, (name, kwargs, fit) in METHODS.items():
                        if name in ("official", "elu") and m != D:
                            continue
                        fmap = build_feature_map(name, D, H, m, stabiliser=stab, seed=seed, **kwargs)
                        if fit:
                            fit_log_weight(fmap, draw, torch.Generator().manual_seed(20_000 + seed), fit_steps)
                        err = approximation_error(fmap, q, k, SCALE)
                        cell = results[stab][dist_name].setdefault(label, {}).setdefault(m, {})
                        for key in METRICS:
                            cell.setdefault(key, []).append(err[key])
    return results


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def mean_std(values) -> str:
    a = np.asarray(values, dtype=float)
    if np.all(np.isnan(a)):
        return "-"
    return f"{np.nanmean(a):.3f} ± {np.nanstd(a):.3f}"


def table(results_stab: dict, metric: str) -> str:
    lines = [f"| distribution | method | " + " | ".join(f"m={m}" for m in M_VALUES) + " |"]
    lines.append("|---|---|" + "---|" * len(M_VALUES))
    for dist_name, by_method in results_stab.items():
        for label, by_m in by_method.items():
            if metric not in next(iter(by_m.values())):
                continue
            cells = [mean_std(by_m[m][metric]) if m in by_m else "" for m in M_VALUES]
            lines.append(f"| {dist_name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results_stab: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dists = list(results_stab)
    ncols = 3
    nrows = math.ceil((len(dists) + 1) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.0 * nrows))
    axes = axes.ravel()
    colours = plt.get_cmap("tab10").colors
    for ax, dist_name in zip(axes, dists):
        for i, (label, by_m) in enumerate(results_stab[dist_name].items()):
            ms = sorted(by_m)
            mean = np.array([np.mean(by_m[m]["attn_tv"]) for m in ms])
            std = np.array([np.std(by_m[m]["attn_tv"]) for m in ms])
            colour = colours[i % len(colours)]
            if label == "uniform attention":
                ax.axhline(mean[0], color="k", ls=":", lw=1.5, label=label)
            elif len(ms) == 1:
                ax.errorbar(ms, mean, yerr=std, marker="s", ms=7, ls="none", capsize=3, color=colour, label=label)
            else:
                style = "--" if "weighted" in label else "-"
                marker = "^" if "dijiang" in label else "o"
                ax.errorbar(ms, mean, yerr=std, marker=marker, ls=style, capsize=3, color=colour, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(M_VALUES), [str(m) for m in M_VALUES])
        ax.set_xlabel("num_features m (d = 64)")
        ax.set_ylabel("mean TV per attention row")
        ax.set_title(dist_name)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[len(dists):]:
        ax.axis("off")
    axes[len(dists)].legend(handles, labels, loc="center", fontsize=9, frameon=False)
    fig.suptitle(title + " (lower is better; mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} (CPU, {torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}, {platform.system()}"
    )


def main() -> None:
    torch.set_num_threads(1)  # these ops are tiny: one thread is several times faster than two on this box
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--fit-steps", type=int, default=150)
    parser.add_argument("--quick", action="store_true", help="2 seeds, 100 fit steps")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder to write approximation.md (its generated block) and the plots into (docs)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.fit_steps = 2, 100
    start = time.time()
    results = run(args.seeds, args.fit_steps, ("softmax", "norm"))
    elapsed = time.time() - start
    for stab in results:
        print(f"\n## stabiliser={stab}: attention TV\n" + table(results[stab], "attn_tv"))
    print(f"\nelapsed {elapsed:.0f} s")
    if args.out is None:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results["softmax"], args.out / "approximation.png", "softmax stabiliser (model default): attention TV vs m")
    plot(results["norm"], args.out / "approximation_norm.png", "norm stabiliser (estimator form): attention TV vs m")
    command = f"python benchmarks/approx_error.py --out {args.out}"
    if (args.seeds, args.fit_steps) != (4, 150):
        command += f" --seeds {args.seeds} --fit-steps {args.fit_steps}"
    write_doc(args.out / "approximation.md", results, command, elapsed, args)


def write_doc(path: Path, results: dict, command: str, elapsed: float, args) -> None:
    template = path.read_text() if path.exists() else ""
    generated = [
        "<!-- BEGIN GENERATED (benchmarks/approx_error.py) -->",
        f"Command: `{command}` ({elapsed:.0f} s). Machine: {machine()}. "
        f"Date: {datetime.date.today().isoformat()}. Seeds: {args.seeds} (feature-map seed s, eval data seed 10000+s, "
        f"weight-fit data seed 20000+s), weight fit: {args.fit_steps} Adam steps, lr 0.05.",
        "",
        "Numbers are mean ± std over seeds. `uniform attention` = every row 1/T (ignores q, k): a method above it "
        "is worse than not attending at all.",
    ]
    for stab, heading in (("softmax", "softmax stabiliser (the model's default)"), ("norm", "norm stabiliser")):
        generated += ["", f"### Attention TV, {heading}", "", table(results[stab], "attn_tv")]
        generated += ["", f"<details><summary>Attention relative Frobenius error, {heading}</summary>", "",
                      table(results[stab], "attn_rel_err"), "", "</details>"]
        generated += ["", f"<details><summary>Kernel error after unit-L2 row scaling, {heading}</summary>", "",
                      table(results[stab], "kernel_rel_err"), "", "</details>"]
    generated += ["", "<details><summary>Raw kernel relative error (norm stabiliser only)</summary>", "",
                  table(results["norm"], "kernel_raw_rel_err"), "", "</details>"]
    generated.append("<!-- END GENERATED -->")
    block = "\n".join(generated)
    begin, end = "<!-- BEGIN GENERATED (benchmarks/approx_error.py) -->", "<!-- END GENERATED -->"
    if begin in template and end in template:
        head, rest = template.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = template + ("\n\n" if template else "# Feature-map approximation error\n\n") + block + "\n"
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
