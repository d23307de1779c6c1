"""Where the teacher's far-context gain sits: tokens it can copy from beyond the window, or the rest?

A window hybrid sees exact softmax over its last W tokens and the first S (its sinks); everything else reaches it
only through the linear state. This probe asks what that costs the teacher itself, token by token: the
teacher with full attention against the same teacher with every layer cut to a W-token band plus S sinks
(`probe_layer_choice.BandedAttention`, untrained). The per-token loss gain of full attention is split by
whether the token is *copyable from beyond the window*: the n-gram ending at it (its n - 1 preceding tokens and
itself) occurred before, last outside the W keys of the query that predicts it, so an induction head reading
far tokens could predict it and the band could not. A constant-size additive state cannot look such a token up (docs/results.md,
retrieval), so the share of the gain on copyable tokens bounds what the linear branch can win back.

    python scripts/probe_far_gain.py [--text pydoc --text novel.txt ...] [--tokens 2048] [--windows 4]
        [--window 124] [--sinks 4] [--ngram 4] [--far-from 512] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dijiang  # noqa: E402
from dijiang.evaluate import load_text  # noqa: E402
from probe_layer_choice import BandedAttention  # noqa: E402


def copyable_from_afar(ids: list[int], ngram: int, window: int) -> list[bool]:
    """For each target position t: did the n-gram ids[t - ngram + 1 .. t] occur before, with its latest earlier
    occurrence ending at p < t - window, i.e. outside the `window` keys (t - window .. t - 1) of the query that
    predicts t? (An occurrence inside them, the band can copy.) Position t < ngram - 1 has no full n-gram."""
    latest_end: dict[tuple[int, ...], int] = {}
    out = []
    for t in range(len(ids)):
        if t < ngram - 1:
            out.append(False)
            continue
        key = tuple(ids[t - ngram + 1 : t + 1])
        p = latest_end.get(key)
        out.append(p is not None and p < t - window)
        latest_end[key] = t
    return out


@torch.no_grad()
def token_losses(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token loss at positions 1 .. T - 1 of one window [1, T] (float32, [T - 1])."""
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    return F.cross_entropy(logits, ids[0, 1:], reduction="none")


def split_gain(full: torch.Tensor, banded: torch.Tensor, copyable: torch.Tensor) -> dict:
    """full, banded: per-token losses; copyable: bool, same length. Gain = banded - full (what the far context is
    worth to the teacher, in nats)."""
    gain = banded - full
    n = int(copyable.numel())
    n_copy = int(copyable.sum())
    total = float(gain.sum())
    on_copy = float(gain[copyable].sum())
    return {
        "tokens": n,
        "copyable_share": n_copy / n,
        "mean_gain_copyable": on_copy / max(n_copy, 1),
        "mean_gain_other": (total - on_copy) / max(n - n_copy, 1),
        "gain_share_copyable": on_copy / total if total else 0.0,
        "ppl_full": float(torch.exp(full.mean())),
        "ppl_banded": float(torch.exp(banded.mean())),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--text", action="append", help="'pydoc' (the default), a file, ...; repeatable")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens a window")
    parser.add_argument("--windows", type=int, default=4, help="windows a text (consecutive, from the start)")
    parser.add_argument("--window", type=int, default=124, help="the band every layer keeps")
    parser.add_argument("--sinks", type=int, default=4, help="first tokens every layer keeps seeing")
    parser.add_argument("--ngram", type=int, default=4)
    parser.add_argument("--far-from", type=int, default=512, help="score the targets from this position on")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the table's numbers here")
    args = parser.parse_args(argv)
    if not 0 < args.far_from < args.tokens or args.ngram < 1 or args.window < 1 or args.windows < 1:
        parser.error("needs 0 < --far-from < --tokens, --ngram >= 1, --window >= 1, --windows >= 1")
    teacher, tokenizer = dijiang.load_pretrained(args.model, device=args.device)
    teacher.eval()
    band = BandedAttention(args.window, args.sinks)
    AttentionInterface.register("probe_banded", band)
    teacher.set_attn_implementation("probe_banded")
    every_layer = set(range(teacher.config.num_hidden_layers))
    results = {"args": vars(args), "texts": {}}
    print(f"| text | far tokens | copyable from beyond {args.window} | mean gain, copyable / other (nats) | "
          f"share of the gain on copyable | ppl full / banded |")
    print("|---|---:|---:|---|---:|---|")
    for source in args.text or ["pydoc"]:
        ids = tokenizer(load_text(source), add_special_tokens=False)["input_ids"]
        if len(ids) < args.tokens:
            parser.error(f"{source}: {len(ids)} tokens, fewer than --tokens {args.tokens}")
        full, banded, copyable = [], [], []
        for w in range(min(args.windows, len(ids) // args.tokens)):
            window_ids = ids[w * args.tokens : (w + 1) * args.tokens]
            x = torch.tensor([window_ids], device=args.device)
            band.kept = every_layer
            full.append(token_losses(teacher, x)[args.far_from - 1 :])
            band.kept = set()
            banded.append(token_losses(teacher, x)[args.far_from - 1 :])
            # target t (predicted from t - 1) is copyable when the n-gram ending at t repeats from afar
            copyable.append(torch.tensor(copyable_from_afar(window_ids, args.ngram, args.window)[args.far_from :]))
        row = split_gain(torch.cat(full).cpu(), torch.cat(banded).cpu(), torch.cat(copyable))
        results["texts"][source] = row
        print(f"| {Path(source).name} | {row['tokens']} | {100 * row['copyable_share']:.1f} % | "
              f"{row['mean_gain_copyable']:.3f} / {row['mean_gain_other']:.3f} | "
              f"{100 * row['gain_share_copyable']:.0f} % | {row['ppl_full']:.2f} / {row['ppl_banded']:.2f} |",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
