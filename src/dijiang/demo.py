"""`dijiang demo`: the whole pipeline on a CPU (most of its time is the fine-tune; see README.md for timings).

teacher -> convert (pure DiJiang, and DiJiang + an exact in-layer softmax window with attention sinks, the
shipped recipe's layer kind) -> short fine-tune
of the hybrid -> for each: perplexity on the default text and a greedy sample -> one markdown table,
a plot (perplexity bars + fine-tune loss) and the table in the output folder.

Both go beyond the softmax window, where linear attention does the work: the perplexity windows are
several times the hybrid's window and the table splits each perplexity into the targets that see fewer
tokens of context than the window (the hybrid is exact softmax there) and the rest; the samples run past
the window, and the point where they do is marked.

Every piece is injectable (`model`/`tokenizer`, `convert_fn`, `train_fn`) so tests run it on a tiny model.
"""
from __future__ import annotations

import copy
import json
import random
import shutil
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dijiang.evaluate import format_cell, load_text, markdown_table, perplexity
from dijiang.ops.triton_window import MAX_SINKS

DEFAULT_PROMPT = "In Python, a list comprehension"
WINDOW_MARK = " [window ends] "  # where prompt + sample pass the hybrid's softmax window
SCALE_NOTE = ("Note: this CPU run shows the mechanics at toy scale ({tokens} fine-tuning tokens; the paper "
              "uses billions). The recovery figures come from the GPU quality run: see docs/results.md.")


@dataclass
class DemoResult:
    rows: list[dict]
    table: str
    out_dir: Path
    seconds: float
    train_log: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------- pieces


def greedy_sample(model, tokenizer, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 30,
                  mark_at: int | None = None) -> str:
    """The model's greedy continuation of `prompt` (continuation text only).

    mark_at: put WINDOW_MARK where prompt + continuation reach that many tokens.
    """
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    new = output[0, inputs["input_ids"].shape[1]:]
    cut = len(new) if mark_at is None else max(0, mark_at - inputs["input_ids"].shape[1])
    if cut >= len(new):
        return tokenizer.decode(new, skip_special_tokens=True)
    return (tokenizer.decode(new[:cut], skip_special_tokens=True) + WINDOW_MARK
            + tokenizer.decode(new[cut:], skip_special_tokens=True))


def stdlib_training_text(num_chars: int, seed: int = 0) -> str:
    """Offline training text that every Python install has: the standard library's own source files.

    It is Python code and docstrings, not the reference documentation that the evaluation text (pydoc topics)
    is generated from; any file sharing a 13-word run with the evaluation text is left out all the same.
    """
    from dijiang.data import overlaps, pydoc_topics_text, shingles

    eval_shingles = shingles(pydoc_topics_text())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    random.Random(seed).shuffle(files)
    parts, total = [], 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        if overlaps(text, eval_shingles):
            continue
        parts.append(text)
        total += len(text)
        if total >= num_chars:
            break
    return "\n\n".join(parts)


def hybrid_settings(window: int, sinks: int) -> dict | None:
    """The converted layers' settings: pure DiJiang (window 0), or the window hybrid with its sinks."""
    if not window:
        return None
    return {"window": window, "sinks": sinks} if sinks else {"window": window}


def default_convert(model, window: int = 0, sinks: int = 0):
    import dijiang

    return dijiang.convert(model, settings=hybrid_settings(window, sinks))


def default_train(source: str, *, window: int, sinks: int, tokens: int, out_dir: Path, seed: int, block_size: int,
                  train_file: Path, convert_fn: Callable | None = None, progress: bool = True):
    """Convert and fine-tune `source` (a name or folder `load_pretrained` takes) through `dijiang.train`.

    Distillation from the unconverted model plus 0.2 LM loss, the trainer's defaults. Returns the
    fine-tuned model (loaded back from `out_dir/final`) and the training log records.
    """
    from dijiang.files import read_jsonl
    from dijiang.train import TrainConfig, train

    config = TrainConfig(model=str(source), out=str(out_dir), data=[str(train_file)], eval_data=[],
                         tokens=str(tokens), block_size=block_size, batch_size=4,
                         attention=hybrid_settings(window, sinks),
                         save_every=0, keep_checkpoints=1, seed=seed, progress=progress)
    train_convert = None if convert_fn is None else (lambda model, _settings, _layers: convert_fn(model, window, sinks))
    summary = train(config, convert_fn=train_convert)
    if not summary.get("final"):
        raise RuntimeError(f"training did not save a final model in {out_dir}")
    import dijiang

    model, _ = dijiang.load_pretrained(summary["final"])
    return model.eval(), read_jsonl(out_dir / "log.jsonl")


