"""The window hybrid's fused kernels in bf16 against the PyTorch window op on the same inputs in float32, with a
per-head decay and with a data-dependent one (the layer's decay_gate: log gamma_t = logsigmoid(decay + u . v_t)):
relative error of the output and of every gradient, by sequence length. Heads from fast to slow decay (log gamma
about -0.13 to -0.0025), window 124 + 4 sinks. What it guards: a per-token decay gradient summed from terms that
cancel over the whole sequence drifts with T in bf16; the kernel's must not. CUDA only.

    python scripts/probe_decay_precision.py --lengths 2048,8192
"""
import argparse

import torch

from dijiang.ops.testing import rel_err as rel, run_window, window_inputs

NAMES = ["q", "k", "v", "log_weight", "decay", "mix", "gate"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="2048,8192")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    print("| T | decay | output | " + " | ".join(f"d {n}" for n in NAMES) + " |")
    print("|---|---|---|" + "---|" * len(NAMES))
    for T in (int(t) for t in args.lengths.split(",")):
        # heads from fast to slow decay; the gate u as tests/test_triton_window.py draws it
        xs = window_inputs(1, T, 3, 64, torch.bfloat16, seed=5)
        u = (0.1 * torch.randn(3, 64, generator=torch.Generator().manual_seed(6))).cuda().requires_grad_()
        for gate in (None, u):
            fused, _, fused_grads = run_window(True, *xs, 124, sinks=4, gate=gate)
            torch_o, _, torch_grads = run_window(False, *xs, 124, upcast=True, sinks=4, gate=gate)
            errs = [rel(a, b) for a, b in zip([fused, *fused_grads], [torch_o, *torch_grads])]
            gated = gate is not None
            cells = [f"{e:.1e}" for e in errs] + ([] if gated else ["-"])
            print(f"| {T} | {'per token' if gated else 'per head'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
