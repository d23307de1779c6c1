"""`dijiang bench`: model-level speed and memory, teacher vs converted (pure and window hybrid).

Measures, per model kind x batch x context: prefill tokens/s (normal forward, chunk form), decode tokens/s
through HF ``generate`` and through ``dijiang.fast_decode`` (static state, CUDA graph), peak memory
(``torch.cuda.max_memory_allocated`` on GPU) and the decode cache size (state or KV bytes); then training
throughput (forward + backward + AdamW step, bf16 autocast on GPU). Timings are medians after warm-up, with
CUDA events on GPU. Writes a markdown report (table, device, torch version, date, command) and a plot.
Tokens/s count every row of the batch.
"""
from __future__ import annotations

import datetime
import json
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

KINDS = ("teacher", "pure", "window")


# ----------------------------------------------------------------------------------------------- timing

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn, device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_time(fn, device, repeats: int = 3, warmup: int = 1, budget_s: float = 20.0) -> float:
    """Median seconds of `fn` over up to `repeats` runs after `warmup` runs; stops early past `budget_s`."""
    spent = 0.0
    for _ in range(warmup):
        spent += _time_once(fn, device)
    times = []
    for _ in range(repeats):
        times.append(_time_once(fn, device))
        spent += times[-1]
        if spent > budget_s:
            break
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------- models

def tiny_llama(seed: int = 0, vocab: int = 97):
    """A tiny random Llama (no download), for the CPU smoke run and tests."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0,
                                      eos_token_id=1, bos_token_id=2)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def build_models(name: str, kinds, window: int, device, dtype):
    """{kind: model} sharing nothing (each kind converts its own copy)."""
    import copy

    import dijiang

    if name == "tiny":
        base = tiny_llama()
    else:
        base, _ = dijiang.load_pretrained(name, dtype=torch.float32)
    models = {}
    for kind in kinds:
        model = copy.deepcopy(base) if kind != kinds[-1] else base
        if kind == "pure":
            dijiang.convert(model)
        elif kind == "window":
            dijiang.convert(model, dict(window=window))
        elif kind != "teacher":
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        models[kind] = model.to(device=device, dtype=dtype).eval()
    return models


def cache_bytes(cache) -> int:
    """Bytes of a generation cache: DiJiang states plus softmax keys/values."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "state_bytes"):
            total += layer.state_bytes()
        else:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


def _peak(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _is_oom(error: Exception) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


# ----------------------------------------------------------------------------------------------- measurements

@torch.no_grad()
def measure_inference(model, kind, batch, context, *, new_tokens, hf_new_tokens, device, vocab, repeats,
                      check_tokens: bool) -> dict:
    from dijiang.fast_decode import get_decoder
    from dijiang.hf_compat import output_cache

    gen = torch.Generator().manual_seed(1000 * batch + context)
    ids = torch.randint(3, vocab, (batch, context), generator=gen).to(device)
    mask = torch.ones_like(ids)
    row = dict(kind=kind, batch=batch, context=context)

    def prefill():
        return model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)

    _reset_peak(device)
    t_prefill = median_time(prefill, device, repeats=repeats)
    row["prefill_tok_s"] = batch * context / t_prefill
    row["prefill_peak_gib"] = _peak(device)
    row["cache_mib"] = cache_bytes(output_cache(prefill())) / 2**20

    hf_tokens = None
    if hf_new_tokens > 1:
        holder = {}

        def hf_generate(n):
            def run():
                holder[n] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                           do_sample=False, pad_token_id=0)
            return run

        _reset_peak(device)
        t_many = median_time(hf_generate(hf_new_tokens), device, repeats=max(1, repeats - 1), warmup=1)
        row["hf_peak_gib"] = _peak(device)
        t_one = median_time(hf_generate(1), device, repeats=max(1, repeats - 1), warmup=0)
        hf_tokens = holder[hf_new_tokens][:, context:]
        row["hf_decode_tok_s"] = batch * (hf_new_tokens - 1) / max(t_many - t_one, 1e-9)
        del holder

    compile_step = None if kind != "teacher" else False  # teacher: CUDA graph only (saves compile time)
    decoder = get_decoder(model, batch, context + new_tokens, do_sample=False, temperature=1.0, top_p=1.0,
                          use_cuda_graph=True, compile=compile_step, fuse_projections=True)
    t0 = time.perf_counter()
    fast = decoder.generate(ids, mask, max_new_tokens=min(4, new_tokens), eos_token_id=None)  # capture/compile
    row["fast_setup_s"] = time.perf_counter() - t0
    steps = new_tokens - 1

    def fast_decode():
        decoder.decode(steps)

    times = []
    for _ in range(max(1, repeats)):
        decoder.prefill(ids, mask, [], 0)
        _reset_peak(device)
        times.append(_time_once(fast_decode, device))
    row["fast_decode_tok_s"] = batch * steps / statistics.median(times)
    row["fast_decode_peak_gib"] = _peak(device)
    if check_tokens and hf_tokens is not None:
        fast = decoder.generate(ids, mask, max_new_tokens=hf_new_tokens, eos_token_id=None)[:, context:]
        same = (fast == hf_tokens).cumprod(dim=1).sum(dim=1)  # leading tokens equal, per row
        row["greedy_match"] = f"{int(same.min())}/{hf_new_tokens}"
    return row


