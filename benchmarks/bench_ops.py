"""Op-level benchmark: softmax attention (SDPA) vs DiJiang attention forms, B=1.

Methods (each is the whole op, feature map included where it has one):
  sdpa       torch SDPA, causal (FlashAttention backend on CUDA)
  fused      dijiang.ops.triton_dijiang.fused_dijiang_attention (Triton, feature map fused in)
  torch      separate feature map + dijiang.ops.linear_attention(mode="chunk") (pure torch)
  quadratic  the official code's form: feature map, materialised [T, T] decay-masked scores (<= 8k)
  window     the in-layer window hybrid: exact softmax over the last --window tokens + DiJiang beyond
             (separate feature map + dijiang.ops.window_attention(mode="chunk"), pure torch, linear in T)
  window-fused  the same hybrid through dijiang.ops.triton_window.fused_window_attention (banded softmax
             Triton kernel + the fused DiJiang kernel for the part beyond the window); CPU: the torch op

Times: median ms (CUDA: triton.testing.do_bench with return_mode="median"; CPU: perf_counter median),
forward and forward+backward (backward of sum(o * do)). Prints a markdown table; with --md also writes a
markdown report and a log-log plot.

    python benchmarks/bench_ops.py --md docs/bench_ops.md   # CUDA: full sweep, report and plot (bench_ops.png)
    python benchmarks/bench_ops.py --device cpu             # small sizes, runnable anywhere, prints only
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dijiang.ops import triton_dijiang as tdj  # noqa: E402

METHODS = ("sdpa", "fused", "torch", "quadratic", "window", "window-fused", "window-sinks", "window-gated",
           "window-gated-torch")
VERSUS_SDPA = ("fused", "window-fused", "window-sinks", "window-gated")  # get a speed-up column against SDPA
SINKS = 4  # window-sinks: a window of W - 4 tokens and the first 4 as sinks, the same W softmax keys
# window-gated: window-sinks with a per-token decay [B, T, H] (what DiJiangSettings(decay_gate=True) feeds it):
# the fused kernels (the chunk kernel's per-token mode); window-gated-torch: the same through the PyTorch window op
WITH_SINKS = ("window-sinks", "window-gated", "window-gated-torch")
DEFAULT_WINDOW = 64
GRAPHS_NOTE = """
Every op here, SDPA included, is replayed from CUDA graphs: the forward from one captured graph, forward+backward
through `torch.cuda.make_graphed_callables`. The times are GPU time without Python's launch costs, as seen by a
training or prefill loop that captures CUDA graphs. Without graphs, see `bench_ops.md`.
"""


def make(B, T, H, D, m, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = (torch.randn(B, T, H, D, generator=g) * 1.5).to(device, dtype)
    k = (torch.randn(B, T, H, D, generator=g) * 1.5).to(device, dtype)
    v = torch.randn(B, T, H, D, generator=g).to(device, dtype)
    proj = torch.randn(D, m, generator=g).to(device)
    lw = (torch.randn(H, m, generator=g) * 0.3).to(device)
    ld = torch.log1p(-torch.exp(torch.linspace(math.log(1 / 32), math.log(1 / 512), H))).to(device)
    return q, k, v, proj, lw, ld


def quadratic_form(q, k, v, proj, lw, ld, scale):
    """The official code's training form (made overflow-free): O(T^2) scores, decay mask materialised."""
    fq = tdj.dijiang_feature_map(q, proj, lw, scale).to(q.dtype).transpose(1, 2)  # [B, H, T, m]
    fk = tdj.dijiang_feature_map(k, proj, lw, scale).to(k.dtype).transpose(1, 2)
    T = q.shape[1]
    t = torch.arange(T, device=q.device, dtype=torch.float32)
    dist = t[:, None] - t[None, :]
    mask = torch.exp(dist.clamp_min(0)[None] * ld.float()[:, None, None]) * (dist >= 0)
    scores = (fq @ fk.transpose(-1, -2)) * mask.to(q.dtype)
    return (scores @ v.transpose(1, 2)).transpose(1, 2)


def causal_sdpa(qt, kt, vt):
    """Causal SDPA on [B, H, T, D]; the FlashAttention backend on CUDA."""
    if qt.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)


