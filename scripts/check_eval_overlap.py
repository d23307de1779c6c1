#!/usr/bin/env python3
"""Which training documents share a 13-word shingle with an evaluation text (the rule build_corpus.py applies
to pydoc and Austen), for a text the corpus build did not know about, e.g. a third evaluation text.

    python scripts/check_eval_overlap.py --text python-stdlib.txt .gpu_corpus/part-000.jsonl.xz
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from dijiang.data import SHINGLE_WORDS, overlaps, read_documents, shingles  # noqa: E402


def overlapping(documents: list[str], text: str) -> list[int]:
    """Indices of the documents that share a SHINGLE_WORDS-word shingle with ``text``."""
    taken = shingles(text)
    return [i for i, doc in enumerate(documents) if overlaps(doc, taken)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", required=True, help="the evaluation text (a file)")
    parser.add_argument("sources", nargs="+", help="training sources (files or folders; .jsonl(.xz) read by text)")
    args = parser.parse_args(argv)
    documents = read_documents(args.sources)
    hits = overlapping(documents, Path(args.text).read_text(encoding="utf-8"))
    print(f"{len(hits)} of {len(documents)} documents share a {SHINGLE_WORDS}-word shingle with {args.text}")
    return 1 if hits else 0


if __name__ == "__main__":
    raise SystemExit(main())
