"""Evaluation: sliding-window perplexity, per-layer attention fidelity, passkey retrieval.

Also the `dijiang eval` subcommand; `markdown_table` lives in `dijiang.tables` (re-exported here).
lm-eval-harness lives in `dijiang.lm_eval_adapter`.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from dijiang.cache import cache_bytes
from dijiang.capture import first_tensor, module_io
from dijiang.conversion import iter_dijiang_layers
from dijiang.data import read_documents
from dijiang.tables import format_cell, markdown_table  # noqa: F401  (re-exported: evaluate.markdown_table)


# ----------------------------------------------------------------------------- text sources


def load_text(source: str | Path | None = "pydoc", *, split: str = "test", config: str | None = None,
              column: str = "text") -> str:
    """Evaluation text from `source`, read as `dijiang.data.read_documents` reads a training source: "pydoc"
    (default), a file, a folder (every text file below it), a .jsonl file, a glob, or "hf:NAME[:CONFIG][@SPLIT]";
    its documents joined by blank lines. `split` and `config`: of an hf: source that names none; `column`: the
    field of .jsonl and dataset records holding the text. To evaluate a string you already hold, pass it to
    `perplexity` directly.
    """
    source = "pydoc" if source is None else str(source)
    documents = read_documents([source], column, hf_split=split, hf_config=config)
    if not documents:
        if Path(source).expanduser().is_dir():
            raise ValueError(f"folder {source} holds no text files")
        raise ValueError(f"evaluation text from {source} is empty")
    return "\n\n".join(documents)


# ----------------------------------------------------------------------------- perplexity


@dataclass(frozen=True)
class Window:
    """Feed tokens [begin, end); score the targets [first_target, end) (each predicted from the token before)."""

    begin: int
    end: int
    first_target: int

    @property
    def num_targets(self) -> int:
        return self.end - self.first_target


def sliding_windows(num_tokens: int, window: int, stride: int | None = None) -> list[Window]:
    """The HF sliding-window recipe, made exact: every token but the first is scored exactly once.

    The first window scores tokens 1..window-1; each later window moves on by `stride` new targets and
    feeds the `window` tokens ending at its last target, so each target gets as much left context as the
    window allows. A window of W tokens can score at most W-1 targets, so `stride` is capped at W-1
    (stride == window means "non-overlapping" and gives one token of overlap).
    """
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens (one context token and one target), got {window}")
    stride = window - 1 if stride is None else stride
    if stride < 1 or stride > window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    if num_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {num_tokens}")
    stride = min(stride, window - 1)
    windows = [Window(0, min(window, num_tokens), 1)]
    while windows[-1].end < num_tokens:
        first = windows[-1].end
        end = min(first + stride, num_tokens)
        windows.append(Window(max(0, end - window), end, first))
    return windows


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    num_targets: int
    num_windows: int
    seconds: float
    # with perplexity(split_at=S): targets predicted from fewer than S tokens of context, and from S or more
    split_at: int | None = None
    near_perplexity: float | None = None
    far_perplexity: float | None = None


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D token ids of `text`, without special tokens (the text is one long document)."""
    if not text or not text.strip():
        raise ValueError("text to evaluate is empty")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() < 2:
        raise ValueError(f"text has {ids.numel()} token(s); perplexity needs at least 2")
    return ids


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def target_nll(model, ids: torch.Tensor, windows: Sequence[Window]) -> list[torch.Tensor]:
    """Per window, the NLL (float64) of each of its targets in order; windows of equal length batched together."""
    device = _model_device(model)
    nll: list[torch.Tensor | None] = [None] * len(windows)
    by_length: dict[int, list[int]] = {}
    for index, win in enumerate(windows):
        by_length.setdefault(win.end - win.begin, []).append(index)
    for indices in by_length.values():
        inputs = torch.stack([ids[windows[i].begin:windows[i].end] for i in indices]).to(device)
        logits = model(input_ids=inputs, use_cache=False).logits.float()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        token_nll = -log_probs.gather(-1, inputs[:, 1:, None]).squeeze(-1).double().cpu()
        for row, i in enumerate(indices):
            skip = windows[i].first_target - windows[i].begin - 1  # predictions of already-scored targets
            nll[i] = token_nll[row, skip:]
    return nll  # type: ignore[return-value]


