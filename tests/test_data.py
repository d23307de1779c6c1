"""Reading sources, packing, held-out split, deterministic order, teacher samples, clear errors."""
import json

import pytest
import torch

from dijiang import data
from helpers import tiny_llama, tiny_tokenizer


class DigitTokenizer:
    """'5 5 7' -> [5, 5, 7]; EOS is 0. Makes block contents easy to predict."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        if isinstance(texts, str):
            return {"input_ids": [int(x) for x in texts.split()]}
        return {"input_ids": [[int(x) for x in text.split()] for text in texts]}


def _docs(n, length):
    return [" ".join([str(i + 1)] * length) for i in range(n)]


def test_pack_blocks_concatenates_documents_with_eos_and_drops_the_remainder():
    token_docs = data.tokenize_documents(["1 2 3", "4 5", "6 7 8 9"], DigitTokenizer())
    assert token_docs == [[1, 2, 3, 0], [4, 5, 0], [6, 7, 8, 9, 0]]
    blocks = data.pack_blocks(token_docs, 4)
    assert blocks.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert data.pack_blocks(token_docs, 5).tolist() == [[1, 2, 3, 0, 4], [5, 0, 6, 7, 8]]


def test_build_blocks_keeps_every_token_once_and_one_eos_per_document():
    docs = _docs(10, 7)  # 10 docs x (7 + EOS) = 80 tokens = 10 blocks of 8
    packed = data.build_blocks(docs, DigitTokenizer(), block_size=8, seed=3)
    flat = packed.train.flatten().tolist()
    assert packed.train.shape == (10, 8) and len(packed.held_out) == 0
    assert flat.count(0) == 10
    for doc_id in range(1, 11):  # each document stays contiguous, followed by its EOS
        start = flat.index(doc_id)
        assert flat[start : start + 8] == [doc_id] * 7 + [0]


def test_held_out_split_is_by_document_with_no_overlap():
    docs = _docs(20, 15)  # 16 tokens per document
    packed = data.build_blocks(docs, DigitTokenizer(), block_size=8, held_out=3, seed=0)
    train_ids = set(packed.train.flatten().tolist()) - {0}
    held_ids = set(packed.held_out.flatten().tolist()) - {0}
    assert len(packed.held_out) >= 3 and not train_ids & held_ids
    assert len(train_ids | held_ids) == 20
    by_fraction = data.build_blocks(docs, DigitTokenizer(), block_size=8, held_out=0.25, seed=0)
    assert len(by_fraction.held_out) == 10 and len(by_fraction.train) == 30


def test_shuffling_is_deterministic_by_seed():
    docs = _docs(30, 5)
    first = data.build_blocks(docs, DigitTokenizer(), 6, held_out=2, seed=1)
    again = data.build_blocks(docs, DigitTokenizer(), 6, held_out=2, seed=1)
    other = data.build_blocks(docs, DigitTokenizer(), 6, held_out=2, seed=2)
    assert torch.equal(first.train, again.train) and torch.equal(first.held_out, again.held_out)
    assert not torch.equal(first.train, other.train)


def test_block_stream_resumes_at_a_position_and_covers_each_epoch_once():
    blocks = torch.arange(10).view(10, 1)
    stream = data.BlockStream(blocks, seed=4)
    served = torch.cat([stream.next_blocks(3) for _ in range(5)]).flatten().tolist()
    assert sorted(served[:10]) == list(range(10)) and served[:10] != served[10:]
    resumed = data.BlockStream(blocks, seed=4, position=6)
    assert resumed.next_blocks(9).flatten().tolist() == served[6:15]


def test_read_documents_from_folders_jsonl_and_files(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "sub" / "deeper" / "c.rst").write_text("gamma")
    (tmp_path / "sub" / "blob.bin").write_bytes(b"\x00\x01binary")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "secret.txt").write_text("hidden")
    (tmp_path / "sub" / "records.jsonl").write_text(
        json.dumps({"text": "delta", "body": "x"}) + "\n\n" + json.dumps({"text": "epsilon", "body": "y"}) + "\n"
    )
    (tmp_path / "sub" / "latin1.txt").write_bytes("café".encode("latin-1"))
    # sorted paths: a.txt, sub/b.md, sub/deeper/c.rst, sub/records.jsonl; binary, non-UTF-8 and hidden files skipped
    with pytest.warns(UserWarning, match=r"skipped 2 file\(s\).*sub/blob.bin, sub/latin1.txt"):
        assert data.read_documents([str(tmp_path)]) == ["alpha", "beta", "gamma", "delta", "epsilon"]
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8"):  # named on its own: an error, not a skip
        data.read_documents([str(tmp_path / "sub" / "latin1.txt")])
    assert data.read_documents(str(tmp_path / "sub" / "records.jsonl"), text_field="body") == ["x", "y"]
    mixed = data.read_documents([str(tmp_path / "a.txt"), str(tmp_path / "sub" / "records.jsonl"), "pydoc"])
    assert mixed[:3] == ["alpha", "delta", "epsilon"] and "assignment" in mixed[3].lower()


def test_dataset_folder_is_read_as_a_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one", "two"], "n": [1, 2]}).save_to_disk(str(tmp_path / "ds"))
    assert data.read_documents([str(tmp_path / "ds")]) == ["one", "two"]
    with pytest.raises(ValueError, match="no column 'body'"):
        data.read_documents([str(tmp_path / "ds")], text_field="body")


def test_clear_errors_for_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.read_documents([str(tmp_path / "missing.txt")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        data.read_documents([str(bad)])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("  \n")
    with pytest.raises(ValueError, match="no training text"):
        data.build_blocks(data.read_documents([str(tmp_path / "empty")]), DigitTokenizer(), 8)
    with pytest.raises(ValueError, match="fewer than one block"):
        data.build_blocks(["1 2 3"], DigitTokenizer(), 8)


def test_hub_dataset_failure_names_the_source(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):  # what load_dataset does without network or cache
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="hf:no-such-owner/no-such-dataset"):
        data.read_documents(["hf:no-such-owner/no-such-dataset"])


def test_pydoc_topics_text_is_the_language_reference():
    text = data.pydoc_topics_text()
    assert len(text) > 100_000 and "Assignment statements" in text


def test_tokenizer_mismatch_is_detected():
    tokenizer = tiny_tokenizer()
    data.check_same_tokenizer(tokenizer, tiny_tokenizer())
    with pytest.raises(ValueError, match="vocabulary"):
        data.check_same_tokenizer(tokenizer, tiny_tokenizer(vocab_size=330))
    with pytest.raises(ValueError, match="same size but other tokens"):
        data.check_same_tokenizer(tokenizer, tiny_tokenizer(text_start=200_000))
    with pytest.raises(ValueError, match="other BPE merges"):
        data.check_same_tokenizer(tokenizer, with_merges_reordered(tokenizer))


def with_merges_reordered(tokenizer):
    """Same vocabulary, the last two merges swapped: a tokenizer that splits some words differently."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = spec["model"]["merges"]
    merges[-1], merges[-2] = merges[-2], merges[-1]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<eos>",
                                   pad_token="<eos>")


