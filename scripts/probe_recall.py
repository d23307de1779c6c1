"""Can a converted layer learn to recall past its softmax window at all? Multi-query associative recall (MQAR,
as in Zoology) on tiny Llamas trained from scratch, one per attention kind: softmax, a plain sliding window,
the window with DiJiang's additive branch, the window with the delta-rule branch (DeltaNet's state), and both
states without a window.

Each sequence: BOS, N key-value pairs, a gap of filler tokens longer than the window, then Q < N of the keys
again (distinct, in another order), each followed by its value; the loss and the accuracy count only those
values, which a window cannot see (every pair is more than ``--window`` tokens before its query). A window model
is at chance (1 / the number of values); a model that remembers only which values occurred, not which key each
went with, reaches the "set level" (`set_level`) with every answer one of the sequence's values ("in set" 1);
what a kind scores above that is key-value recall. The window kinds are scored with their branch switched off
too (``dijiang.evaluate.linear_branch_off``).

    python scripts/probe_recall.py --kinds "softmax,window,window + additive,window + delta" --pairs 4 \
      --keys 32 --values 32 --steps 2000 --eval-every 250 --lr 1e-3 --json recall.json --png recall.png

``--mix-init`` sets the window kinds' branch weight at init, ``--mix-lr`` gives those weights their own peak
learning rate (as ``dijiang train --mix-lr``); the JSON records where each layer's weight started and ended.

``--distil`` asks the question of a converted model instead: the softmax model is trained first (it binds: the
teacher), then each other kind is made from it by ``dijiang.convert``, as SmolLM2 is (its weights kept, the new
parameters at init), and distilled from it with ``dijiang train``'s loss (KD over every position + 0.2 LM) and
its learning rates (--pretrained-lr for the kept weights, --lr for the new ones, --mix-lr for the branch weights).
Its table adds what the converted model recalls before any training:

    python scripts/probe_recall.py --distil --kinds "window,window + delta" --pairs 4 --keys 32 --values 32 \
      --steps 2000 --distil-steps 1000 --eval-every 250 --lr 1e-3 --teacher-cache teacher.pt

Prints a table (accuracy on held-out sequences, against training steps), writes the JSON and the plot.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import dijiang  # noqa: E402
from dijiang.arguments import positive_float  # noqa: E402
from dijiang.evaluate import has_linear_branch, linear_branch_off  # noqa: E402
from dijiang.files import write_text_atomic  # noqa: E402
from dijiang.losses import distillation_loss  # noqa: E402
from dijiang.tables import markdown_table  # noqa: E402
from dijiang.train import build_optimizer, new_parameter_ids  # noqa: E402
from dijiang.train_config import TrainConfig  # noqa: E402

PAD, BOS = 0, 1
# what each kind converts (None: the softmax model itself); "window" is the additive hybrid with its branch off
KINDS = {
    "softmax": None,
    "window": dict(state_update="add"),
    "window + additive": dict(state_update="add"),
    "window + delta": dict(state_update="delta", state_decay=False),
    "additive": dict(state_update="add", window=0),
    "delta": dict(state_update="delta", state_decay=False, window=0),
}


def mqar_batch(batch: int, pairs: int, queries: int, gap: int, keys: int, values: int, filler: int,
               gen: torch.Generator):
    """Token ids [batch, T], the answer mask [batch, T] (True where the next token is a value to recall) and the
    pairs' values [batch, pairs] (what "in set" counts): `pairs` pairs, `queries` (<= pairs) of their keys asked
    again, distinct. Ids: 0 pad, 1 BOS, then keys, values and filler, disjoint."""
    key_ids = 2 + torch.stack([torch.randperm(keys, generator=gen)[:pairs] for _ in range(batch)])
    value_ids = 2 + keys + torch.randint(0, values, (batch, pairs), generator=gen)
    context = torch.stack([key_ids, value_ids], dim=-1).reshape(batch, 2 * pairs)
    noise = 2 + keys + values + torch.randint(0, filler, (batch, gap), generator=gen)
    # fewer queries than pairs, distinct: with every pair asked, the last value follows by elimination from the
    # values already restated (a softmax model trained so answered the last of 4 queries always and the first a
    # third of the time), and a query asked twice can be copied from inside the window; neither is recall
    order = torch.stack([torch.randperm(pairs, generator=gen)[:queries] for _ in range(batch)])
    asked = torch.stack([key_ids.gather(1, order), value_ids.gather(1, order)], dim=-1).reshape(batch, 2 * queries)
    ids = torch.cat([torch.full((batch, 1), BOS), context, noise, asked], dim=1)
    answer = torch.zeros_like(ids, dtype=torch.bool)
    start = 1 + 2 * pairs + gap
    answer[:, start::2] = True  # the query keys: the next token is its value
    return ids, answer, value_ids


def kind_settings(kind: str, args) -> dict | None:
    """What `dijiang.convert` gets for a kind (None: the softmax model itself), --mix-init applied to window kinds."""
    settings = KINDS[kind]
    if settings is None:
        return None
    windowed = settings.get("window", args.window) > 0
    mix = {"window_mix_init": args.mix_init} if args.mix_init is not None and windowed else {}
    return {"window": args.window, **mix, **settings}


def build(kind: str, args, vocab: int) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, head_dim=args.hidden // args.heads,
        max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=BOS,
        eos_token_id=BOS)
    model = transformers.LlamaForCausalLM(config)
    settings = kind_settings(kind, args)
    return model if settings is None else dijiang.convert(model, settings)


def answer_loss(model, ids, answer):
    logits = model(ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1][answer[:, :-1]], ids[:, 1:][answer[:, :-1]])


@torch.no_grad()
def scores(model, data) -> dict:
    """accuracy: the share of answers right; in_set: the share that is one of the sequence's values at all (1 for
    a model that holds the set of values, whether or not it binds them to their keys)."""
    model.eval()
    hits = in_set = total = 0
    for ids, answer, values in data:
        predicted = model(ids, use_cache=False).logits[:, :-1].argmax(-1)
        mask = answer[:, :-1]
        hits += int((predicted == ids[:, 1:])[mask].sum())
        in_set += int((predicted.unsqueeze(-1) == values.unsqueeze(1)).any(-1)[mask].sum())
        total += int(mask.sum())
    model.train()
    return {"accuracy": hits / total, "in_set": in_set / total}


def branch_weights(model) -> list[float]:
    """Each window layer's branch weight, softplus(window_mix) averaged over its heads ([] without a window)."""
    return [F.softplus(layer.window_mix.detach().float()).mean().item()
            for _, layer in dijiang.conversion.iter_dijiang_layers(model) if layer.window_mix is not None]


