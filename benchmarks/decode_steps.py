"""Per-step timings of the fast decode path: where one decode call's time goes.

`dijiang bench` reports tokens/s of a whole `decode(steps)` call after a prefill. Its rate rose with the number
of new tokens (1,051 tok/s at 128, 1,199 at 256), which points at a fixed cost per call. This script records a
CUDA event after every graph replay, so the first steps and the steady state can be told apart, and repeats
the call in three situations: right after a prefill (as the bench does), after a prefill and an idle pause,
and a second call straight after the first.

    python benchmarks/decode_steps.py --model ~/model/hf --kind pure --context 2048 --steps 256 --png steps.png
    python benchmarks/decode_steps.py --model tiny --device cpu --steps 8      # the same on CPU (no graph)
    python benchmarks/decode_steps.py --from-json steps.json --png steps.png   # the plot of an earlier run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dijiang.bench import build_models  # noqa: E402
from dijiang.fast_decode import get_decoder  # noqa: E402


@torch.no_grad()
def timed_steps(decoder, steps: int, device) -> dict:
    """GPU ms between the events around each step, host ms per step call, wall ms of the whole call."""
    cuda = device.type == "cuda"
    step = decoder.graph.replay if decoder.graph is not None else decoder._step
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)] if cuda else []
    host = []
    t0 = time.perf_counter()
    if cuda:
        events[0].record()
    for i in range(steps):
        t = time.perf_counter()
        step()
        host.append((time.perf_counter() - t) * 1e3)
        if cuda:
            events[i + 1].record()
    if cuda:
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    gpu = [events[i].elapsed_time(events[i + 1]) for i in range(steps)] if cuda else host
    return {"gpu_ms": gpu, "host_ms": host, "wall_ms": wall}


def summary(name: str, r: dict) -> str:
    g = r["gpu_ms"]
    first = ", ".join(f"{x:.2f}" for x in g[:8])
    return (f"| {name} | {first} | {statistics.median(g):.3f} | {sum(g):.1f} | {r['wall_ms']:.1f} | "
            f"{statistics.median(r['host_ms']) * 1e3:.0f} | {len(g) / (sum(g) / 1e3):.0f} |")


def plot(data: dict, path: Path) -> None:
    """Milliseconds per step against the step index, one line per situation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, run in data["runs"].items():
        ax.plot(range(1, len(run["gpu_ms"]) + 1), run["gpu_ms"], label=name, linewidth=1)
    a = data["args"]
    ax.set_xlabel("decode step")
    ax.set_ylabel("ms per step (CUDA events)" if a["device"] == "cuda" else "ms per step (host)")
    ax.set_title(f"{a['kind']}, batch {a['batch']}, context {a['context']}", fontsize=10)
    ax.set_ylim(0, 1.15 * max(max(run["gpu_ms"]) for run in data["runs"].values()))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="model path or name ('tiny': random 2-layer Llama)")
    ap.add_argument("--kind", default="pure", choices=("teacher", "pure", "window"))
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--pause-s", type=float, default=1.0, help="idle pause before the second situation")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None, help="plot ms per step against the step index")
    ap.add_argument("--from-json", default=None, help="only plot the JSON of an earlier run (needs --png)")
    args = ap.parse_args(argv)
    if args.from_json:
        if not args.png:
            ap.error("--from-json needs --png")
        plot(json.loads(Path(args.from_json).read_text()), Path(args.png))
        return 0
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_models(args.model, [args.kind], args.window, device, dtype)[args.kind]
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.context), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    decoder = get_decoder(model, args.batch, args.context + 2 * args.steps + 8, do_sample=False, temperature=1.0,
                          top_p=1.0, use_cuda_graph=True, compile=None, fuse_projections=True)
    t0 = time.perf_counter()
    decoder.generate(ids, mask, max_new_tokens=4, eos_token_id=None)  # compile and capture
    setup_s = time.perf_counter() - t0

    runs = {}
    decoder.prefill(ids, mask, [], 0)
    runs["right after prefill"] = timed_steps(decoder, args.steps, device)
    runs["second call, no prefill"] = timed_steps(decoder, args.steps, device)
    decoder.prefill(ids, mask, [], 0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    time.sleep(args.pause_s)
    runs[f"after prefill + {args.pause_s:g} s idle"] = timed_steps(decoder, args.steps, device)
    decoder.prefill(ids, mask, [], 0)
    t0 = time.perf_counter()
    decoder.decode(args.steps)  # what the bench times
    if device.type == "cuda":
        torch.cuda.synchronize()
    whole_ms = (time.perf_counter() - t0) * 1e3

    print(f"# {args.kind}, batch {args.batch}, context {args.context}, {args.steps} steps, {device}, "
          f"setup {setup_s:.1f} s")
    print("| situation | first 8 steps, GPU ms | median step ms | sum ms | wall ms | host us/step | tok/s (sum) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        print(summary(name, r))
    print(f"\ndecoder.decode({args.steps}) after a prefill, wall: {whole_ms:.1f} ms "
          f"= {args.batch * args.steps / whole_ms * 1e3:.0f} tok/s")
    data = {"args": vars(args), "setup_s": setup_s, "decode_wall_ms": whole_ms, "runs": runs}
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))
    if args.png:
        plot(data, Path(args.png))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
