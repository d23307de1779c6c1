"""Window hybrid before any training: how the initial linear-part mix affects SmolLM2's perplexity.

python benchmarks/window_mix_init.py                                (CPU, ~2 minutes): prints the table
python benchmarks/window_mix_init.py --out docs/window_mix_init.md   the same, written as the doc
"""
import argparse
import copy
import datetime
import math
import platform
from pathlib import Path

import torch

import dijiang
from dijiang.conversion import iter_dijiang_layers


def main(tokens: int = 512, mixes=(1.0, 0.1, 0.01, 0.0), out: str | None = None) -> str:
    from pydoc_data.topics import topics

    teacher, tokenizer = dijiang.load_pretrained("smollm2")
    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = tokenizer(text[: tokens * 8], return_tensors="pt").input_ids[:, :tokens]

    def evaluate(model):
        with torch.no_grad():
            logits = model(ids).logits
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
        return logits, math.exp(nll)

    teacher_logits, teacher_ppl = evaluate(teacher)
    rows = [f"| teacher (softmax) | - | {teacher_ppl:.1f} | 1.000 |"]
    for mix in mixes:
        student = dijiang.convert(copy.deepcopy(teacher), {"window": 64})
        raw = math.log(math.expm1(mix)) if mix > 0 else -30.0  # softplus(raw) = mix
        with torch.no_grad():
            for _, layer in iter_dijiang_layers(student):
                layer.window_mix.fill_(raw)
        logits, ppl = evaluate(student)
        agree = (logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean().item()
        rows.append(f"| window 64 + DiJiang | {mix} | {ppl:.1f} | {agree:.3f} |")
    table = "\n".join(["| model | initial mix softplus(window_mix) | pydoc perplexity | top-1 agreement |",
                       "|---|---|---|---|", *rows])
    doc = (f"# Window hybrid: initial mix, before training\n\nSmolLM2-135M-Instruct, {tokens} tokens of CPython's "
           f"pydoc topics, no fine-tuning.\n\n{table}\n\nCommand: `python benchmarks/window_mix_init.py`; "
           f"machine: {platform.machine()} CPU, torch {torch.__version__}; {datetime.date.today()}.\n")
    if out:
        Path(out).write_text(doc)
    print(doc)
    return doc


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="also write the doc here (docs/window_mix_init.md)")
    main(out=parser.parse_args().out)