def measure_training(model, kind, context, tokens_per_step, *, device, vocab, repeats) -> dict:
    batch = max(1, tokens_per_step // context)
    gen = torch.Generator().manual_seed(context)
    ids = torch.randint(3, vocab, (batch, context), generator=gen).to(device)
    master = {p: p.detach().clone() for p in model.parameters()}  # restore afterwards: bench must not train
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()

    def step():
        with autocast:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    _reset_peak(device)
    try:
        t = median_time(step, device, repeats=repeats, warmup=2)
        row = dict(kind=kind, context=context, batch=batch, train_tok_s=batch * context / t,
                   train_peak_gib=_peak(device))
    finally:
        model.eval()
        del optimizer
        with torch.no_grad():
            for p, value in master.items():
                p.copy_(value)
                p.grad = None
    return row


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------------------------- report

def _fmt(value, digits=0):
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def inference_table(rows, teacher_hf: dict) -> str:
    lines = ["| model | batch | context | prefill tok/s | HF generate decode tok/s | fast decode tok/s | "
             "fast vs teacher HF | peak GiB prefill | peak GiB HF generate | peak GiB fast decode | "
             "cache MiB | greedy match |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kind']} | {r['batch']} | {r['context']} | {r['error']} |||||||||")
            continue
        ref = teacher_hf.get((r["batch"], r["context"]))
        ratio = f"{r['fast_decode_tok_s'] / ref:.1f}x" if ref else "-"
        lines.append(
            f"| {r['kind']} | {r['batch']} | {r['context']} | {_fmt(r.get('prefill_tok_s'))} | "
            f"{_fmt(r.get('hf_decode_tok_s'), 1)} | {_fmt(r.get('fast_decode_tok_s'))} | {ratio} | "
            f"{_fmt(r.get('prefill_peak_gib'), 2)} | {_fmt(r.get('hf_peak_gib'), 2)} | "
            f"{_fmt(r.get('fast_decode_peak_gib'), 2)} | {_fmt(r.get('cache_mib'), 2)} | "
            f"{r.get('greedy_match', '-')} |")
    return "\n".join(lines)


def training_table(rows) -> str:
    lines = ["| model | context | batch | train tok/s (fwd+bwd+AdamW) | peak GiB |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kind']} | {r['context']} | {r.get('batch', '-')} | {r['error']} | - |")
        else:
            lines.append(f"| {r['kind']} | {r['context']} | {r['batch']} | {_fmt(r['train_tok_s'])} | "
                         f"{_fmt(r['train_peak_gib'], 2)} |")
    return "\n".join(lines)


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
    teacher_hf = {(r["batch"], r["context"]): r.get("hf_decode_tok_s") for r in inference_rows
                  if r["kind"] == "teacher" and "error" not in r}
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
        "## Inference",
        "",
        inference_table(inference_rows, teacher_hf),
        "",
        "## Training throughput",
        "",
        training_table(training_rows) if training_rows else "(not measured)",
        "",
        f"![tokens/s and memory vs context]({meta['png_name']})",
        "",
    ])
    path.write_text(text)
    return text


# ----------------------------------------------------------------------------------------------- driver

