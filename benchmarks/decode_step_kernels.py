"""The GPU kernels of one fast-decode step, per model kind: name, launches per step, microseconds per step.

Runs the decoder's step eagerly (compiled layer functions, no CUDA graph, so the profiler sees each kernel as
launched; a graph replays the same kernels) under torch.profiler and averages over several steps. Shows where
a window-hybrid step spends the time the pure step does not. CUDA only.

    python benchmarks/decode_step_kernels.py --model ~/model/hf --kinds pure,window --out kernels.md
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dijiang.bench import build_models  # noqa: E402
from dijiang.fast_decode import get_decoder  # noqa: E402


def step_kernels(model, context: int, steps: int) -> list[tuple[str, float, float]]:
    """[(kernel name, launches per step, us per step)], most expensive first."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(3, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    ids = ids.cuda()
    mask = torch.ones_like(ids)
    decoder = get_decoder(model, 1, context + 4 * steps + 8, do_sample=False, temperature=1.0, top_p=1.0,
                          use_cuda_graph=False, compile=True, fuse_projections=True)
    decoder.generate(ids, mask, max_new_tokens=4, eos_token_id=None)  # compile
    decoder.prefill(ids, mask, [], 0)
    with torch.no_grad():
        for _ in range(3):
            decoder._step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                decoder._step()
            torch.cuda.synchronize()
    count, total = defaultdict(int), defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            count[event.name] += 1
            total[event.name] += event.time_range.elapsed_us()
    rows = [(name, count[name] / steps, total[name] / steps) for name in count]
    return sorted(rows, key=lambda r: -r[2])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--kinds", default="pure,window")
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    lines = []
    for kind in args.kinds.split(","):
        model = build_models(args.model, [kind], args.window, torch.device("cuda"), torch.bfloat16)[kind]
        rows = step_kernels(model, args.context, args.steps)
        launches, us = sum(r[1] for r in rows), sum(r[2] for r in rows)
        lines += [f"\n## {kind}: {launches:.0f} kernel launches, {us:.0f} us of kernel time per step",
                  "| kernel | launches per step | us per step |", "|---|---|---|"]
        lines += [f"| {name[:90]} | {n:.1f} | {t:.1f} |" for name, n, t in rows[: args.rows]]
        del model
        torch.cuda.empty_cache()
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
