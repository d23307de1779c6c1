"""dijiang.retrieval_data: synthetic retrieval documents, and their place in the training text."""
import random
import re

import pytest
from helpers import corpus_text, tiny_tokenizer, write_text_corpus

from dijiang import retrieval_data
from dijiang.evaluate import PASSKEY_FILLER, PASSKEY_INTRO, PASSKEY_NEEDLE, PASSKEY_QUESTION
from dijiang.train_config import TrainConfig
from dijiang.train_data import prepare_data

FILLER = [corpus_text(0, 6000), corpus_text(6000, 3000)]


def test_documents_are_seeded_and_sized():
    first = retrieval_data.retrieval_documents(FILLER, 5, 4000, seed=1)
    assert first == retrieval_data.retrieval_documents(FILLER, 5, 4000, seed=1)
    assert first != retrieval_data.retrieval_documents(FILLER, 5, 4000, seed=2)
    assert len(first) == 5 and all(4000 < len(doc) < 4000 + 6 * 2 * 120 for doc in first)
    with pytest.raises(ValueError, match="training text"):
        retrieval_data.retrieval_documents(["  "], 1, 4000)
    assert retrieval_data.retrieval_documents([], 0, 4000) == []


def test_every_question_follows_its_fact_and_is_answered_by_it():
    rng = random.Random(0)
    for _ in range(20):
        filler = corpus_text(rng.randrange(20000), 5000)
        text, facts = retrieval_data.retrieval_document(filler, rng, facts=4)
        assert len(facts) == 4 and len({(f.entity, f.attribute) for f in facts}) == 4
        for fact in facts:
            mentions = [m.start() for m in re.finditer(re.escape(f"{fact.attribute}"), text)
                        if fact.entity in text[max(0, m.start() - 80):m.start() + 80]]
            assert len(mentions) >= 2  # stated, then asked (a fact never shares its entity and attribute)
            stated = min(text.index(fact.stated(t)) for t in retrieval_data.FACTS if fact.stated(t) in text)
            asked = max(text.index(fact.stated(t)) for t in retrieval_data.QUESTIONS if fact.stated(t) in text)
            assert stated < asked and fact.value in text[asked:asked + 120]
            assert stated < 0.75 * len(text)  # facts sit in the first 70 % of the filler (+ what was inserted)


def test_wording_is_unlike_the_evaluations():
    """Passkey accuracy must stay a test of a format training never saw (and the layer probe's needles too)."""
    text = "".join(retrieval_data.retrieval_documents(FILLER, 30, 3000, seed=0)).lower()
    for phrase in ("pass key", "passkey", "serial number", "remember it", "memorize", "grass is green",
                   "the sky is blue", "hidden inside"):
        assert phrase not in text
    for piece in (PASSKEY_INTRO, PASSKEY_FILLER, PASSKEY_NEEDLE.format(key=1), PASSKEY_QUESTION):
        assert piece.strip().lower()[:20] not in text


def test_training_text_gains_the_documents(tmp_path):
    corpus = write_text_corpus(tmp_path / "corpus")
    tokenizer = tiny_tokenizer()
    base = dict(data=[str(corpus)], eval_data=[], block_size=64, data_cache=False, progress=False)
    plain, _ = prepare_data(TrainConfig(**base).validated(), None, tokenizer, None, tmp_path)
    mixed, _ = prepare_data(TrainConfig(**base, retrieval_documents=4).validated(), None, tokenizer, None, tmp_path)
    # each document is ~3 characters per token of block: about 4 x 192 characters more text
    assert len(mixed.train) > len(plain.train)
    decoded = tokenizer.decode(mixed.train.flatten().tolist())
    assert any(q.split("{")[0].strip() in decoded for q in retrieval_data.QUESTIONS)
    with pytest.raises(ValueError, match="retrieval_documents"):
        TrainConfig(**base, retrieval_documents=-1).validated()


def test_check_script_scores_the_answers():
    from helpers import tiny_llama
    from script_loader import load_script

    check = load_script("scripts/check_retrieval_data.py")
    tokenizer = tiny_tokenizer()
    rng = random.Random(0)
    documents = [retrieval_data.retrieval_document(corpus_text(0, 3000), rng, 3) for _ in range(2)]
    for text, facts in documents:
        offsets = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
        for fact in facts:
            positions = check.answer_tokens(text, fact, offsets)
            covered = text[offsets[positions[0]][0]:offsets[positions[-1]][1]]
            assert fact.value in covered
    result = check.score(tiny_llama(len(tokenizer)).eval(), tokenizer, documents)
    assert result["questions"] == 6 and 0 <= result["exact"] <= 6 and result["mean_logp"] < 0
