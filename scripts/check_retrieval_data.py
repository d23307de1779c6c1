#!/usr/bin/env python3
"""How well a model answers the synthetic retrieval documents of `dijiang.retrieval_data`.

KD on these documents teaches retrieval only as far as the teacher retrieves: this scores, teacher-forced, the
tokens of every question's answer (the value restated after the question) in --documents documents made from
the training text: exact = every answer token is the teacher's argmax.

    python scripts/check_retrieval_data.py --data .gpu_corpus/part-000.jsonl.xz [--documents 4] [--chars 12000]
    python scripts/check_retrieval_data.py --model runs/lc-transform-8k-retrieval/final --data ... --seed 1 --json r.json

A trained student is scored the same way; give it a --seed other than training's (0) for facts it never saw.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
import dijiang  # noqa: E402
from dijiang import retrieval_data  # noqa: E402
from dijiang.data import read_documents  # noqa: E402


def answer_tokens(text: str, fact, offsets) -> list[int]:
    """Positions of the tokens of the value that follows the fact's (last) question."""
    asked = max(text.index(fact.stated(t)) for t in retrieval_data.QUESTIONS if fact.stated(t) in text)
    start = text.index(fact.value, asked)
    return [i for i, (a, b) in enumerate(offsets) if b > start and a < start + len(fact.value)]


@torch.no_grad()
def score(model, tokenizer, documents: list[tuple[str, list]]) -> dict:
    exact, logps = 0, []
    for text, facts in documents:
        encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        ids = torch.tensor([encoded["input_ids"]], device=model.device)
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)
        for fact in facts:
            positions = answer_tokens(text, fact, encoded["offset_mapping"])
            exact += all(logp[i - 1].argmax().item() == ids[0, i].item() for i in positions)
            logps.append(sum(logp[i - 1, ids[0, i]].item() for i in positions) / len(positions))
    return {"questions": len(logps), "exact": exact, "mean_logp": sum(logps) / len(logps)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", required=True, help="training text (any `dijiang train --data` source)")
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--chars", type=int, default=12000, help="filler characters a document (~3-4.5K tokens)")
    parser.add_argument("--facts", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    model, tokenizer = dijiang.load_pretrained(args.model)
    model.to(args.device).eval()
    filler = [doc for doc in read_documents([args.data]) if len(doc) >= args.chars]
    if not filler:
        sys.exit(f"no document of {args.data} holds {args.chars} characters")
    rng = random.Random(args.seed)
    documents = [retrieval_data.retrieval_document(rng.choice(filler)[:args.chars], rng, args.facts)
                 for _ in range(args.documents)]
    result = score(model, tokenizer, documents)
    result.update(model=args.model, seed=args.seed, documents=args.documents, chars=args.chars)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.model}: {result['exact']} of {result['questions']} answers exact (argmax), mean log p of the answer "
          f"tokens {result['mean_logp']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