def make_optimizer(model, lr: float, mix_lr: float | None = None, kept_lr: float | None = None):
    """``dijiang train``'s AdamW groups (``build_optimizer``): everything at `lr`; with `kept_lr` (a converted model)
    the weights conversion kept at that peak and what it added at `lr`; with `mix_lr` the window layers' branch
    weights (window_mix) at theirs. Plain AdamW otherwise, as the probe has always trained: no weight decay, betas
    0.9 / 0.999. Each group's peak is its ``peak_lr``."""
    added = {id(p) for p in model.parameters()} if kept_lr is None else new_parameter_ids(model)
    config = TrainConfig(lr=lr if kept_lr is None else kept_lr, new_lr=lr, mix_lr=mix_lr, weight_decay=0.0,
                         beta1=0.9, beta2=0.999)
    return build_optimizer(model.named_parameters(), added, config)


def train_loop(model, kind: str, args, held_out, optimizer, steps: int, loss_of, gen,
               score_start: bool = False) -> list[dict]:
    """`optimizer` with a one-cycle schedule to each group's peak over `steps` fresh batches, `loss_of(model, ids,
    answer)` the loss; returns
    the held-out curve (from step 0 with `score_start`). The plain window trains and is scored with its branch held
    at softplus(-30)."""
    peaks = [group["peak_lr"] for group in optimizer.param_groups]
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=steps, pct_start=0.1)
    curve = []
    with linear_branch_off(model) if kind == "window" else contextlib.nullcontext():
        if kind == "window":
            for _, layer in dijiang.conversion.iter_dijiang_layers(model):
                layer.window_mix.requires_grad_(False)
        if score_start:
            curve.append({"step": 0, "loss": None, **scores(model, held_out)})
        for step in tqdm(range(1, steps + 1), desc=kind, leave=False):
            ids, answer, _ = mqar_batch(args.batch, args.pairs, args.queries, args.gap, args.keys, args.values,
                                        args.filler, gen)
            loss = loss_of(model, ids, answer)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if step % args.eval_every == 0 or step == steps:
                curve.append({"step": step, "loss": loss.item(), **scores(model, held_out)})
                tqdm.write(f"{kind}: step {step} loss {loss.item():.3f} accuracy {curve[-1]['accuracy']:.3f} "
                           f"in set {curve[-1]['in_set']:.3f}")
    return curve


def finish_result(kind: str, model, curve: list[dict], held_out, weights_at_init: list[float], start: float) -> dict:
    result = {"kind": kind, "curve": curve, "accuracy": curve[-1]["accuracy"], "in_set": curve[-1]["in_set"],
              "seconds": time.perf_counter() - start}
    if weights_at_init:  # where the window layers' branch weights went (what --mix-init and --mix-lr act on)
        result |= {"branch_weight_init": weights_at_init, "branch_weight": branch_weights(model)}
    if kind != "window" and has_linear_branch(model):
        with linear_branch_off(model):
            result["accuracy_branch_off"] = scores(model, held_out)["accuracy"]
    return result