def build(method, q, k, v, proj, lw, ld, scale, window=DEFAULT_WINDOW):
    if method == "sdpa":
        qt, kt, vt = (x.transpose(1, 2).contiguous().detach().requires_grad_(x.requires_grad) for x in (q, k, v))
        return (lambda: causal_sdpa(qt, kt, vt)), (qt, kt, vt)
    if method == "fused":
        return (lambda: tdj.fused_dijiang_attention(q, k, v, proj, lw, ld, scale=scale)[0]), (q, k, v, lw, ld)
    if method == "torch":
        return (lambda: tdj.fused_dijiang_attention(q, k, v, proj, lw, ld, scale=scale, backend="torch")[0]), (
            q, k, v, lw, ld)
    if method == "quadratic":
        return (lambda: quadratic_form(q, k, v, proj, lw, ld, scale)), (q, k, v, lw, ld)
    sinks = SINKS if method in WITH_SINKS else 0
    band = window - sinks

    def decay():  # per token for the gated methods (the gradient still reaches ld)
        return ld[None, None].expand(*q.shape[:3]) if method.startswith("window-gated") else ld

    if method in ("window-fused", "window-sinks", "window-gated") and q.is_cuda:
        from dijiang.ops.triton_window import fused_window_attention

        def fn():
            return fused_window_attention(q, k, v, proj, lw, decay(), torch.ones_like(ld), window=band, scale=scale,
                                          sinks=sinks)[0]

        return fn, (q, k, v, lw, ld)
    if method.startswith("window"):  # CPU: the fused op needs CUDA; time the torch op
        from dijiang.ops.window import window_attention

        def fn():
            fq = tdj.dijiang_feature_map(q, proj, lw, scale).to(q.dtype)
            fk = tdj.dijiang_feature_map(k, proj, lw, scale).to(k.dtype)
            return window_attention(q, k, v, fq, fk, decay(), torch.ones_like(ld), window=band, scale=scale,
                                    mode="chunk", sinks=sinks)[0]

        return fn, (q, k, v, lw, ld)
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def time_ms(fn, device, budget_ms=300.0):
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=int(budget_ms / 2), return_mode="median")
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start) * 1e3 < budget_ms and len(times) < 50:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def op_of_tensors(method, proj, scale, window):
    """The op as a function of its differentiable inputs (what torch.cuda.make_graphed_callables needs)."""
    if method == "sdpa":
        return causal_sdpa

    def op(q, k, v, lw, ld):
        return build(method, q, k, v, proj, lw, ld, scale, window)[0]()

    return op


def bench_graphed(method, q, k, v, proj, lw, ld, scale, window, do):
    """Forward and forward+backward replayed from CUDA graphs: the op's GPU time without Python launch costs,
    as a training or prefill loop that captures CUDA graphs sees it."""
    op = op_of_tensors(method, proj, scale, window)
    xs = (q, k, v) if method != "sdpa" else tuple(x.transpose(1, 2).contiguous() for x in (q, k, v))
    xs = xs + ((lw, ld) if method != "sdpa" else ())
    if method == "sdpa":
        do = do.transpose(1, 2).contiguous()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):  # compile and warm up outside the capture
            op(*xs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        op(*xs)
    fwd = time_ms(graph.replay, "cuda")
    leaves = tuple(x.detach().requires_grad_(True) for x in xs)
    graphed = torch.cuda.make_graphed_callables(op, leaves)

    def step():
        graphed(*leaves).backward(do)
        for x in leaves:
            x.grad = None

    return fwd, time_ms(step, "cuda")


def bench_one(method, B, T, H, D, m, dtype, device, window=DEFAULT_WINDOW, cuda_graphs=False):
    q, k, v, proj, lw, ld = make(B, T, H, D, m, dtype, device)
    scale = D**-0.5
    if cuda_graphs:
        do = torch.randn(B, T, H, D, device=device, dtype=dtype)
        return bench_graphed(method, q, k, v, proj, lw, ld, scale, window, do)
    fwd_fn, _ = build(method, q, k, v, proj, lw, ld, scale, window)
    with torch.no_grad():
        fwd = time_ms(fwd_fn, device)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v, lw, ld)]
    fb_fn, params = build(method, *leaves[:3], proj, leaves[3], leaves[4], scale, window)
    do = torch.randn(B, T, H, D, device=device, dtype=dtype)
    do_t = do.transpose(1, 2).contiguous() if method == "sdpa" else do

    def step():
        o = fb_fn()
        torch.autograd.backward(o, do_t)
        for p in params:
            p.grad = None

    fb = time_ms(step, device)
    return fwd, fb