def test_sample_teacher_text_is_deterministic_and_long_enough():
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer)).eval()
    first = data.sample_teacher_text(model, tokenizer, 200, seed=5, max_new_tokens=32, batch_size=4)
    again = data.sample_teacher_text(model, tokenizer, 200, seed=5, max_new_tokens=32, batch_size=4)
    assert first == again and len(first) >= 4
    prompts = set(data.TEACHER_PROMPTS)
    assert all(doc.split("\n\n")[0] in prompts for doc in first)
    assert sum(len(tokenizer(d)["input_ids"]) for d in first) >= 200


def test_reads_compressed_jsonl_and_text(tmp_path):
    import gzip
    import json
    import lzma

    from dijiang import data as data_lib

    records = [{"text": "first document"}, {"text": "second document"}]
    with lzma.open(tmp_path / "part.jsonl.xz", "wt", encoding="utf-8") as handle:
        handle.write("\n".join(json.dumps(r) for r in records) + "\n")
    with gzip.open(tmp_path / "notes.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write("plain compressed text")
    assert data_lib.read_documents([str(tmp_path / "part.jsonl.xz")]) == ["first document", "second document"]
    assert data_lib.read_documents([str(tmp_path / "notes.txt.gz")]) == ["plain compressed text"]


def test_glob_patterns_expand_sorted_and_fail_when_empty(tmp_path, monkeypatch):
    import pytest

    from dijiang import data as data_lib

    for name, text in [("b.txt", "second"), ("a.txt", "first"), ("skip.md", "not matched")]:
        (tmp_path / name).write_text(text)
    assert data_lib.read_documents([str(tmp_path / "*.txt")]) == ["first", "second"]
    monkeypatch.chdir(tmp_path)
    assert data_lib.read_documents(["*.txt"]) == ["first", "second"]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        data_lib.read_documents([str(tmp_path / "*.jsonl")])