def train_kind(kind: str, args, vocab: int, held_out) -> tuple[torch.nn.Module, dict]:
    """A kind trained from scratch on the task: the model and its result."""
    start = time.perf_counter()
    model = build(kind, args, vocab)
    weights_at_init = branch_weights(model)
    optimizer = make_optimizer(model, args.lr, args.mix_lr if kind != "window" else None)
    curve = train_loop(model, kind, args, held_out, optimizer, args.steps, answer_loss,
                       torch.Generator().manual_seed(args.seed + 1))
    return model, finish_result(kind, model, curve, held_out, weights_at_init, start)


TEACHER_SETTINGS = ("pairs", "queries", "gap", "keys", "values", "filler", "hidden", "heads", "layers", "steps",
                    "batch", "lr", "seed")  # what the softmax model a --teacher-cache file holds was trained with


def teacher_model(args, vocab: int, held_out) -> tuple[torch.nn.Module, dict]:
    """The softmax model trained from scratch (as ``train_kind``), or read from --teacher-cache when that file was
    written with the same settings; with --teacher-cache and no file there, it is written."""
    wanted = {name: getattr(args, name) for name in TEACHER_SETTINGS}
    cache = args.teacher_cache
    if cache is not None and cache.exists():
        saved = torch.load(cache, weights_only=True)
        if saved["settings"] != wanted:
            raise SystemExit(f"--teacher-cache {cache} was trained with {saved['settings']}, not {wanted}: "
                             "name another file")
        model = build("softmax", args, vocab)
        model.load_state_dict(saved["state_dict"])
        return model, saved["result"]
    model, result = train_kind("softmax", args, vocab, held_out)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(cache.name + ".partial")
        torch.save({"settings": wanted, "state_dict": model.state_dict(), "result": result}, partial)
        partial.replace(cache)  # a kill leaves no half-written teacher to be read later
    return model, result


def distil_kind(kind: str, teacher, args, held_out) -> dict:
    """A kind made from the trained softmax model as SmolLM2 is made (``dijiang.convert``: its pretrained weights
    kept, the new parameters at init), then distilled from it (KD + 0.2 LM, ``dijiang.losses``) on fresh batches."""
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    student = dijiang.convert(copy.deepcopy(teacher), kind_settings(kind, args))
    weights_at_init = branch_weights(student)
    optimizer = make_optimizer(student, args.lr, args.mix_lr if kind != "window" else None, args.pretrained_lr)
    teacher.eval()

    def loss_of(model, ids, answer):
        with torch.no_grad():
            teacher_logits = teacher(ids, use_cache=False).logits
        return distillation_loss(model(ids, use_cache=False).logits, teacher_logits, ids, 1.0, 0.2)["loss"]

    curve = train_loop(student, kind, args, held_out, optimizer, args.distil_steps, loss_of,
                       torch.Generator().manual_seed(args.seed + 2), score_start=True)
    return finish_result(kind, student, curve, held_out, weights_at_init, start)


def set_level(pairs: int, queries: int) -> float:
    """The accuracy of a model that remembers which values the pairs held but not which key each went with,
    guessing among the values not yet restated: the level above which a kind binds keys to values."""
    return sum(1 / (pairs - i) for i in range(queries)) / queries


