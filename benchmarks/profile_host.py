"""Where the fused DiJiang op spends its time at short T: host (Python, launches, autograd) against GPU.

For each T: median ms from triton's do_bench (forward, forward+backward), host-only ms per call (calls
queued without synchronising), GPU ms per call (CUDA events around a burst with the host far ahead),
and the same for SDPA. Then, at one T, a cProfile of forward+backward calls (host hot spots) and the
per-launch host cost of one small Triton kernel. Prints a report; --out writes it to a file too.

    python benchmarks/profile_host.py --lengths 1024,4096,8192 --profile-t 4096 --out profile.txt
"""

from __future__ import annotations

import argparse
import cProfile
import io
import platform
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

import bench_ops  # noqa: E402
from dijiang.ops import triton_dijiang as tdj  # noqa: E402


def step_fns(method, T, H=16, D=64):
    q, k, v, proj, lw, ld = bench_ops.make(1, T, H, D, D, torch.bfloat16, "cuda")
    scale = D**-0.5
    fwd, _ = bench_ops.build(method, q, k, v, proj, lw, ld, scale)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v, lw, ld)]
    fb, params = bench_ops.build(method, *leaves[:3], proj, leaves[3], leaves[4], scale)
    do = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16)
    do = do.transpose(1, 2).contiguous() if method == "sdpa" else do

    def fwd_nograd():
        with torch.no_grad():
            return fwd()

    def fwd_bwd():
        o = fb()
        torch.autograd.backward(o, do)
        for p in params:
            p.grad = None

    return fwd_nograd, fwd_bwd