# ----------------------------------------------------------------------------- the demo


def run_demo(model=None, tokenizer=None, *, model_name: str = "smollm2", tokens: int = 16_000,
             out: str | Path = "runs/demo", window: int = 64, sinks: int = 4, seed: int = 0, block_size: int = 256,
             eval_window: int = 512, eval_windows: int = 8, sample_tokens: int = 100,
             prompt: str = DEFAULT_PROMPT, eval_text: str | None = None, train_text: str | None = None,
             convert_fn: Callable | None = None, train_fn: Callable | None = None, overwrite: bool = False,
             log: Callable[[str], None] = print, progress: bool = True) -> DemoResult:
    """Run the demo; returns the rows, the table and where the files went. See the module docstring.

    `out` must be new or empty unless `overwrite` (then its `train` folder, an earlier demo's, is replaced).
    """
    from dijiang.files import refuse_to_replace

    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    if window < 1:
        raise ValueError(f"the demo's hybrid needs a window >= 1 token, got {window}")
    if not 0 <= sinks <= MAX_SINKS:
        raise ValueError(f"sinks must be in [0, {MAX_SINKS}], got {sinks}")
    start = time.perf_counter()
    out_dir = Path(out)
    refuse_to_replace(out_dir, overwrite, "demo output folder")
    shutil.rmtree(out_dir / "train", ignore_errors=True)  # the trainer refuses an earlier run's folder
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    def elapsed() -> str:
        return f"[{time.perf_counter() - start:6.1f}s]"

    source: str | Path = model_name
    if model is None:
        import dijiang

        log(f"{elapsed()} loading {model_name}")
        model, tokenizer = dijiang.load_pretrained(model_name)
    else:  # the trainer loads its model by name: hand it a saved copy of the one we were given
        if tokenizer is None:
            raise ValueError("run_demo: pass the tokenizer along with the model")
        source = out_dir / "teacher"
        model.save_pretrained(source)
        tokenizer.save_pretrained(source)
    model.eval()
    eval_text = eval_text if eval_text is not None else load_text("pydoc")
    rows: list[dict] = []

    def measure(name: str, candidate) -> None:
        result = perplexity(candidate, tokenizer, eval_text, window=eval_window, max_windows=eval_windows,
                            split_at=window, progress=progress, desc=name)
        sample = greedy_sample(candidate, tokenizer, prompt, sample_tokens, mark_at=window)
        rows.append({"model": name, "perplexity": result.perplexity, "near": result.near_perplexity,
                     "far": result.far_perplexity, "sample": sample})
        log(f"{elapsed()} {name}: perplexity {result.perplexity:.4g} over {result.num_targets} tokens "
            f"({result.near_perplexity:.4g} with < {window} tokens of context, {result.far_perplexity:.4g} beyond)")

    measure("teacher (softmax)", model)
    hybrid = f"DiJiang + {window}-token window" + (f" + {sinks} sinks" if sinks else "")
    for name, model_window, model_sinks in (("DiJiang, converted", 0, 0), (f"{hybrid}, converted", window, sinks)):
        converted = (convert_fn or default_convert)(copy.deepcopy(model), model_window, model_sinks)
        measure(name, converted)
        del converted

    train_file = out_dir / "train_text.txt"
    train_file.write_text(train_text if train_text is not None else stdlib_training_text(tokens * 6, seed))
    log(f"{elapsed()} fine-tuning the hybrid on {tokens:,} tokens of {train_file} (block {block_size})")
    fine_tuned, train_log = (train_fn or default_train)(
        source, window=window, sinks=sinks, tokens=tokens, out_dir=out_dir / "train", seed=seed,
        block_size=block_size, train_file=train_file, convert_fn=convert_fn)
    measure(f"{hybrid}, fine-tuned {_short_count(tokens)} tokens", fine_tuned)

    teacher_ppl = rows[0]["perplexity"]
    for row in rows:
        row["ratio"] = row["perplexity"] / teacher_ppl
    table = markdown_table(rows, [("model", "model"), ("perplexity", "perplexity"), ("ratio", "ratio to teacher"),
                                  ("near", f"context < {window}"), ("far", f"context >= {window}")])
    samples = sample_list(rows, prompt, sample_tokens)
    _write_outputs(out_dir, rows, table, samples, train_log, settings={
        "model": str(source), "tokens": tokens, "window": window, "sinks": sinks, "seed": seed,
        "block_size": block_size,
        "eval_window": eval_window, "eval_windows": eval_windows, "prompt": prompt, "sample_tokens": sample_tokens})
    seconds = time.perf_counter() - start
    log("")
    log(f"Perplexity over {eval_windows} windows of {eval_window} tokens, split by how many tokens of context each "
        f"target sees (the hybrid is exact softmax below {window}; beyond, DiJiang's linear attention adds the rest):")
    log("")
    log(table)
    log("")
    log(samples)
    log("")
    log(SCALE_NOTE.format(tokens=f"{tokens:,}"))
    log(f"wrote {out_dir / 'table.md'}, {out_dir / 'demo.png'}, {out_dir / 'results.json'} in {seconds:.0f} s")
    return DemoResult(rows, table, out_dir, seconds, train_log)