def plot(results: list[dict], chance: float, set_only: float, path: Path, teacher: float | None = None) -> None:
    """Accuracy against step for every result; with `teacher` (--distil) the students only, from their step 0,
    and the teacher's accuracy as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in results:
        ax.plot([p["step"] for p in r["curve"]], [p["accuracy"] for p in r["curve"]], marker="o", ms=3,
                label=r["kind"])
    ax.axhline(chance, color="k", lw=0.8, ls="--", label="chance")
    ax.axhline(set_only, color="k", lw=0.8, ls=":", label="the values' set, no binding")
    if teacher is not None:
        ax.axhline(teacher, color="tab:red", lw=0.8, label="the softmax teacher")
    ax.set_xlabel("distillation step" if teacher is not None else "training step")
    ax.set_ylabel("recall accuracy, held out")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("MQAR past the window, tiny Llamas " + ("converted from a softmax teacher and distilled"
                                                          if teacher is not None else "from scratch"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of: {', '.join(KINDS)}")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--queries", type=int, help="keys asked again, distinct (default: half the pairs)")
    parser.add_argument("--gap", type=int, default=48, help="filler tokens between the pairs and the queries")
    parser.add_argument("--keys", type=int, default=64)
    parser.add_argument("--values", type=int, default=64)
    parser.add_argument("--filler", type=int, default=32)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--mix-init", type=positive_float, help="the window kinds' branch weight at init (softplus of "
                        "window_mix; default: the library's, 0.1)")
    parser.add_argument("--mix-lr", type=positive_float, help="the window kinds' branch weights (window_mix) at "
                        "their own peak learning rate (default: --lr, with the rest)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--held-out", type=int, default=256, help="held-out sequences")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--distil", action="store_true", help="train the softmax model first, then make each other "
                        "kind from it by dijiang.convert and distil it from it (KD + 0.2 LM), as SmolLM2's students")
    parser.add_argument("--distil-steps", type=int, help="distillation steps of each kind (default: --steps)")
    parser.add_argument("--pretrained-lr", type=positive_float, help="with --distil: the converted model's pretrained "
                        "weights' peak learning rate (default: --lr / 10; what conversion added trains at --lr)")
    parser.add_argument("--teacher-cache", type=Path, help="with --distil: read the trained softmax model from this "
                        "file if it was trained with the same settings, else train it and write it there")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    args = parser.parse_args(argv)
    args.queries = max(1, args.pairs // 2) if args.queries is None else args.queries
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown kinds {unknown}; known: {', '.join(KINDS)}")
    for name in ("pairs", "queries", "keys", "values", "filler", "window", "steps", "batch", "eval_every", "held_out",
                 "layers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.queries > args.pairs:
        parser.error("--queries must not exceed --pairs (each key is asked once)")
    if args.pairs > args.keys:
        parser.error("--pairs must not exceed --keys (the keys of a sequence are distinct)")
    if args.gap < args.window:
        parser.error(f"--gap {args.gap} < --window {args.window}: a window would see the pairs")
    if args.hidden % args.heads:
        parser.error("--hidden must be a multiple of --heads")
    if not args.distil and (args.distil_steps, args.pretrained_lr, args.teacher_cache) != (None, None, None):
        parser.error("--distil-steps, --pretrained-lr and --teacher-cache go with --distil")
    if args.distil and "softmax" in kinds:
        parser.error("with --distil the softmax model is the teacher: leave it out of --kinds")
    args.distil_steps = args.steps if args.distil_steps is None else args.distil_steps
    if args.distil_steps < 1:
        parser.error("--distil-steps must be >= 1")
    args.pretrained_lr = args.lr / 10 if args.pretrained_lr is None else args.pretrained_lr
    vocab = 2 + args.keys + args.values + args.filler
    gen = torch.Generator().manual_seed(10_000 + args.seed)  # held out: another stream than training's
    held_out = [mqar_batch(min(64, args.held_out), args.pairs, args.queries, args.gap, args.keys, args.values,
                           args.filler, gen)
                for _ in range(-(-args.held_out // 64))]
    if args.distil:
        teacher, teacher_result = teacher_model(args, vocab, held_out)
        results = [teacher_result] + [distil_kind(kind, teacher, args, held_out) for kind in kinds]
    else:
        results = [train_kind(kind, args, vocab, held_out)[1] for kind in kinds]
    chance, set_only = 1 / args.values, set_level(args.pairs, args.queries)
    rows = [{"kind": r["kind"] + (" (teacher)" if args.distil and r["kind"] == "softmax" else ""),
             "converted, untrained": f"{r['curve'][0]['accuracy']:.3f}" if r["curve"][0]["step"] == 0 else "",
             "accuracy": f"{r['accuracy']:.3f}", "in set": f"{r['in_set']:.3f}",
             "branch off": f"{r['accuracy_branch_off']:.3f}" if "accuracy_branch_off" in r else "",
             "seconds": f"{r['seconds']:.0f}"} for r in results]
    T = 1 + 2 * (args.pairs + args.queries) + args.gap
    print(f"MQAR: {args.pairs} pairs, {args.queries} asked, gap {args.gap}, T {T}, window {args.window}, "
          f"chance {chance:.3f}, set level {set_only:.3f}; "
          f"{args.layers} layers x {args.hidden}, {args.steps} steps of {args.batch}"
          + (f"; then {args.distil_steps} steps of distillation from it" if args.distil else ""))
    columns = ["kind", "accuracy", "in set", "branch off", "seconds"]
    print(markdown_table(rows, columns[:1] + ["converted, untrained"] * args.distil + columns[1:]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        paths = {name: str(getattr(args, name)) for name in ("json", "png", "teacher_cache")}
        write_text_atomic(args.json, json.dumps({"settings": vars(args) | paths, "chance": chance,
                                                 "set_level": set_only, "results": results}, indent=1) + "\n")
    if args.png:
        args.png.parent.mkdir(parents=True, exist_ok=True)
        if args.distil:
            plot(results[1:], chance, set_only, args.png, teacher=results[0]["accuracy"])
        else:
            plot(results, chance, set_only, args.png)
        print(args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