def host_and_gpu_ms(fn, n=50):
    """(host ms per call with nothing synchronised, GPU-side ms per call between events of a burst)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    host = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    return host, start.elapsed_time(end) / n


def gpu_only_ms(fn, n=20):
    """GPU time per call: queue a long sleep first so the host is far ahead when the calls start."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(2e9 * 0.05))  # ~50+ ms of GPU spinning, longer than queueing n calls takes
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def launch_cost_us(n=2000):
    """Host microseconds per launch of the small segment-scan kernel (Triton's Python dispatch + driver)."""
    E, bh, nseg = 4096, 16, 4
    seg = torch.zeros(bh, nseg, E, device="cuda")
    ld = torch.full((16,), -0.01, device="cuda")
    args = (seg, seg, seg, ld, ld, nseg * 64, 16, nseg, E, 64)  # ld twice: the per-token totals' slot, unread
    kw = dict(BLK=256, REVERSE=False, HAS_INIT=False, STORE_FINAL=False, TOK=False, num_warps=4)
    grid = (E // 256, bh)
    for _ in range(10):
        tdj._scan_segments[grid](*args, **kw)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        tdj._scan_segments[grid](*args, **kw)
    per = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return per


def internals_report(T, H=16, D=64):
    """Host ms of the kernel drivers called directly (no autograd), and a cProfile of them."""
    q, k, v, proj, lw, ld = bench_ops.make(1, T, H, D, D, torch.bfloat16, "cuda")
    do = torch.randn_like(v)
    cfg = tdj._cfg_for(q, v, proj, D**-0.5, 1e-6, False, 64, True)  # what the public call plans (no state)

    def run():
        spec = tdj._call_spec(cfg, v.dtype, q, k, v, proj, lw, ld) + tdj.tensor_spec(do, None)
        o, den, states, _ = tdj._forward(q, k, v, proj, lw, ld, None, cfg, False, v.dtype, spec)
        tdj._backward(q, k, v, proj, lw, ld, None, den, states, do, None, None, cfg, False, spec)

    host, gpu = host_and_gpu_ms(run)
    return (f"\nkernel drivers without autograd, T={T}: host {host:.3f} ms per fwd+bwd, GPU {gpu:.3f} ms\n"
            + cprofile_table(run, rows=16))


class _EmptyOp(torch.autograd.Function):
    """An autograd Function that allocates its output and gradients and launches nothing: the engine's own cost."""

    @staticmethod
    def forward(ctx, q, k, v, lw, ld):
        return torch.empty_like(v)

    @staticmethod
    def backward(ctx, do):
        return tuple(torch.empty_like(x) for x in (do, do, do)) + (None, None)


def breakdown_report(T, H=16, D=64):
    """Host us of each piece of one fused forward+backward call, at a T short enough that the GPU keeps up."""
    q, k, v, proj, lw, ld = bench_ops.make(1, T, H, D, D, torch.bfloat16, "cuda")
    do = torch.randn_like(v)
    cfg = tdj._cfg_for(q, v, proj, D**-0.5, 1e-6, False, 64, True)  # what the public call plans (no state)
    spec = tdj._call_spec(cfg, v.dtype, q, k, v, proj, lw, ld)
    o, den, states, _ = tdj._forward(q, k, v, proj, lw, ld, None, cfg, False, v.dtype, spec)
    seg = tdj._segments_of(states.clone(), cfg)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v, lw, ld)]
    n_fwd, n_bwd = (2, 2) if cfg.inline else (3, 3)

    def scan():
        tdj._scan(seg, None, None, ld, cfg, False, spec)

    def fwd_bwd_fused():
        out = tdj.fused_dijiang_attention(*leaves[:3], proj, leaves[3], leaves[4])[0]
        torch.autograd.backward(out, do)
        for x in leaves:
            x.grad = None

    def fwd_bwd_empty():
        torch.autograd.backward(_EmptyOp.apply(*leaves), do)
        for x in leaves:
            x.grad = None

    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_(True) for x in (q, k, v))
    do_t = do.transpose(1, 2).contiguous()

    def fwd_bwd_sdpa():
        torch.autograd.backward(bench_ops.causal_sdpa(qt, kt, vt), do_t)
        for x in (qt, kt, vt):
            x.grad = None

    def fwd_grad_only():
        tdj.fused_dijiang_attention(*leaves[:3], proj, leaves[3], leaves[4])

    def fwd_nograd():
        with torch.no_grad():
            tdj.fused_dijiang_attention(q, k, v, proj, lw, ld)

    pieces = [
        ("torch.empty f32 [BH, NC, E]", lambda: torch.empty(H, cfg.NC, cfg.E, device="cuda")),
        ("torch.empty_like(q)", lambda: torch.empty_like(q)),
        ("proj.float().contiguous()", lambda: proj.float().contiguous()),
        ("_Cfg(...)", lambda: tdj._Cfg(q, v, proj, D**-0.5, 1e-6, False, 64, True)),
        ("_cfg_for(...) (cached _Cfg)", lambda: tdj._cfg_for(q, v, proj, D**-0.5, 1e-6, False, 64, True)),
        ("_call_spec(...)", lambda: tdj._call_spec(cfg, v.dtype, q, k, v, proj, lw, ld)),
        ("one direct launch (scan kernel)", scan),
        (f"_forward ({n_fwd} launches + buffers)",
         lambda: tdj._forward(q, k, v, proj, lw, ld, None, cfg, False, v.dtype, spec)),
        (f"_backward ({n_bwd} launches + buffers)",
         lambda: tdj._backward(q, k, v, proj, lw, ld, None, den, states, do, None, None, cfg, False, spec)),
        ("fused_dijiang_attention, no grad", fwd_nograd),
        ("fused_dijiang_attention, graph recorded", fwd_grad_only),
        ("fused fwd+bwd (autograd)", fwd_bwd_fused),
        ("empty autograd Function fwd+bwd (engine only)", fwd_bwd_empty),
        ("SDPA fwd+bwd (autograd)", fwd_bwd_sdpa),
    ]
    lines = [f"\n## Host us per call, T={T}, 16 x 64 (GPU work shorter than the host's)", "| piece | host us |",
             "|---|---|"]
    for name, fn in pieces:
        host_ms, _ = host_and_gpu_ms(fn, n=500 if "fwd+bwd" in name else 2000)
        lines.append(f"| {name} | {host_ms * 1e3:.1f} |")
    return "\n".join(lines)