def perplexity(model, tokenizer, text: str, *, window: int = 512, stride: int | None = None,
               max_windows: int | None = None, max_tokens: int | None = None, batch_size: int = 4,
               split_at: int | None = None, progress: bool = False, desc: str = "perplexity") -> PerplexityResult:
    """Sliding-window perplexity of `model` on `text` (exp of the mean NLL over every scored token).

    `max_tokens` truncates the tokenized text; `max_windows` keeps the first windows only. `split_at`: also the
    perplexity of the targets with fewer than `split_at` tokens of context in their window and of the rest (for
    a hybrid with a `split_at`-token softmax window: where it is exact softmax, and where linear attention
    adds to it). `progress` shows a tqdm bar (labelled `desc`) over the windows.
    """
    from tqdm.auto import tqdm

    ids = tokenize(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    windows = sliding_windows(ids.numel(), window, stride)
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        windows = windows[:max_windows]
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    split = window if split_at is None else split_at  # every target sees < window tokens: all "near"
    near, far = [], []  # NLL of targets with context < split, >= split
    with tqdm(total=len(windows), desc=desc, unit="window", disable=not progress, dynamic_ncols=True) as bar:
        for first in range(0, len(windows), batch_size):
            batch = windows[first:first + batch_size]
            for win, values in zip(batch, target_nll(model, ids, batch)):
                context = torch.arange(win.first_target, win.end) - win.begin  # tokens each target sees
                is_near = context < split
                near.append(values[is_near])
                far.append(values[~is_near])
            bar.update(len(batch))
    model.train(was_training)
    near_nll, far_nll = torch.cat(near), torch.cat(far)
    num_targets = near_nll.numel() + far_nll.numel()
    mean_nll = float(near_nll.sum() + far_nll.sum()) / num_targets
    result = PerplexityResult(math.exp(mean_nll), mean_nll, num_targets, len(windows), time.perf_counter() - start)
    if split_at is not None:
        result.split_at = split_at
        result.near_perplexity = math.exp(float(near_nll.mean())) if near_nll.numel() else None
        result.far_perplexity = math.exp(float(far_nll.mean())) if far_nll.numel() else None
    return result


def compare_perplexity(models: dict, tokenizer, text: str, **kwargs) -> list[dict]:
    """Perplexity of each named model on the same windows; the first model is the reference (teacher)."""
    rows = []
    for name, model in models.items():
        result = perplexity(model, tokenizer, text, desc=f"perplexity, {name}", **kwargs)
        rows.append({"model": name, **asdict(result)})
    reference = rows[0]["perplexity"]
    for row in rows:
        row["ratio"] = row["perplexity"] / reference
    return rows


# ----------------------------------------------------------------------------- long context


def default_max_windows(window: int) -> int:
    """About 40k scored tokens per window length, 6 to 40 windows: 512 -> 40, 2048 -> 20, 8192 -> 6."""
    return max(6, min(40, 40960 // window))


@contextlib.contextmanager
def linear_branch_off(model):
    """Switch the DiJiang branch of every window-hybrid layer off (its weight softplus(-30) ~ 1e-13): the
    model becomes a plain sliding-window softmax model (window + sinks where the layers keep sinks, StreamingLLM's
    layer). The ablation that tells what the branch is worth."""
    saved = []
    for _, layer in iter_dijiang_layers(model):
        if layer.window_mix is not None:
            saved.append((layer.window_mix, layer.window_mix.detach().clone()))
    try:
        with torch.no_grad():
            for parameter, _ in saved:
                parameter.fill_(-30.0)
        yield len(saved)
    finally:
        with torch.no_grad():
            for parameter, value in saved:
                parameter.copy_(value)


def has_linear_branch(model) -> bool:
    return any(layer.window_mix is not None for _, layer in iter_dijiang_layers(model))


def softmax_window(model) -> int | None:
    """The softmax window of a converted model's window layers (0: pure DiJiang), None for an unconverted one."""
    windows = {layer.settings.window for _, layer in iter_dijiang_layers(model)}
    return max(windows) if windows else None


def passkey_past(rows: Sequence[dict], window: int) -> tuple[int, int]:
    """(correct, trials) over the passkey trials whose needle lay more than `window` tokens from the end."""
    past = [ok for row in rows for ok, distance in zip(row["correct"], row["needle_to_end"]) if distance > window]
    return sum(past), len(past)


def context_perplexity(models: dict, tokenizer, texts: dict[str, str], windows: Sequence[int], *,
                       branch_off: bool = False, batch_size: int = 4, max_windows: int | None = None,
                       progress: bool = True) -> list[dict]:
    """Perplexity of each model on each text at each window length; the first model is the reference.

    branch_off adds, for every window hybrid, a row with its DiJiang branch switched off (``linear_branch_off``)
    and that row's ``branch_worth``: how much the perplexity rises without the branch (0.10 = +10 %).
    """
    from tqdm.auto import tqdm

    jobs = [(text_name, window, name) for text_name in texts for window in windows for name in models]
    rows, reference = [], {}
    for text_name, window, name in tqdm(jobs, desc="perplexity", disable=not progress):
        model = models[name]
        kwargs = dict(window=window, batch_size=batch_size,
                      max_windows=max_windows or default_max_windows(window))
        result = perplexity(model, tokenizer, texts[text_name], **kwargs)
        row = {"text": text_name, "window": window, "model": name, **asdict(result)}
        reference.setdefault((text_name, window), result.perplexity)
        rows.append(row)
        if branch_off and has_linear_branch(model):
            with linear_branch_off(model):
                off = perplexity(model, tokenizer, texts[text_name], **kwargs)
            rows.append({"text": text_name, "window": window, "model": f"{name}, branch off", **asdict(off),
                         "branch_worth": off.perplexity / result.perplexity - 1})
    for row in rows:
        row["ratio"] = row["perplexity"] / reference[(row["text"], row["window"])]
    return rows


# ----------------------------------------------------------------------------- attention fidelity


@torch.no_grad()
def attention_fidelity(teacher, student, input_ids: torch.Tensor, layer_names: Iterable[str] | None = None
                       ) -> list[dict]:
    """Per layer: the student attention's output vs the teacher's, both fed the teacher's inputs.

    One teacher forward pass records each attention module's inputs (args and kwargs: hidden states,
    rotary embeddings, mask) and output; each student attention module then runs on exactly those
    inputs, so errors do not compound across layers. Returns rows with `cosine` (mean over tokens of
    the cosine similarity of output vectors) and `relative_mse` (||s - t||^2 / ||t||^2).
    """
    from dijiang.hf_compat import without_cache

    names = [name for name, _ in iter_dijiang_layers(student)] if layer_names is None else list(layer_names)
    if not names:
        raise ValueError("no attention layers to compare: the student has no converted layers")
    teacher_mode, student_mode = teacher.training, student.training
    teacher.eval(), student.eval()
    with module_io(teacher, names) as captured:
        teacher(input_ids=input_ids.to(_model_device(teacher)), use_cache=False)
    rows = []
    for name in names:
        record = captured.pop(name)
        kwargs = without_cache(record["kwargs"])
        student_out = first_tensor(student.get_submodule(name)(*record["args"], **kwargs)).float()
        teacher_out = record["output"].float()
        cosine = F.cosine_similarity(student_out.flatten(0, -2), teacher_out.flatten(0, -2), dim=-1).mean()
        relative_mse = (student_out - teacher_out).pow(2).sum() / teacher_out.pow(2).sum().clamp_min(1e-30)
        rows.append({"layer": name, "cosine": float(cosine), "relative_mse": float(relative_mse)})
    teacher.train(teacher_mode), student.train(student_mode)
    return rows


# ----------------------------------------------------------------------------- passkey retrieval

PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about it.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyPrompt:
    text: str
    key: str
    depth: float  # requested fraction of the filler placed before the needle
    num_filler: int  # filler repetitions in the prompt
    needle_after: int  # filler repetitions before the needle
    needle_at: int  # character offset of the needle in `text`

    def tokens_from_needle(self, tokenizer) -> int:
        """Tokens from the needle's start to the prompt's end: a model that sees only its last W tokens can
        retrieve the key only when this is at most W."""
        return len(tokenizer(self.text[self.needle_at:], add_special_tokens=False)["input_ids"])


def passkey_prompt(tokenizer, num_tokens: int, depth: float, key: str | int) -> PasskeyPrompt:
    """A prompt of about `num_tokens` tokens: filler text with the needle at `depth` (0 = start, 1 = end)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = str(key)
    if not key.isdigit():
        raise ValueError(f"pass key must be digits, got {key!r}")

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    fixed = count(PASSKEY_INTRO + PASSKEY_NEEDLE.format(key=key) + PASSKEY_QUESTION)
    num_filler = max(0, (num_tokens - fixed) // max(1, count(PASSKEY_FILLER)))
    needle_after = round(depth * num_filler)
    before = PASSKEY_INTRO + PASSKEY_FILLER * needle_after
    text = before + PASSKEY_NEEDLE.format(key=key) + PASSKEY_FILLER * (num_filler - needle_after) + PASSKEY_QUESTION
    return PasskeyPrompt(text, key, depth, num_filler, needle_after, len(before))


def passkey_correct(generated: str, key: str) -> bool:
    """True when the first number in the model's answer is the pass key."""
    match = re.search(r"\d+", generated)
    return match is not None and match.group() == str(key)


@torch.no_grad()
def passkey_accuracy(model, tokenizer, lengths: Sequence[int], trials: int = 5, seed: int = 0,
                     max_new_tokens: int = 8, progress: bool = False, desc: str = "passkey") -> list[dict]:
    """Greedy passkey retrieval at each context length: random 5-digit keys at random depths (seeded).

    Each row also lists, per trial, whether it was right and how many tokens lay from the needle to the end
    (`correct`, `needle_to_end`): accuracy beyond a sliding window is the part that needs long memory."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(lengths) * trials, desc=desc, unit="prompt", disable=not progress, dynamic_ncols=True)
    rng = random.Random(seed)
    device = _model_device(model)
    model.eval()
    rows = []
    for length in lengths:
        correct, distances = [], []
        for _ in range(trials):
            prompt = passkey_prompt(tokenizer, length, rng.random(), rng.randint(10000, 99999))
            inputs = tokenizer(prompt.text, return_tensors="pt").to(device)
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            correct.append(passkey_correct(answer, prompt.key))
            distances.append(prompt.tokens_from_needle(tokenizer))
            bar.update(1)
        rows.append({"context": length, "trials": trials, "accuracy": sum(correct) / trials, "correct": correct,
                     "needle_to_end": distances})
    bar.close()
    return rows


# ----------------------------------------------------------------------------- CLI


def _load_model(name_or_path: str, dtype: str, device: str):
    import dijiang

    return dijiang.load_pretrained(name_or_path, dtype=getattr(torch, dtype), device=device)


def _students_for(args, teacher, tokenizer) -> dict:
    """{name: model}: each --student folder (named by its folder, or NAME=PATH), or the converted teacher."""
    import dijiang
    from dijiang.data import check_same_tokenizer

    if args.convert:
        settings = {"window": args.convert_window} if args.convert_window else None
        return {"student": dijiang.convert(copy.deepcopy(teacher), settings=settings)}
    students = {}
    for spec in args.student or []:
        name, _, path = spec.rpartition("=") if "=" in spec else (None, "", spec)
        name = name or (Path(path).name if len(args.student) > 1 else "student")
        if name in students or name == "teacher":
            raise SystemExit(f"error: two students named {name!r}; name them with --student NAME=PATH")
        students[name], student_tokenizer = _load_model(path, args.dtype, args.device)
        # every model is scored with the teacher's tokenizer: another vocabulary gives a meaningless perplexity
        check_same_tokenizer(tokenizer, student_tokenizer)
    return students


def _texts_for(args) -> dict[str, str]:
    if args.string is not None:
        return {"string": args.string}
    sources = args.text or ["pydoc"]
    return {Path(source).name or source: load_text(source, split=args.hf_split, config=args.hf_config,
                                                   column=args.hf_column) for source in sources}


CONTEXT_COLUMNS = [("text", "text"), ("window", "window"), ("model", "model"), ("perplexity", "perplexity"),
                   ("ratio", "ratio to teacher"), ("branch_worth", "branch worth"), ("num_targets", "tokens")]


@torch.no_grad()
def cache_memory(models: dict, lengths: Sequence[int], vocab_size: int) -> list[dict]:
    """Bytes each model's generation cache holds after a prefill of n tokens, for each n: softmax KV grows with n,
    a converted layer's state does not. The tokens are random (a cache's size does not depend on them)."""
    rows = []
    for n in lengths:
        ids = torch.randint(0, vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
        per_model = {}
        for name, model in models.items():
            out = model(input_ids=ids.to(next(model.parameters()).device), use_cache=True)
            per_model[name] = cache_bytes(out.past_key_values)
            del out
        teacher = per_model.get("teacher")
        rows += [{"model": name, "context": n, "mib": size / 2**20,
                  "of_teacher": size / teacher if teacher else None} for name, size in per_model.items()]
    return rows


def run_eval(args) -> int:
    texts = _texts_for(args)
    teacher, tokenizer = _load_model(args.teacher, args.dtype, args.device)
    students = _students_for(args, teacher, tokenizer)
    student = next(iter(students.values()), None)
    models = {"teacher": teacher, **students}
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    results: dict = {}

    if args.windows or len(texts) > 1 or len(students) > 1 or args.branch_off:
        rows = context_perplexity(models, tokenizer, texts, args.windows or [args.window],
                                  branch_off=args.branch_off, batch_size=args.batch_size,
                                  max_windows=args.max_windows)
        results["context"] = rows
        print(markdown_table(rows, CONTEXT_COLUMNS))
        if out:
            from dijiang.plots import plot_context

            plot_context(rows, out / "context.png")
    else:
        text = next(iter(texts.values()))
        rows = compare_perplexity(models, tokenizer, text, window=args.window, stride=args.stride,
                                  max_windows=args.max_windows or 40, max_tokens=args.max_tokens,
                                  batch_size=args.batch_size, progress=True)
        results["perplexity"] = rows
        print(markdown_table(rows, [("model", "model"), ("perplexity", "perplexity"),
                                    ("ratio", "ratio to teacher"), ("num_targets", "tokens"),
                                    ("num_windows", "windows"), ("seconds", "seconds")]))

    if args.cache_memory:
        lengths = args.windows or [args.window]
        rows = cache_memory(models, lengths, teacher.config.get_text_config(decoder=True).vocab_size)
        results["cache"] = rows
        print(f"\ngeneration cache after a prefill (batch 1, {args.dtype}):")
        print(markdown_table([{**r, "mib": f"{r['mib']:.2f}", "of_teacher": f"{100 * r['of_teacher']:.1f} %"}
                              for r in rows], ["model", "context", ("mib", "MiB"), ("of_teacher", "of teacher")]))

    if args.fidelity and student is not None:
        text = next(iter(texts.values()))
        ids = tokenize(tokenizer, text)[None, :args.fidelity_tokens]
        fidelity = attention_fidelity(teacher, student, ids)
        results["fidelity"] = fidelity
        print()
        print(markdown_table(fidelity, ["layer", "cosine", ("relative_mse", "relative MSE")]))
        if out:
            from dijiang.plots import plot_fidelity

            plot_fidelity(fidelity, out / "fidelity.png")

    if args.passkey:
        lengths = args.passkey
        for name, model in models.items():
            variants = [(name, contextlib.nullcontext())]
            if args.branch_off and has_linear_branch(model):
                variants.append((f"{name}, branch off", linear_branch_off(model)))
            for label, switch in variants:
                with switch:
                    rows = passkey_accuracy(model, tokenizer, lengths, trials=args.passkey_trials, seed=args.seed,
                                            progress=True, desc=f"passkey, {label}")
                results.setdefault("passkey", {})[label] = rows
        # what needs memory: the needles farther back than the students' softmax window (the smallest one)
        windows = [w for w in (softmax_window(model) for model in models.values()) if w]
        reference = min(windows) if windows else None
        table = []
        for label, rows in results["passkey"].items():
            row = {"model": label, **{str(r["context"]): r["accuracy"] for r in rows}}
            if reference is not None:
                correct, trials = passkey_past(rows, reference)
                row["past"] = f"{correct} / {trials}"
            table.append(row)
        past = [("past", f"needle > {reference} tokens back")] if reference is not None else []
        print(f"\npasskey retrieval, accuracy over {args.passkey_trials} trials per context length:")
        print(markdown_table(table, ["model", *(str(n) for n in lengths), *past]))

    if out:
        (out / "eval.json").write_text(json.dumps(results, indent=2))
        print(f"\nwrote {out / 'eval.json'}")
    return 0


def add_cli(subparsers) -> None:
    from dijiang.arguments import Number, int_list, non_empty_int_list, non_negative_int, positive_int

    parser = subparsers.add_parser(
        "eval", description="Evaluate a teacher and (optionally) a DiJiang student on the same text.")
    parser.add_argument("--teacher", "--model", dest="teacher", default="smollm2",
                        help="teacher: 'smollm2', a hub name or a local folder")
    student = parser.add_mutually_exclusive_group()
    student.add_argument("--student", action="append",
                         help="folder of a converted (fine-tuned) model saved by `dijiang train`; repeat for "
                              "several (NAME=PATH names one)")
    student.add_argument("--convert", action="store_true", help="student = the teacher converted with defaults")
    parser.add_argument("--convert-window", type=non_negative_int, default=0,
                        help="with --convert: exact softmax over the last W tokens (hybrid); 0 = pure DiJiang")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", action="append",
                        help="'pydoc' (the default), a text file, a folder, a .jsonl, a glob, or hf:DATASET; repeat for "
                             "several")
    source.add_argument("--string", help="evaluate this literal text instead")
    parser.add_argument("--hf-split", default="test", help="with --text hf:DATASET: the split to read")
    parser.add_argument("--hf-config", default=None, help="with --text hf:DATASET: the dataset config")
    parser.add_argument("--hf-column", default="text", help="with --text hf:DATASET: the column holding the text")
    parser.add_argument("--window", type=Number(int, 2), default=512, help="tokens per window")
    parser.add_argument("--windows", type=non_empty_int_list(Number(int, 2)), default=None,
                        help="several window lengths, e.g. 512,2048,8192: one table, JSON and plot (context.png) "
                             "of the ratio to the teacher against context; windows per length default to "
                             "about 40k scored tokens (40 / 20 / 6)")
    parser.add_argument("--branch-off", action="store_true",
                        help="also score every window hybrid with its DiJiang branch switched off (a plain "
                             "sliding window, with its sinks if it has any): what the linear part is worth")
    parser.add_argument("--stride", type=positive_int, default=None, help="new tokens per window (default window-1)")
    parser.add_argument("--max-windows", type=positive_int, default=None,
                        help="windows per length (default 40 for --window; see --windows)")
    parser.add_argument("--max-tokens", type=Number(int, 2), default=None, help="truncate the tokenized text to N tokens")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward pass")
    parser.add_argument("--cache-memory", action="store_true",
                        help="also the generation cache each model holds after a prefill of each window length")
    parser.add_argument("--fidelity", action="store_true", help="per-layer attention fidelity (needs a student)")
    parser.add_argument("--fidelity-tokens", type=positive_int, default=512, help="tokens of text the fidelity pass feeds")
    parser.add_argument("--passkey", type=int_list(Number(int, 16)), default=[],
                        help="comma-separated context lengths, e.g. 256,512,1024")
    parser.add_argument("--passkey-trials", type=positive_int, default=5, help="prompts per passkey context length")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the passkey keys and depths")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (cuda when available)")
    parser.add_argument("--out", default=None, help="folder for eval.json and fidelity.png")
    parser.set_defaults(func=run_eval)