def _short_count(tokens: int) -> str:
    return f"{tokens / 1e6:g}M" if tokens >= 1_000_000 else f"{tokens / 1e3:g}K" if tokens >= 1000 else str(tokens)


def sample_list(rows: list[dict], prompt: str, sample_tokens: int) -> str:
    """The greedy samples as a markdown list (newlines shown as \\n), WINDOW_MARK where they pass the window."""
    lines = [f"Greedy samples of {sample_tokens} tokens after {prompt!r}:"]
    lines += [f"- {row['model']}: {format_cell(row['sample'])}" for row in rows]
    return "\n".join(lines)


def _write_outputs(out_dir: Path, rows: list[dict], table: str, samples: str, train_log: list[dict],
                   settings: dict) -> None:
    from dijiang.plots import plot_demo

    note = SCALE_NOTE.format(tokens=f"{settings['tokens']:,}")
    (out_dir / "table.md").write_text(table + "\n\n" + samples + "\n\n" + note + "\n")
    (out_dir / "results.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    plot_demo(rows, train_log, out_dir / "demo.png")


# ----------------------------------------------------------------------------- CLI


def _run_demo_cli(args) -> int:
    run_demo(model_name=args.model, tokens=args.tokens, out=args.out, window=args.window, sinks=args.sinks,
             seed=args.seed,
             block_size=args.block_size, eval_window=args.eval_window, eval_windows=args.eval_windows,
             prompt=args.prompt, sample_tokens=args.sample_tokens, overwrite=args.overwrite)
    return 0


def add_cli(subparsers) -> None:
    from dijiang.arguments import Number, non_negative_int, positive_int, token_count

    parser = subparsers.add_parser(
        "demo", description=__doc__)
    parser.add_argument("--model", default="smollm2", help="teacher: 'smollm2', a hub name or a local folder")
    parser.add_argument("--tokens", type=token_count, default=16_000, help="fine-tuning tokens (e.g. 16K; CPU training runs at ~20-150 tokens/s)")
    parser.add_argument("--out", default="runs/demo", help="output folder (new or empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an earlier demo in --out")
    parser.add_argument("--window", type=positive_int, default=64, help="exact-softmax window of the hybrid, in tokens")
    parser.add_argument("--sinks", type=Number(int, 0, MAX_SINKS), default=4,
                        help="first tokens that stay softmax keys of every query of the hybrid (attention sinks; 0: none)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the training-text selection and the fine-tune")
    parser.add_argument("--block-size", type=positive_int, default=256, help="fine-tuning sequence length")
    parser.add_argument("--eval-window", type=Number(int, 2), default=512,
                        help="perplexity window length (several times --window)")
    parser.add_argument("--eval-windows", type=positive_int, default=8, help="perplexity windows per model")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt of the greedy samples")
    parser.add_argument("--sample-tokens", type=positive_int, default=100,
                        help="length of the greedy samples (past --window)")
    parser.set_defaults(func=_run_demo_cli)