def backward_path_report(T=256, H=16, D=64, calls=300, device="cuda"):
    """Where the host time of one forward+backward goes, by timestamps: the forward call (main thread), the
    engine handing over to our backward (autograd's device thread), our backward's body and its kernel driver,
    the engine's work after it (gradient accumulation), back on the main thread. The same for an empty
    autograd Function. Medians in us, T short enough that the GPU keeps up."""
    q, k, v, proj, lw, ld = bench_ops.make(1, T, H, D, D, torch.bfloat16, device)
    do = torch.randn_like(v)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v, lw, ld)]
    marks: dict = {}
    clock = time.perf_counter_ns

    def timed(fn, enter, leave):
        def wrapper(*args, **kwargs):
            marks[enter] = clock()
            out = fn(*args, **kwargs)
            marks[leave] = clock()
            return out
        return wrapper

    real_bwd, real_driver = tdj._FusedDiJiang.backward, tdj._backward
    real_empty = _EmptyOp.backward
    rows = {}
    try:
        tdj._FusedDiJiang.backward = staticmethod(timed(real_bwd, "bwd_in", "bwd_out"))
        tdj._backward = timed(real_driver, "drv_in", "drv_out")
        _EmptyOp.backward = staticmethod(timed(real_empty, "bwd_in", "bwd_out"))
        for name, op in (("fused", lambda: tdj.fused_dijiang_attention(*leaves[:3], proj, leaves[3], leaves[4])[0]),
                         ("empty Function", lambda: _EmptyOp.apply(*leaves))):
            spans = []
            for i in range(calls + 20):
                marks.clear()
                t0 = clock()
                out = op()
                t1 = clock()
                torch.autograd.backward(out, do)
                t2 = clock()
                for x in leaves:
                    x.grad = None
                del out
                t3 = clock()
                if i >= 20:
                    drv = marks["drv_out"] - marks["drv_in"] if "drv_in" in marks else 0
                    spans.append((t1 - t0, marks["bwd_in"] - t1, marks["bwd_out"] - marks["bwd_in"] - drv, drv,
                                  t2 - marks["bwd_out"], t3 - t2, t3 - t0))
            rows[name] = [sorted(col)[len(col) // 2] / 1e3 for col in zip(*spans)]
    finally:
        tdj._FusedDiJiang.backward, tdj._backward, _EmptyOp.backward = (staticmethod(real_bwd), real_driver,
                                                                         staticmethod(real_empty))
    if device == "cuda":
        torch.cuda.synchronize()
    heads = ["forward call", "engine -> our backward", "backward body (no driver)", "kernel driver _backward",
             "after our backward -> main", "grads = None", "total"]
    lines = [f"\n## One forward+backward by timestamps, T={T}, 16 x 64, median us of {calls} calls",
             "| piece | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for j, head in enumerate(heads):
        lines.append(f"| {head} | " + " | ".join(f"{rows[n][j]:.1f}" for n in rows) + " |")
    return "\n".join(lines)


def cprofile_table(fn, rows, calls=100):
    """cProfile of `calls` calls of fn (main thread only), sorted by own time."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(rows)
    return buf.getvalue()


def torch_profile_report(fn, label):
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=32)
    return f"\n## torch profiler, {label}, 10 calls (all threads, sorted by self CPU time)\n{table}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,4096,8192")
    ap.add_argument("--methods", default="sdpa,fused")
    ap.add_argument("--profile-t", type=int, default=4096)
    ap.add_argument("--out", default=None)
    ap.add_argument("--breakdown-only", action="store_true", help="only the per-piece host table (T=256 and 1024)")
    ap.add_argument("--backward-path", action="store_true",
                    help="only the timestamps of one forward+backward (forward, engine hand-over, backward body)")
    args = ap.parse_args(argv)
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    import triton
    import triton.testing

    say(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"python {platform.python_version()}, {platform.processor() or platform.machine()}")
    if args.backward_path:
        say(backward_path_report())
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")
        return
    if args.breakdown_only:
        for T in (256, 1024):
            say(breakdown_report(T))
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")
        return
    say("| method | T | do_bench fwd | do_bench fwd+bwd | host fwd | host fwd+bwd | GPU fwd | GPU fwd+bwd |")
    say("|---|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        for T in (int(x) for x in args.lengths.split(",")):
            f, fb = step_fns(method, T)
            bf = triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")
            bfb = triton.testing.do_bench(fb, warmup=25, rep=100, return_mode="median")
            hf, _ = host_and_gpu_ms(f)
            hfb, _ = host_and_gpu_ms(fb)
            gf, gfb = gpu_only_ms(f), gpu_only_ms(fb)
            say(f"| {method} | {T} | {bf:.3f} | {bfb:.3f} | {hf:.3f} | {hfb:.3f} | {gf:.3f} | {gfb:.3f} |")
    say(f"\nTriton dispatch, host us per launch of _scan_segments: {launch_cost_us():.1f}")
    say(internals_report(args.profile_t))
    say(breakdown_report(256))
    for method in args.methods.split(","):
        _, fb = step_fns(method, args.profile_t)
        table = cprofile_table(fb, rows=28)
        say(torch_profile_report(fb, f"{method} T={args.profile_t} fwd+bwd"))
        say(f"\n## cProfile (main thread only: the backward runs on autograd's device thread), {method}, "
            f"T={args.profile_t}, 100 fwd+bwd calls (sorted by own time)")
        say(table)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