def ceilings(device):
    """Measured copy bandwidth (bytes read + written) and bf16 matmul rate."""
    import triton.testing

    x = torch.empty(2**28, dtype=torch.bfloat16, device=device)  # 512 MiB
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    bw = 2 * x.numel() * 2 / (ms * 1e-3) / 1e12
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ a, return_mode="median")
    tf = 2 * 8192**3 / (ms * 1e-3) / 1e12
    return {"copy_TBps": round(bw, 2), "bf16_matmul_TFLOPs": round(tf, 1)}


def tune(args):
    """Fused op only: launch-config variants at long T, and a per-kernel breakdown (torch profiler)."""
    device = "cuda"
    variants = [("default", {}), ("L=32", {"L": 32}), ("warps=4", {"warps": 4})]
    shapes = [(16, 64, 65536), (32, 128, 32768)]
    out = []
    for H, D, T in shapes:
        for name, var in variants:
            tdj.TUNE.update({"warps": var.get("warps"), "stages": var.get("stages")})
            tdj.SEGMENT_CHUNKS_OVERRIDE = var.get("L")
            try:
                f, b = bench_one("fused", 1, T, H, D, D, torch.bfloat16, device)
            except Exception as exc:  # a config that does not compile (e.g. out of shared memory)
                f, b = str(exc)[:60], ""
            out.append({"H": H, "D": D, "T": T, "variant": name, "fwd": f, "fwdbwd": b})
            print(json.dumps(out[-1]), flush=True)
    tdj.TUNE.update({"warps": None, "stages": None})
    tdj.SEGMENT_CHUNKS_OVERRIDE = None
    # kernel breakdown (GPU time per kernel) and host time per call, 16x64 at 4k and 64k
    from torch.profiler import ProfilerActivity, profile

    for T in (4096, 65536):
        q, k, v, proj, lw, ld = make(1, T, 16, 64, 64, torch.bfloat16, device)
        leaves = [x.detach().requires_grad_(True) for x in (q, k, v, lw, ld)]
        do = torch.randn_like(q)

        def step():
            o = tdj.fused_dijiang_attention(*leaves[:3], proj, leaves[3], leaves[4])[0]
            o.backward(do)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            step()
        host = (time.perf_counter() - t0) / 20 * 1e3
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 20 * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(f"T={T}: host (launch) ms per fwd+bwd call {host:.3f}, wall incl. sync {wall:.3f}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


def fmt(x):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default=None, help="HxD list, e.g. 16x64,32x128")
    ap.add_argument("--lengths", default=None, help="T list, e.g. 1024,4096")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--quadratic-max", type=int, default=8192)
    ap.add_argument("--torch-max", type=int, default=65536)
    ap.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="softmax window of the window method")
    ap.add_argument("--md", default=None, help="write the markdown report here (default: print only)")
    ap.add_argument("--png", default=None, help="plot path (default: --md with .png)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-write", action="store_true", help="print only, even with --md")
    ap.add_argument("--tune", action="store_true", help="time fused-kernel launch variants and a kernel breakdown")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="CUDA only: replay each op from CUDA graphs (forward; forward+backward through "
                         "torch.cuda.make_graphed_callables), i.e. GPU time without Python launch overhead")
    args = ap.parse_args(argv)
    if args.tune:
        return tune(args)
    device = args.device
    cuda = device == "cuda"
    if args.cuda_graphs and not cuda:
        ap.error("--cuda-graphs needs --device cuda")
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    else:
        shapes = [(16, 64), (32, 128)] if cuda else [(2, 16)]
    if args.lengths:
        lengths = [int(x) for x in args.lengths.split(",")]
    else:
        lengths = [1024, 2048, 4096, 8192, 16384, 32768, 65536] if cuda else [128, 256, 512]
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    if any(m in WITH_SINKS for m in methods) and args.window <= SINKS:
        ap.error(f"{', '.join(m for m in methods if m in WITH_SINKS)} need --window > {SINKS} (a window of "
                 f"W - {SINKS} tokens beside {SINKS} sinks)")
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    for H, D in shapes:
        for T in lengths:
            row = {"H": H, "D": D, "T": T}
            for meth in methods:
                if meth == "quadratic" and T > args.quadratic_max or meth in ("torch", "window") and T > args.torch_max:
                    row[meth] = (None, None)
                    continue
                try:
                    row[meth] = bench_one(meth, 1, T, H, D, D, dtype, device, args.window, args.cuda_graphs)
                except torch.OutOfMemoryError:
                    row[meth] = ("OOM", "OOM")
                    torch.cuda.empty_cache()
                if cuda:
                    torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)

    fused_label = "fused (Triton)" if cuda else "fused (CPU: torch fallback)"
    labels = {"sdpa": "SDPA causal" + (" (flash)" if cuda else ""), "fused": fused_label,
              "torch": "torch chunk + separate map", "quadratic": "official quadratic",
              "window": f"window-{args.window} hybrid (torch chunk + map)",
              "window-fused": f"window-{args.window} hybrid ({'Triton' if cuda else 'CPU: torch op'})",
              "window-sinks": f"window-{args.window - SINKS} + {SINKS} sinks ({'Triton' if cuda else 'CPU: torch op'})",
              "window-gated": f"window-{args.window - SINKS} + {SINKS} sinks, per-token decay "
                              f"({'Triton' if cuda else 'CPU: torch op'})",
              "window-gated-torch": f"window-{args.window - SINKS} + {SINKS} sinks, per-token decay (torch op)"}
    versus = [m for m in VERSUS_SDPA if m in methods] if "sdpa" in methods else []
    head = "| H x D | T | " + " | ".join(f"{labels[m]} fwd / fwd+bwd" for m in methods)
    head += "".join(f" | {labels[m]} speed-up vs SDPA, fwd / fwd+bwd" for m in versus)
    head += " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [f"{r['H']} x {r['D']}", f"{r['T'] // 1024}k" if r["T"] >= 1024 else str(r["T"])]
        for meth in methods:
            f, b = r[meth]
            cells.append(f"{fmt(f)} / {fmt(b)}")
        for meth in versus:
            (sf, sb), (ff, fb) = r["sdpa"], r[meth]
            if all(isinstance(x, float) for x in (sf, sb, ff, fb)):
                cells.append(f"{sf / ff:.2f}x / {sb / fb:.2f}x")
            else:
                cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print()
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.no_write or args.md is None:
        return rows
    png = args.png or str(Path(args.md).with_suffix(".png"))
    dev_name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    extra = ""
    if cuda:
        try:
            extra = f"\nMeasured ceilings on this device: {json.dumps(ceilings(device))}\n"
        except Exception as exc:  # pragma: no cover
            extra = f"\n(ceiling measurement failed: {exc})\n"
    cmd = " ".join(["python benchmarks/bench_ops.py"] + (argv if argv is not None else sys.argv[1:]))
    md = f"""# Attention op benchmark

Median milliseconds, B = 1, {str(dtype).replace('torch.', '')}, m = d = D (DiJiang feature-map features),
forward and forward+backward (backward of sum(o * do)); every DiJiang method includes its feature map.
"official quadratic" materialises the [T, T] decay-masked score matrix (run up to {args.quadratic_max}).
"window-{args.window} hybrid" is the in-layer window hybrid's op (exact softmax over the last {args.window} tokens + DiJiang
beyond): "torch chunk + map" is plain PyTorch chunked by the window, "Triton" the banded softmax kernel plus the fused
DiJiang kernel for the keys beyond the window.
{GRAPHS_NOTE if args.cuda_graphs else ""}
- device: {dev_name}
- torch {torch.__version__}{', triton ' + __import__('triton').__version__ if tdj.HAS_TRITON else ''}, python {platform.python_version()}
- date: {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}
- command: `{cmd}`
{extra}
{table}

Plot: `{Path(png).name}` (time vs T, log-log; left forward, right forward+backward).
"""
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text(md)
    try:
        plot(rows, methods, labels, png, dev_name)
    except Exception as exc:  # pragma: no cover - matplotlib missing
        print(f"plot skipped: {exc}")
    return rows


def plot(rows, methods, labels, path, dev_name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    shapes = sorted({(r["H"], r["D"]) for r in rows})
    styles = ["-", "--", ":", "-."]
    colors = {"sdpa": "tab:red", "fused": "tab:blue", "torch": "tab:green", "quadratic": "tab:gray",
              "window": "tab:purple", "window-fused": "tab:orange", "window-sinks": "tab:brown",
              "window-gated": "tab:pink", "window-gated-torch": "tab:olive"}
    for ax, idx, title in ((axes[0], 0, "forward"), (axes[1], 1, "forward + backward")):
        for si, (H, D) in enumerate(shapes):
            for meth in methods:
                pts = [(r["T"], r[meth][idx]) for r in rows if (r["H"], r["D"]) == (H, D)
                       and isinstance(r[meth][idx], float)]
                if pts:
                    ax.plot(*zip(*pts), styles[si % 4], marker="o", ms=3, color=colors.get(meth),
                            label=f"{labels[meth]}, {H}x{D}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (tokens)")
        ax.set_ylabel("median ms")
        ax.set_title(f"{title} ({dev_name}, B=1)")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
