"""The window hybrid's fused kernels in bf16 against the PyTorch window op on the same inputs in float32, with a
per-head decay and with a data-dependent one (the layer's decay_gate: log gamma_t = logsigmoid(decay + u . v_t)):
relative error of the output and of every gradient, by sequence length. Heads from fast to slow decay (log gamma
about -0.13 to -0.0025), window 124 + 4 sinks. What it guards: a per-token decay gradient summed from terms that
cancel over the whole sequence drifts with T in bf16; the kernel's must not. CUDA only.

    python scripts/probe_decay_precision.py --lengths 2048,8192
"""
import argparse

import torch
import torch.nn.functional as F

from dijiang.ops import window_attention
from dijiang.ops.triton_dijiang import dijiang_feature_map
from dijiang.ops.triton_window import fused_window_attention

NAMES = ["q", "k", "v", "log_weight", "decay", "mix", "gate"]


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def inputs(T, H=3, d=64, seed=5):
    gen = torch.Generator().manual_seed(seed)
    bf16 = dict(dtype=torch.bfloat16, device="cuda")
    q = (torch.randn(1, T, H, d, generator=gen) * 2).to(**bf16).requires_grad_()
    k = (torch.randn(1, T, H, d, generator=gen) * 2).to(**bf16).requires_grad_()
    v = torch.randn(1, T, H, d, generator=gen).to(**bf16).requires_grad_()
    proj = torch.randn(d, d, generator=gen).cuda()
    log_weight = (0.3 * torch.randn(H, d, generator=gen)).cuda().requires_grad_()
    decay_raw = torch.linspace(2.0, 6.0, H).cuda().requires_grad_()
    mix_raw = torch.randn(H, generator=gen).cuda().requires_grad_()
    gate = (0.1 * torch.randn(H, d, generator=torch.Generator().manual_seed(seed + 1))).cuda().requires_grad_()
    return q, k, v, proj, log_weight, decay_raw, mix_raw, gate


def grads(fused, q, k, v, proj, log_weight, decay_raw, mix_raw, gate, gated):
    leaves = [q, k, v, log_weight, decay_raw, mix_raw] + ([gate] if gated else [])
    xs = [q, k, v] if fused else [x.float() for x in (q, k, v)]
    decay = decay_raw + torch.einsum("bthd,hd->bth", xs[2].float(), gate) if gated else decay_raw
    args = (F.logsigmoid(decay), F.softplus(mix_raw))
    if fused:
        o, _ = fused_window_attention(*xs, proj, log_weight, *args, window=124, sinks=4)
    else:
        qf, kf = (dijiang_feature_map(x, proj, log_weight, q.shape[-1] ** -0.5) for x in xs[:2])
        o, _ = window_attention(*xs, qf, kf, *args, window=124, mode="chunk", sinks=4)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(7)).cuda()
    return [o.detach().float()] + list(torch.autograd.grad((o.float() * do).sum(), leaves))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="2048,8192")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    print("| T | decay | output | " + " | ".join(f"d {n}" for n in NAMES) + " |")
    print("|---|---|---|" + "---|" * len(NAMES))
    for T in (int(t) for t in args.lengths.split(",")):
        xs = inputs(T)
        for gated in (False, True):
            errs = [rel(a, b) for a, b in zip(grads(True, *xs, gated), grads(False, *xs, gated))]
            cells = [f"{e:.1e}" for e in errs] + ([] if gated else ["-"])
            print(f"| {T} | {'per token' if gated else 'per head'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
