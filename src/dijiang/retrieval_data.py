"""Synthetic retrieval documents for training: facts hidden in training text and asked about later.

Each document is a span of the training text with a few facts ("the locker number of the Belwick archive is
4821") put between its words, and, further on, a question about each fact followed by its answer, so that a
model trained on it (by KD, the teacher answers them: it sees the whole block) has to read back across hundreds
to thousands of tokens. Questions sit at random distances after their fact, so a document cut by block packing
still holds answerable questions.

The wording is unlike the passkey evaluation's (no "pass key", no repeated "the grass is green" filler: the filler
is the training text itself) and unlike scripts/probe_far_attention.py's serial-number needles, so that passkey
accuracy stays a test of a format that training never saw (`test_retrieval_data.py` checks the phrases).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

NAME_STARTS = ("Bel", "Cor", "Dun", "Fal", "Gar", "Hal", "Iv", "Jor", "Kel", "Lor", "Mar", "Nor", "Os", "Pel", "Quen",
               "Ros", "Sel", "Tam", "Ul", "Ver", "Wil", "Yar", "Zen")
NAME_ENDS = ("wick", "mont", "dale", "ford", "holm", "stead", "bury", "crest", "moor", "vale", "ridge", "haven")
KINDS = ("warehouse", "ship", "account", "project", "village", "station", "archive", "committee", "workshop", "farm")
ATTRIBUTES = ("access code", "locker number", "budget figure", "room number", "licence number", "batch code",
              "member count", "phone extension", "shelf mark", "ticket number")
FACTS = (
    " Note: the {attribute} of the {entity} is {value}. ",
    " For the record, the {entity} has {attribute} {value}. ",
    " (The {entity}: {attribute} {value}.) ",
    " It was agreed that the {attribute} for the {entity} would be {value}. ",
)
QUESTIONS = (  # each ends by restating the fact up to its value: a clear cue for the answer's first token
    " Q: What is the {attribute} of the {entity}? A: The {attribute} of the {entity} is {value}. ",
    " Asked for the {attribute} of the {entity}, the clerk replied that the {attribute} is {value}. ",
    " Question - {attribute} of the {entity}? Answer - the {entity} has {attribute} {value}. ",
)


@dataclass(frozen=True)
class Fact:
    entity: str
    attribute: str
    value: str

    def stated(self, template: str) -> str:
        return template.format(entity=self.entity, attribute=self.attribute, value=self.value)


def random_fact(rng: random.Random, taken: set[tuple[str, str]]) -> Fact:
    while True:
        entity = f"{rng.choice(NAME_STARTS)}{rng.choice(NAME_ENDS)} {rng.choice(KINDS)}"
        attribute = rng.choice(ATTRIBUTES)
        if (entity, attribute) not in taken:  # one value per question, or the answer would be ambiguous
            taken.add((entity, attribute))
            break
    if rng.random() < 0.7:
        value = str(rng.randint(10 ** (digits := rng.randint(3, 6)) // 10, 10 ** digits - 1))
    else:
        value = f"{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}-{rng.randint(100, 9999)}"
    return Fact(entity, attribute, value)


def _word_boundary(text: str, position: int) -> int:
    """The first space at or after `position` (or the end): facts go between words, never inside one."""
    found = text.find(" ", min(position, len(text)))
    return len(text) if found < 0 else found


def retrieval_document(filler: str, rng: random.Random, facts: int) -> tuple[str, list[Fact]]:
    """`filler` with `facts` facts in its first 70 % and a question about each at least 10 % further on."""
    length = len(filler)
    inserts: list[tuple[int, int, str]] = []  # (position in filler, order, text)
    taken: set[tuple[str, str]] = set()
    chosen = []
    for index in range(facts):
        fact = random_fact(rng, taken)
        chosen.append(fact)
        stated_at = _word_boundary(filler, int(rng.uniform(0.0, 0.7) * length))
        asked_at = _word_boundary(filler, int(rng.uniform(stated_at + 0.1 * length, length)))
        inserts.append((stated_at, 2 * index, fact.stated(rng.choice(FACTS))))
        inserts.append((max(asked_at, stated_at), 2 * index + 1, fact.stated(rng.choice(QUESTIONS))))
    pieces, last = [], 0
    for position, _, text in sorted(inserts):
        pieces += [filler[last:position], text]
        last = position
    pieces.append(filler[last:])
    return "".join(pieces), chosen


def retrieval_documents(filler_documents: list[str], count: int, chars: int, seed: int = 0,
                        facts: tuple[int, int] = (2, 6)) -> list[str]:
    """`count` documents of about `chars` characters of filler (spans of `filler_documents`, joined when one is
    shorter) with `facts` (lo, hi) facts each; seeded."""
    if count < 0 or chars < 100:
        raise ValueError(f"need count >= 0 and chars >= 100, got {count} and {chars}")
    usable = [doc for doc in filler_documents if doc.strip()]
    if count and not usable:
        raise ValueError("synthetic retrieval documents need training text to hide their facts in")
    rng = random.Random(seed)
    documents = []
    for _ in range(count):
        filler = ""
        while len(filler) < chars:
            doc = rng.choice(usable)
            start = rng.randrange(max(1, len(doc) - (chars - len(filler))))
            filler += doc[start:start + chars - len(filler)] + "\n"
        text, _ = retrieval_document(filler[:chars], rng, rng.randint(*facts))
        documents.append(text)
    return documents
