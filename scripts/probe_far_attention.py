#!/usr/bin/env python3
"""What the teacher attends to beyond the softmax window, and how much of it a linear kernel can see.

For every layer and head of a softmax model, on one long text, for queries t >= --min-query:
  far mass   = sum_{j <= t - window} softmax(s)_tj             (what a window-only model loses)
  overlap    = sum_j min(p_far, l_far), the histogram intersection of the teacher's attention over the
               far keys (normalised) and a candidate kernel's weights over the same keys (normalised):
               1 = the kernel ranks far keys exactly as the teacher does, uniform = no information.
Candidates: the exact exp kernel on pre-RoPE q, k; DiJiang feature maps phi(q).phi(k) on RoPE'd and
pre-RoPE q, k with the paper's normal radii and chi radii; uniform (content-blind) weights.
With --needles N it measures retrieval instead: N prompts of filler text (the --text file) with a
sentence holding a number at some depth and a question at the end, the answer teacher-forced; for every
head, the attention mass that the positions predicting the answer's digits put on the needle's digits
(retrieval heads). The needle and question wording is unlike the passkey evaluation's, on purpose: this
score picks the layers to keep as softmax, so it must not be tuned on the test.

    python scripts/probe_far_attention.py --text FILE [--tokens 2048] [--json out.json]
    python scripts/probe_far_attention.py --text FILE --needles 4 [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import dijiang
from dijiang.adapters import _seq_first, adapter_for
from dijiang.feature_maps import build_feature_map


def capture_qk(model, ids: torch.Tensor) -> list[dict]:
    """Per attention layer: raw (pre-RoPE) and RoPE'd q, k as [T, H, d] (kv heads expanded)."""
    adapter = adapter_for(model.config.model_type)
    layers = [m for m in model.modules() if adapter.is_attention(m)]
    found = [None] * len(layers)

    def hook(index):
        def keep(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            q, k, _ = adapter.raw_qkv(module, hidden)
            cos, sin = kwargs["position_embeddings"]
            qr, kr = adapter.rope(_seq_first(q), _seq_first(k), cos, sin)
            groups = q.shape[2] // k.shape[2]
            expand = (lambda x: x.repeat_interleave(groups, dim=1)) if groups > 1 else (lambda x: x)
            found[index] = dict(q=q[0].float(), k=expand(k[0].float()), qr=_seq_first(qr)[0].float(),
                                kr=expand(_seq_first(kr)[0].float()), scale=float(module.scaling))
        return keep

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(layers)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return found


def far_stats(q, k, scale, kernels: dict, window: int, min_query: int, sinks: int) -> dict:
    """Far mass (all far keys, and the first ``sinks`` tokens alone) and per-kernel overlap over the far keys
    past the sinks, for each head, over queries t >= min_query."""
    T, H, _ = q.shape
    t = torch.arange(min_query, T)[:, None]
    j = torch.arange(T)[None, :]
    far = (j <= t - window) & (j >= sinks)
    out = {"far_mass": [], "sink_mass": [], **{name: [] for name in kernels}}
    for h in range(H):
        s = scale * q[min_query:, h] @ k[:, h].T
        p = torch.softmax(s.masked_fill(j > t, float("-inf")), dim=-1)
        out["sink_mass"].append(p[:, :sinks].sum(-1).mean().item())
        pf = p * far
        mass = pf.sum(-1)
        out["far_mass"].append(mass.mean().item())
        pf = pf / mass.clamp_min(1e-30)[:, None]
        for name, weights in kernels.items():
            w = weights(h)[min_query:] * far
            w = w / w.sum(-1, keepdim=True).clamp_min(1e-30)
            overlap = torch.minimum(pf, w).sum(-1)
            out[name].append(((overlap * mass).sum() / mass.sum().clamp_min(1e-30)).item())  # mass-weighted
    return out


def kernels_for(layer: dict, index: int, head_dim: int, num_heads: int) -> dict:
    scale = layer["scale"]
    maps = {radius: build_feature_map("dijiang", head_dim, num_heads, scale=scale, seed=index, radius=radius)
            for radius in ("normal", "chi")}
    T = layer["q"].shape[0]

    def exact(q, k):
        return lambda h: torch.exp(scale * q[:, h] @ k[:, h].T - (scale * q[:, h] @ k[:, h].T).amax(-1, keepdim=True))

    def features(fm, q, k):
        qf, kf = fm(q), fm(k)
        return lambda h: qf[:, h] @ kf[:, h].T

    kernels = {"exact pre-RoPE": exact(layer["q"], layer["k"]),
               "uniform": lambda h: torch.ones(T, T)}
    for radius, fm in maps.items():
        with torch.no_grad():
            kernels[f"phi RoPE {radius}"] = features(fm, layer["qr"], layer["kr"])
            kernels[f"phi pre-RoPE {radius}"] = features(fm, layer["q"], layer["k"])
    return kernels


NEEDLE = " Note for later: the serial number of the {thing} is {key}. "
QUESTION = "\nQuestion: what is the serial number of the {thing}? Answer: the serial number of the {thing} is"
THINGS = ("red lamp", "old bicycle", "blue kettle", "garden gate", "small radio", "brass key")


def needle_prompts(tokenizer, filler_ids: list[int], count: int, tokens: int, seed: int = 0) -> list[dict]:
    """`count` prompts of `tokens` tokens: filler with a needle at a random depth, the question, the answer
    (teacher-forced). Each: {"ids": [...], "key_span": positions of the needle's key, "answer_start": int}."""
    import random

    rng = random.Random(seed)
    prompts = []
    for trial in range(count):
        thing, key = THINGS[trial % len(THINGS)], str(rng.randint(10000, 99999))
        needle = tokenizer(NEEDLE.format(thing=thing, key=key), add_special_tokens=False)["input_ids"]
        tail = tokenizer(QUESTION.format(thing=thing), add_special_tokens=False)["input_ids"]
        answer = tokenizer(" " + key, add_special_tokens=False)["input_ids"]
        room = tokens - len(needle) - len(tail) - len(answer)
        start = rng.randint(0, len(filler_ids) - room)
        filler = filler_ids[start:start + room]
        depth = rng.randint(room // 10, room * 9 // 10)
        ids = filler[:depth] + needle + filler[depth:] + tail + answer
        key_ids = tokenizer(key, add_special_tokens=False)["input_ids"]
        first = next(i for i in range(len(needle)) if needle[i:i + len(key_ids)] == key_ids)
        prompts.append({"ids": ids, "key_span": range(depth + first, depth + first + len(key_ids)),
                        "answer_start": len(ids) - len(answer)})
    return prompts


def retrieval_scores(model, tokenizer, filler_ids: list[int], needles: int, tokens: int, seed: int = 0) -> list:
    """[layer][head] mean attention mass from the answer-digit predictions onto the needle's digits."""
    totals = None
    for prompt in needle_prompts(tokenizer, filler_ids, needles, tokens, seed):
        ids = prompt["ids"]
        needle_span = torch.tensor(list(prompt["key_span"]))
        predictors = torch.arange(prompt["answer_start"] - 1, len(ids) - 1)  # each predicts the next token
        layers = capture_qk(model, torch.tensor([ids]))
        scores = []
        for layer in layers:
            s = layer["scale"] * torch.einsum("thd,jhd->htj", layer["qr"][predictors], layer["kr"])
            causal = torch.arange(len(ids))[None, None, :] > predictors[None, :, None]
            p = torch.softmax(s.masked_fill(causal, float("-inf")), dim=-1)
            scores.append(p[:, :, needle_span].sum(-1).mean(-1))  # [H]
        scores = torch.stack(scores)
        totals = scores if totals is None else totals + scores
    return (totals / needles).tolist()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--text", required=True, help="a long plain-text file (not an evaluation text)")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--min-query", type=int, default=1024)
    parser.add_argument("--sinks", type=int, default=4, help="first tokens counted apart (attention sinks)")
    parser.add_argument("--needles", type=int, default=0, help="measure retrieval heads over N needle prompts")
    parser.add_argument("--json", help="write the per-layer, per-head numbers here")
    args = parser.parse_args(argv)
    model, tokenizer = dijiang.load_pretrained(args.model, attn_implementation="eager")
    model.eval()
    text = open(args.text, encoding="utf-8").read()
    if args.needles:
        filler = tokenizer(text, add_special_tokens=False)["input_ids"]
        scores = retrieval_scores(model, tokenizer, filler, args.needles, args.tokens)
        for index, heads in enumerate(scores):
            print(f"layer {index:2d}  needle mass max {max(heads):.3f}  mean {sum(heads) / len(heads):.3f}")
        ranking = sorted(range(len(scores)), key=lambda i: -max(scores[i]))
        print("layers by their strongest retrieval head:", ranking)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "needle_mass": scores, "ranking": ranking}, f, indent=1)
        return 0
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, : args.tokens]
    if ids.shape[1] < args.tokens:
        sys.exit(f"{args.text} holds only {ids.shape[1]} tokens, fewer than --tokens {args.tokens}")
    layers = capture_qk(model, ids)
    rows = []
    for index, layer in enumerate(layers):
        T, H, d = layer["q"].shape
        kernels = kernels_for(layer, index, d, H)
        stats = far_stats(layer["qr"], layer["kr"], layer["scale"], kernels, args.window, args.min_query, args.sinks)
        rows.append(stats)
        means = {name: sum(v) / len(v) for name, v in stats.items()}
        print(f"layer {index:2d}  sink mass {means['sink_mass']:.3f}  far mass (past sinks) mean {means['far_mass']:.3f} "
              f"max {max(stats['far_mass']):.3f}  "
              + "  ".join(f"{name} {means[name]:.3f}" for name in kernels), flush=True)
    names = [n for n in rows[0] if not n.endswith("_mass")]
    weights = [m for r in rows for m in r["far_mass"]]
    print("\nmass-weighted overlap with the teacher's far attention, all heads:")
    for name in names:
        values = [v for r in rows for v in r[name]]
        print(f"  {name:22s} {sum(v * w for v, w in zip(values, weights)) / sum(weights):.3f}")
    ranking = sorted(range(len(rows)), key=lambda i: -max(rows[i]["far_mass"]))
    print("layers by their largest head far mass:", ranking)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "layers": rows, "ranking": ranking}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
