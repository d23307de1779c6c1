"""GPU time of one window-hybrid decode step's attention kernel (``dijiang.ops.triton_window_decode``), per launch,
replayed from a CUDA graph of 50 launches (no host cost), for a few launch configurations. CUDA only.

    python benchmarks/bench_window_decode.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dijiang.ops import triton_window_decode as twd  # noqa: E402


def inputs(B, H, d, W, dtype=torch.bfloat16):
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to("cuda", dtype)  # noqa: E731
    q, k, v, qf, kf = rnd(B, H, d), rnd(B, H, d), rnd(B, H, d), rnd(B, H, d).softmax(-1), rnd(B, H, d).softmax(-1)
    state = {"k": rnd(B, W, H, d), "v": rnd(B, W, H, d), "kf": rnd(B, W, H, d).softmax(-1),
             "mask": torch.ones(B, W, dtype=torch.bool, device="cuda"),
             "S": torch.rand(B, H, d, d + 1, device="cuda")}
    ring = torch.zeros(1, dtype=torch.long, device="cuda")
    decay, lw = torch.full((H,), 0.99, device="cuda"), torch.ones(H, device="cuda")
    return q, k, v, qf, kf, state, ring, decay, lw


def graph_us(step, launches=50, replays=20) -> float:
    """GPU microseconds per call of `step`, replayed from one CUDA graph of `launches` calls."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            step()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (launches * replays)


def us_per_launch(B, H, d, W, warps) -> float:
    """The kernel plus the tiny ring.add_ that moves its slot."""
    twd.NUM_WARPS = warps
    q, k, v, qf, kf, state, ring, decay, lw = inputs(B, H, d, W)

    def step():
        twd.window_decode_step(q, k, v, qf, kf, state, ring, decay, lw, scale=d**-0.5)
        ring.add_(1)

    return graph_us(step)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; us per launch (+ one ring.add_), bf16")
    print("| B | H | d = m = dv | W | warps | us |")
    print("|---|---|---|---|---|---|")
    for B in (1, 16):
        for W in (64, 128):
            for warps in (1, 2, 4, 8):
                us = us_per_launch(B, 9, 64, W, warps)
                rows.append(dict(B=B, H=9, d=64, W=W, warps=warps, us=us))
                print(f"| {B} | 9 | 64 | {W} | {warps} | {us:.2f} |", flush=True)
    twd.NUM_WARPS = 4
    ring = torch.zeros(1, dtype=torch.long, device="cuda")
    floor = graph_us(lambda: ring.add_(1))  # the same graph with only the ring counter: the floor of a launch
    print(f"\nfloor (ring.add_ alone): {floor:.2f} us per launch")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "floor_us": floor}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
