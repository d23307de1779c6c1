#!/usr/bin/env python3
"""Which layers do retrieval (or far-context perplexity) need as softmax? Greedy selection on a converted, untrained
model.

Every layer but the kept ones loses the context beyond its --window: with --proxy window (the default, fast)
it becomes a plain sliding-window softmax layer (the teacher's own attention, banded), with --proxy dijiang
it is converted to DiJiang by --settings, untrained (feature transform at identity, linear weight at its
initial value; slow on a CPU: ~15 s a 1024-token forward). The kept layers stay the teacher's full softmax.
Score of a kept set: over --prompts needle prompts (filler from --text, a sentence holding a 5-digit
serial number at a random depth, a question at the end, the answer teacher-forced), the mean log-probability
of the answer's tokens and the share of prompts whose every answer token is the argmax. Starting from no
kept layer, each round adds the layer that raises the mean log-probability most (--direction add); or, from
every layer kept, each round cuts the layer whose loss lowers it least (--direction cut).
With --score perplexity the score is instead the mean log-probability of the tokens past --far-from in one
--tokens-long window of each --text (teacher-forced; the second number is their perplexity): the layers whose
far context the next-token loss needs, whatever retrieval needs.

The needle and question wording is probe_far_attention.py's (unlike the passkey evaluation's, on purpose:
this picks the layers to keep, so it must not be tuned on the test).

Head hybrids (DuoAttention's idea; DiJiangSettings.full_kv_heads): --compare-kv-heads N,... scores the models that
keep the N key/value heads whose query heads retrieve most in the teacher (--head-scores, from
probe_far_attention.py --needles) whole, every other head of every layer cut; --compare-heads 7:2,18:2,... a named
set; --unit kv-head makes the greedy rounds keep (or cut) single key/value heads instead of layers and ends with the
--full-kv-heads list to train with. A head's memory is one key/value head's cache against a layer's
num_key_value_heads.

    python scripts/probe_layer_choice.py --text FILE [--tokens 1024] [--prompts 4] [--keep 4] [--shortlist 10]
        [--direction add|cut] [--proxy window|dijiang] [--passkey 2048] [--json out.json]
        [--compare-kv-heads 3,6,12 --head-scores NEEDLES.json] [--compare-heads 7:2,18:2,...] [--unit kv-head]
    python scripts/probe_layer_choice.py --score perplexity --text A.txt --text B.txt --tokens 2048 --far-from 512
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dijiang  # noqa: E402
from dijiang.arguments import layer_heads  # noqa: E402
from dijiang.files import read_json  # noqa: E402
from probe_far_attention import needle_prompts  # noqa: E402

DEFAULT_SETTINGS = {"window": 128, "radius": "chi", "decay_range": [0.0625, 6.103515625e-05],
                    "feature_transform": True}


def answer_prompts(tokenizer, filler_ids: list[int], count: int, tokens: int, seed: int = 0):
    """[(ids [1, T], answer_start)]: probe_far_attention's needle prompts, as tensors."""
    return [(torch.tensor([p["ids"]]), p["answer_start"])
            for p in needle_prompts(tokenizer, filler_ids, count, tokens, seed)]


@torch.no_grad()
def retrieval_score(model, prompts) -> tuple[float, float]:
    """(mean log-probability of the answer tokens, share of prompts answered exactly by argmax)."""
    logprobs, exact = [], 0
    for ids, answer_start in prompts:
        logits = model(input_ids=ids, use_cache=False).logits[0, answer_start - 1:-1].float()
        targets = ids[0, answer_start:]
        logprobs.append(torch.log_softmax(logits, -1).gather(-1, targets[:, None]).mean().item())
        exact += bool((logits.argmax(-1) == targets).all())
    return sum(logprobs) / len(logprobs), exact / len(prompts)


@torch.no_grad()
def far_perplexity_score(model, windows, far_from: int) -> tuple[float, float]:
    """(mean log-probability of the tokens at positions >= far_from, their perplexity), over every window."""
    nll, count = 0.0, 0
    for ids in windows:
        logits = model(input_ids=ids, use_cache=False).logits[0, far_from - 1:-1].float()
        nll += F.cross_entropy(logits, ids[0, far_from:], reduction="sum").item()
        count += ids.shape[1] - far_from
    return -nll / count, math.exp(nll / count)


def converted_except(teacher, settings: dict, kept: list[int]):
    layers = [i for i in range(teacher.config.num_hidden_layers) if i not in kept]
    return dijiang.convert(copy.deepcopy(teacher), settings, layers=layers)


