"""`dijiang bench`: model-level speed and memory, teacher vs converted (pure and window hybrid).

Measures, per model kind x batch x context: prefill tokens/s (normal forward, chunk form), decode tokens/s
through HF ``generate`` and through ``dijiang.fast_decode`` (static state, CUDA graph), peak memory
(``torch.cuda.max_memory_allocated`` on GPU) and the decode cache size (state or KV bytes); then training
throughput (forward + backward + AdamW step, bf16 autocast on GPU). Timings are medians after warm-up, with
CUDA events on GPU. Prints each row as JSON and then the tables; ``--json`` keeps every number. Tokens/s count
every row of the batch. ``benchmarks/bench_model.py`` runs the same measurement and writes a markdown report and
a plot of it.
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

from dijiang.cache import cache_bytes

KINDS = ("teacher", "pure", "window", "window-sinks", "hedgehog", "hedgehog-torch", "hedgehog-window",
         "hedgehog-window-torch")
# window-sinks: the kind of layer recipes/smollm2-135m.yaml trains (its decay range aside, which changes no work):
# the same softmax keys as `window`, the first SINKS of them sinks (a window of W - SINKS), chi radii and the learned
# feature transform
SINKS = 4
# layers with Hedgehog's learned map, pure or with the window: through the fused kernels (its log-features), or
# the PyTorch path as the recipes ran it before (checkpointed)
HEDGEHOG = {"hedgehog": dict(feature_map="hedgehog"),
            "hedgehog-torch": dict(feature_map="hedgehog", backend="torch", checkpoint=True)}


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
        elif kind == "window-sinks":
            if window <= SINKS:
                raise ValueError(f"window-sinks needs --window > {SINKS} (its sinks come out of it), got {window}")
            dijiang.convert(model, dict(window=window - SINKS, sinks=SINKS, radius="chi", feature_transform=True))
        elif kind in ("hedgehog-window", "hedgehog-window-torch"):
            dijiang.convert(model, dict(HEDGEHOG[kind.replace("-window", "")], window=window))
        elif kind in HEDGEHOG:
            dijiang.convert(model, HEDGEHOG[kind])
        elif kind != "teacher":
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        models[kind] = model.to(device=device, dtype=dtype).eval()
    return models


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


# ----------------------------------------------------------------------------------------------- tables

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


# ----------------------------------------------------------------------------------------------- driver

def _row_or_error(measure, args, device, **where) -> dict:
    """measure()'s row; on OOM (or any error with --keep-going) a row that names the error, for the table."""
    try:
        return measure()
    except Exception as error:
        if not _is_oom(error) and not args.keep_going:
            raise
        _reset_peak(device)
        return dict(**where, error=("OOM" if _is_oom(error) else f"{type(error).__name__}: {error}"[:120]))


def measure(args) -> tuple[list[dict], list[dict], dict]:
    """(inference rows, training rows, meta) of the measurement `args` describe (see `add_arguments`); prints
    each row as JSON as it comes."""
    import transformers

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    kinds = [k for k in args.kinds.split(",") if k]
    contexts, batches, train_contexts = args.contexts, args.batches, args.train_contexts
    big_contexts = args.batch_contexts or contexts
    t_start = time.perf_counter()
    models = build_models(args.model, kinds, args.window, device, dtype)
    vocab = next(iter(models.values())).config.vocab_size
    print(f"models ready in {time.perf_counter() - t_start:.0f}s on {device}", flush=True)

    inference_rows, training_rows = [], []
    for kind in kinds:
        for batch in batches:
            ctx_list = contexts if batch == min(batches) else big_contexts
            for i, context in enumerate(ctx_list):
                row = _row_or_error(
                    lambda: measure_inference(models[kind], kind, batch, context, new_tokens=args.new_tokens,
                                              hf_new_tokens=args.hf_new_tokens, device=device, vocab=vocab,
                                              repeats=args.repeats,
                                              check_tokens=(i == 0 or context == ctx_list[-1])),
                    args, device, kind=kind, batch=batch, context=context)
                inference_rows.append(row)
                print(json.dumps(row), flush=True)
        models[kind].__dict__.pop("_dijiang_fast_decoders", None)
        _reset_peak(device)
    for kind in kinds:
        for context in train_contexts:
            row = _row_or_error(
                lambda: measure_training(models[kind], kind, context, args.train_tokens, device=device, vocab=vocab,
                                         repeats=args.repeats),
                args, device, kind=kind, context=context)
            training_rows.append(row)
            print(json.dumps(row), flush=True)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    meta = dict(device=device_name, torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(), date=datetime.datetime.now().isoformat(timespec="minutes"),
                model=args.model, dtype=str(dtype).replace("torch.", ""), window=args.window,
                command=args.command or _command_line(),
                new_tokens=args.new_tokens, hf_new_tokens=args.hf_new_tokens)
    return inference_rows, training_rows, meta


def tables(inference_rows, training_rows) -> str:
    """The inference table (with each row's fast decode against the teacher's HF generate) and the training one."""
    teacher_hf = {(r["batch"], r["context"]): r.get("hf_decode_tok_s") for r in inference_rows
                  if r["kind"] == "teacher" and "error" not in r}
    return "\n".join(["## Inference", "", inference_table(inference_rows, teacher_hf), "", "## Training throughput", "",
                      training_table(training_rows) if training_rows else "(not measured)"])


def write_json(path, inference_rows, training_rows, meta) -> None:
    Path(path).write_text(json.dumps(dict(meta=meta, inference=inference_rows, training=training_rows), indent=1))


def run(args) -> int:
    """`dijiang bench`: measure, print the tables, keep every number in --json when given."""
    from dijiang.files import refuse_to_replace

    t_start = time.perf_counter()
    if args.json:
        refuse_to_replace(Path(args.json), args.overwrite, "--json")
    inference_rows, training_rows, meta = measure(args)
    if args.json:
        write_json(args.json, inference_rows, training_rows, meta)
    print(tables(inference_rows, training_rows))
    print(f"total {time.perf_counter() - t_start:.0f}s" + (f"; wrote {args.json}" if args.json else ""))
    return 0


def _command_line() -> str:
    argv = sys.argv[1:]
    if argv[:1] == ["bench"]:  # run as `dijiang bench ...` / `python -m dijiang bench ...`
        argv = argv[1:]
    return "dijiang bench " + " ".join(shlex.quote(a) for a in argv)


def add_arguments(parser) -> None:
    from dijiang.arguments import int_list, non_negative_int, positive_int

    contexts = int_list(positive_int)
    parser.add_argument("--model", default="smollm2", help="embedded name, dir or .gguf; 'tiny' = random tiny Llama")
    parser.add_argument("--kinds", default="teacher,pure,window",
                        help="comma-separated models to time: teacher (softmax), pure (DiJiang), window (hybrid), "
                        "hedgehog (pure, Hedgehog's map), hedgehog-torch (the same on the PyTorch path), "
                        "hedgehog-window, hedgehog-window-torch (the same beside the window)")
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
    parser.add_argument("--window", type=positive_int, default=64,
                        help="softmax keys of the window hybrids ('window-sinks': 4 sinks + a window of the rest)")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="timed repeats per measurement (the median is kept)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                        help="weights dtype (default: bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--json", default=None, help="write every number (and the run's device, versions, command) "
                                                     "as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace the output files if they exist")
    parser.add_argument("--command", default=None, help="command line to record in the JSON")
    parser.add_argument("--keep-going", action="store_true", help="record errors in the table instead of stopping")


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("bench")
    add_arguments(parser)
    parser.set_defaults(func=run)