def run(args) -> int:
    import transformers

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    kinds = [k for k in args.kinds.split(",") if k]
    contexts, batches, train_contexts = args.contexts, args.batches, args.train_contexts
    big_contexts = args.batch_contexts or contexts
    t_start = time.perf_counter()
    report_paths(args)
    if args.from_json:
        return report_from_json(args)
    models = build_models(args.model, kinds, args.window, device, dtype)
    vocab = next(iter(models.values())).config.vocab_size
    print(f"models ready in {time.perf_counter() - t_start:.0f}s on {device}", flush=True)

    inference_rows, training_rows = [], []
    for kind in kinds:
        for batch in batches:
            ctx_list = contexts if batch == min(batches) else big_contexts
            for i, context in enumerate(ctx_list):
                try:
                    row = measure_inference(models[kind], kind, batch, context, new_tokens=args.new_tokens,
                                            hf_new_tokens=args.hf_new_tokens, device=device, vocab=vocab,
                                            repeats=args.repeats, check_tokens=(i == 0 or context == ctx_list[-1]))
                except Exception as error:  # OOM or a failing path: report it in the table
                    if not _is_oom(error) and not args.keep_going:
                        raise
                    row = dict(kind=kind, batch=batch, context=context,
                               error=("OOM" if _is_oom(error) else f"{type(error).__name__}: {error}"[:120]))
                    _reset_peak(device)
                inference_rows.append(row)
                print(json.dumps(row), flush=True)
        models[kind].__dict__.pop("_dijiang_fast_decoders", None)
        _reset_peak(device)
    for kind in kinds:
        for context in train_contexts:
            try:
                row = measure_training(models[kind], kind, context, args.train_tokens, device=device, vocab=vocab,
                                       repeats=args.repeats)
            except Exception as error:
                if not _is_oom(error) and not args.keep_going:
                    raise
                row = dict(kind=kind, context=context,
                           error=("OOM" if _is_oom(error) else f"{type(error).__name__}: {error}"[:120]))
                _reset_peak(device)
            training_rows.append(row)
            print(json.dumps(row), flush=True)

    out, png = report_paths(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    meta = dict(device=device_name, torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(), date=datetime.datetime.now().isoformat(timespec="minutes"),
                model=args.model, dtype=str(dtype).replace("torch.", ""), window=args.window,
                command=args.command or _command_line(),
                new_tokens=args.new_tokens, hf_new_tokens=args.hf_new_tokens, png_name=png.name)
    plot(inference_rows, png)
    text = write_report(out, inference_rows, training_rows, meta)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(meta=meta, inference=inference_rows, training=training_rows),
                                              indent=1))
    print(text)
    print(f"total {time.perf_counter() - t_start:.0f}s; wrote {out} and {png}")
    return 0


def _command_line() -> str:
    argv = sys.argv[1:]
    if argv[:1] == ["bench"]:  # run as `dijiang bench ...` / `python -m dijiang bench ...`
        argv = argv[1:]
    return "dijiang bench " + " ".join(shlex.quote(a) for a in argv)


def _label_window(row: dict, meta: dict) -> dict:
    if row.get("kind") == "window" and meta.get("window") is not None:
        return {**row, "kind": f"window{meta['window']}"}
    return row


def report_from_json(args) -> int:
    """Merge the JSON of several runs (e.g. device calls split by batch size) into one report and plot."""
    from dijiang.files import read_json

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


DEFAULT_REPORT = "runs/bench/bench_model.md"  # not docs/: a casual run must not replace the measured report


def report_paths(args) -> tuple[Path, Path]:
    """(report, plot) paths; ValueError when one (or --json) exists and --overwrite was not given."""
    from dijiang.files import refuse_to_replace

    out = Path(args.out)
    png = Path(args.png) if args.png else out.with_suffix(".png")
    for path in (out, png, *([Path(args.json)] if args.json else [])):
        refuse_to_replace(path, args.overwrite, "bench output")
    return out, png


def add_arguments(parser) -> None:
    from dijiang.arguments import int_list, non_negative_int, positive_int

    contexts = int_list(positive_int)
    parser.add_argument("--model", default="smollm2", help="embedded name, dir or .gguf; 'tiny' = random tiny Llama")
    parser.add_argument("--kinds", default="teacher,pure,window",
                        help="comma-separated models to time: teacher (softmax), pure (DiJiang), window (hybrid)")
    parser.add_argument("--contexts", type=contexts, default="1024,2048,4096,8192,16384,32768",
                        help="comma-separated prompt lengths in tokens")
    parser.add_argument("--batches", type=contexts, default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--batch-contexts", type=contexts, default="2048,8192,32768",
                        help="contexts for batches other than the smallest (default 2048,8192,32768)")
    parser.add_argument("--new-tokens", type=positive_int, default=128, help="new tokens on the fast path")
    parser.add_argument("--hf-new-tokens", type=non_negative_int, default=16,
                        help="new tokens through HF generate (0: skip)")
    parser.add_argument("--train-contexts", type=contexts, default="2048,16384",
                        help="comma-separated sequence lengths of the training-step timings")
    parser.add_argument("--train-tokens", type=positive_int, default=16384, help="tokens per training step")
    parser.add_argument("--window", type=positive_int, default=64, help="exact-softmax window of the 'window' hybrid")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="timed repeats per measurement (the median is kept)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                        help="weights dtype (default: bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--out", default=DEFAULT_REPORT, help=f"markdown report (default {DEFAULT_REPORT})")
    parser.add_argument("--overwrite", action="store_true", help="replace the report, plot or JSON if they exist")
    parser.add_argument("--png", default=None, help="plot path (default: --out with .png)")
    parser.add_argument("--json", default=None, help="also write every number as JSON here")
    parser.add_argument("--from-json", default=None, help="comma-separated JSON files of earlier runs: only report")
    parser.add_argument("--command", default=None, help="command line to record in the report")
    parser.add_argument("--keep-going", action="store_true", help="record errors in the table instead of stopping")


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("bench")
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="bench_model", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