class BandedAttention:
    """An attention implementation for transformers' AttentionInterface: full causal softmax in the kept layers,
    a causal band of `window` keys in the others, plus the first `sinks` tokens (no padding; a cache is fine, as in
    `generate`). Sinks: an untrained model cut to a window loses the first tokens its heads park attention on,
    which a trained window hybrid has learned to do without; keeping them separates far content from that."""

    def __init__(self, window: int, sinks: int = 0):
        self.window, self.sinks, self.kept = window, sinks, set()
        self.kept_heads: dict[int, set[int]] = {}  # layer -> key/value heads kept full in an otherwise cut layer

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        repeat = query.shape[1] // key.shape[1]  # grouped-query attention: one key head serves `repeat` queries
        key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
        if module.layer_idx in self.kept:
            return self.full(query, key, value, scaling).transpose(1, 2).contiguous(), None
        # with a cache (generate), the queries are the last query.shape[2] of key.shape[2] positions
        t = torch.arange(key.shape[2] - query.shape[2], key.shape[2], device=query.device)[:, None]
        j = torch.arange(key.shape[2], device=query.device)[None, :]
        band = (j <= t) & ((j > t - self.window) | (j < self.sinks))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=band, scale=scaling)
        heads = self.kept_heads.get(module.layer_idx)
        if heads:  # a head hybrid: the query heads of the kept key/value heads see everything
            full_heads = torch.tensor([h // repeat in heads for h in range(query.shape[1])], device=query.device)
            out = torch.where(full_heads[None, :, None, None], self.full(query, key, value, scaling), out)
        return out.transpose(1, 2).contiguous(), None

    @staticmethod
    def full(query, key, value, scaling):
        if query.shape[2] == key.shape[2]:
            return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
        return F.scaled_dot_product_attention(query, key, value, scale=scaling)  # decoding: every cached key


def top_kv_heads(probe_json: str, count: int, group: int) -> dict[int, set[int]]:
    """The `count` key/value heads whose query heads put the most attention on a needle, summed over each group of
    `group` query heads (scripts/probe_far_attention.py --needles N --json): {layer: {kv head, ...}}."""
    needle_mass = read_json(probe_json).get("needle_mass")
    if not isinstance(needle_mass, list):
        raise SystemExit(f"{probe_json}: no needle_mass (written by scripts/probe_far_attention.py --needles N)")
    scored = [(sum(heads[g * group:(g + 1) * group]), layer, g) for layer, heads in enumerate(needle_mass)
              for g in range(len(heads) // group)]
    kept: dict[int, set[int]] = {}
    for _, layer, g in sorted(scored, reverse=True)[:count]:
        kept.setdefault(layer, set()).add(g)
    return kept


def full_kv_heads_flag(heads: dict[int, set[int]]) -> str:
    """{7: {2}, 21: {0, 2}} -> '7:2,21:0,21:2', what `dijiang convert --full-kv-heads` takes."""
    return ",".join(f"{layer}:{h}" for layer, kv in sorted(heads.items()) for h in sorted(kv))


def model_keeping(teacher, proxy, settings: dict, kept: list[int], kept_heads: dict[int, set[int]] | None = None):
    """The model whose kept layers (and kept key/value heads) see everything and whose others see their window."""
    if proxy is None:  # the library's own layers: kept heads through DiJiangSettings.full_kv_heads
        return converted_except(teacher, {**settings, "full_kv_heads": dict(kept_heads or {})}, kept)
    proxy.kept, proxy.kept_heads = set(kept), dict(kept_heads or {})
    return teacher


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--text", required=True, action="append",
                        help="a long plain-text file (not an evaluation text); repeatable for --score perplexity "
                        "(one window from each), the first is the needles' filler")
    parser.add_argument("--score", choices=("retrieval", "perplexity"), default="retrieval")
    parser.add_argument("--far-from", type=int, default=512,
                        help="--score perplexity: score the tokens from this position on")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--keep", type=int, default=4, help="rounds of the greedy selection")
    parser.add_argument("--direction", choices=("add", "cut"), default="add",
                        help="add: from no kept layer, keep one more each round; cut: from every layer kept, cut the "
                             "one whose far context retrieval misses least")
    parser.add_argument("--unit", choices=("layer", "kv-head"), default="layer",
                        help="what the greedy rounds keep (or cut): whole layers, or single key/value heads (a head "
                        "hybrid, DiJiangSettings.full_kv_heads)")
    parser.add_argument("--shortlist", type=int, default=0,
                        help="after round 1, try only its N best layers (0: every layer, every round)")
    parser.add_argument("--proxy", choices=("window", "dijiang"), default="window")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--sinks", type=int, default=0, help="--proxy window: the first N tokens stay visible to "
                        "every layer (attention sinks)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--passkey", default="", help="after each round and for each --compare set, passkey accuracy "
                        "at these lengths (evaluation only: the choice never sees it), e.g. 2048")
    parser.add_argument("--passkey-trials", type=int, default=5)
    parser.add_argument("--settings", type=json.loads, default=DEFAULT_SETTINGS, help="DiJiang settings, JSON")
    parser.add_argument("--compare", action="append", default=[], metavar="I,J,...",
                        help="also score this kept set (repeatable), e.g. another choice's layers")
    parser.add_argument("--compare-kv-heads", default="", metavar="N,N,...",
                        help="also score head hybrids that keep the top N key/value heads full (ranked "
                        "by --head-scores), every other head cut to its window, e.g. 3,6,12")
    parser.add_argument("--compare-heads", action="append", default=[], metavar="LAYER:HEAD,...",
                        help="also score the head hybrid that keeps these key/value heads exact (repeatable), e.g. "
                        "the --unit kv-head rounds' choice")
    parser.add_argument("--head-scores", help="scripts/probe_far_attention.py --needles JSON of the same model: ranks "
                        "the key/value heads for --compare-kv-heads")
    parser.add_argument("--json", help="write every round's scores here")
    args = parser.parse_args(argv)
    head_counts = [int(n) for n in args.compare_kv_heads.split(",") if n.strip()]
    try:
        compare_heads = {spec: layer_heads(spec) for spec in args.compare_heads}
    except argparse.ArgumentTypeError as error:
        parser.error(f"--compare-heads: {error}")
    if head_counts and not args.head_scores:
        parser.error("--compare-kv-heads needs --head-scores")
    if any(n < 1 for n in head_counts):
        parser.error("--compare-kv-heads: counts must be at least 1")
    torch.manual_seed(0)
    teacher, tokenizer = dijiang.load_pretrained(args.model, device=args.device)
    teacher.eval()
    proxy = None
    if args.proxy == "window":
        proxy = BandedAttention(args.window, args.sinks)
        AttentionInterface.register("probe_banded", proxy)
        teacher.set_attn_implementation("probe_banded")
    texts = [tokenizer(Path(t).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"] for t in args.text]
    if args.score == "perplexity":
        if not 0 < args.far_from < args.tokens or any(len(ids) < args.tokens for ids in texts):
            parser.error(f"--score perplexity needs 0 < --far-from < --tokens and every --text of >= {args.tokens} tokens")
        prompts = [torch.tensor([ids[:args.tokens]], device=args.device) for ids in texts]

        def score_of(model):
            return far_perplexity_score(model, prompts, args.far_from)
    else:
        prompts = [(ids.to(args.device), start)
                   for ids, start in answer_prompts(tokenizer, texts[0], args.prompts, args.tokens)]

        def score_of(model):
            return retrieval_score(model, prompts)
    every_layer = list(range(teacher.config.num_hidden_layers))
    num_kv = getattr(teacher.config, "num_key_value_heads", None) or teacher.config.num_attention_heads
    group = teacher.config.num_attention_heads // num_kv  # query heads a key/value head serves
    for spec, heads in compare_heads.items():  # before any scoring: a typo costs no minutes
        if any(layer not in every_layer or max(h) >= num_kv for layer, h in heads.items()):
            parser.error(f"--compare-heads {spec}: the model has layers 0-{len(every_layer) - 1} and key/value heads "
                         f"0-{num_kv - 1}")
    full = teacher if proxy is None else model_keeping(teacher, proxy, args.settings, every_layer)
    second = "exact" if args.score == "retrieval" else "ppl"
    result = {"args": vars(args), "teacher": score_of(full)}
    print(f"teacher: log p {result['teacher'][0]:.3f}  {second} {result['teacher'][1]:.2f}", flush=True)
    result["none kept"] = score_of(model_keeping(teacher, proxy, args.settings, []))
    print(f"no layer kept: log p {result['none kept'][0]:.3f}  {second} {result['none kept'][1]:.2f}", flush=True)

    def save() -> None:  # after the comparisons and every round: a long run cut short keeps what it measured
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))

    def passkey_of(kept: list[int], kept_heads: dict[int, set[int]] | None = None) -> tuple[list[dict], str]:
        from dijiang.evaluate import passkey_accuracy

        lengths = [int(n) for n in args.passkey.split(",")]
        rows = passkey_accuracy(model_keeping(teacher, proxy, args.settings, kept, kept_heads), tokenizer, lengths,
                                trials=args.passkey_trials)
        return rows, "  passkey " + " / ".join(f"{r['context']}: {100 * r['accuracy']:.0f} %" for r in rows)

    result["compared"] = {}
    for kept_set in args.compare:
        layers = [int(i) for i in kept_set.split(",")]
        result["compared"][kept_set] = score_of(model_keeping(teacher, proxy, args.settings, layers))
        line = (f"kept {layers}: log p {result['compared'][kept_set][0]:.3f}  {second} "
                f"{result['compared'][kept_set][1]:.2f}")
        if args.passkey:
            rows, text = passkey_of(layers)
            result.setdefault("compared_passkey", {})[kept_set] = rows
            line += text
        print(line, flush=True)
    save()
    head_sets = {f"top {count}": top_kv_heads(args.head_scores, count, group) for count in head_counts}
    head_sets.update({spec: {layer: set(h) for layer, h in heads.items()} for spec, heads in compare_heads.items()})
    for label, heads in head_sets.items():
        flag = full_kv_heads_flag(heads)
        entry = {"kv_heads": {str(layer): sorted(h) for layer, h in sorted(heads.items())}, "full_kv_heads": flag,
                 "score": score_of(model_keeping(teacher, proxy, args.settings, [], heads))}
        line = (f"{label} (--full-kv-heads {flag}): log p {entry['score'][0]:.3f}  {second} "
                f"{entry['score'][1]:.2f}")
        if args.passkey:
            entry["passkey"], text = passkey_of([], heads)
            line += text
        result.setdefault("compared_kv_heads", {})[label.removeprefix("top ")] = entry
        print(line, flush=True)
        save()
    adding = args.direction == "add"
    by_head = args.unit == "kv-head"
    units = [(layer, h) for layer in every_layer for h in range(num_kv)] if by_head else every_layer
    name_of = {unit: (f"{unit[0]}:{unit[1]}" if by_head else str(unit)) for unit in units}

    def split(chosen) -> tuple[list[int], dict[int, set[int]]]:
        """(softmax layers, kept key/value heads) of a set of units."""
        if not by_head:
            return list(chosen), {}
        heads: dict[int, set[int]] = {}
        for layer, h in chosen:
            heads.setdefault(layer, set()).add(h)
        return [], heads

    kept = [] if adding else list(units)
    result["rounds"] = []
    for round_index in range(args.keep):
        started = time.time()
        if adding:
            candidates = units
            if round_index and args.shortlist:
                first = result["rounds"][0]["candidates"]
                candidates = sorted(units, key=lambda unit: -first[name_of[unit]][0])[:args.shortlist]
            trials = {unit: kept + [unit] for unit in candidates if unit not in kept}
        else:  # cut: which unit can lose its far context at the smallest cost
            trials = {unit: [k for k in kept if k != unit] for unit in kept}
        scores = {unit: score_of(model_keeping(teacher, proxy, args.settings, *split(trial)))
                  for unit, trial in trials.items()}
        best = max(scores, key=lambda unit: scores[unit][0])
        kept = trials[best]
        ranking = [name_of[u] for u in sorted(scores, key=lambda unit: -scores[unit][0])]
        result["rounds"].append({"kept": [name_of[u] if by_head else u for u in kept], "score": scores[best],
                                 "candidates": {name_of[u]: v for u, v in scores.items()}})
        what = [name_of[u] for u in kept] if by_head else kept
        what = f"keep {what}" if adding else f"cut {sorted(name_of[u] for u in set(units) - set(kept))}"
        line = (f"round {round_index + 1}: {what}  log p {scores[best][0]:.3f}  {second} {scores[best][1]:.2f}  "
                f"next best {ranking[1:4]}")
        if args.passkey:
            rows, text = passkey_of(*split(kept))
            result["rounds"][-1]["passkey"] = rows
            line += text
        print(f"{line}  ({time.time() - started:.0f} s)", flush=True)
        save()
    if result["rounds"] and by_head:
        flag = result["full_kv_heads"] = full_kv_heads_flag(split(kept)[1])
        mapping = ", ".join(f"{layer}: {sorted(h)}" for layer, h in sorted(split(kept)[1].items()))
        print(f"to keep these key/value heads exact and convert the rest: dijiang train ... --attention "
              f"'full_kv_heads={{{mapping}}}'  (dijiang convert --full-kv-heads {flag})", flush=True)
    elif result["rounds"]:
        converted = [layer for layer in every_layer if layer not in kept]
        result["converted_layers"] = converted
        print(f"to keep {sorted(kept)} as softmax and convert the rest: dijiang train ... --layers "
              f"{' '.join(map(str, converted))}  (or `layers: {converted}` in a recipe)", flush=True)
    save()  # with --keep 0: the comparisons alone
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
