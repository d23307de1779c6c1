import copy
import math
import sys

import pytest
import torch
from helpers import tiny_llama, tiny_tokenizer

from dijiang import evaluate, plots
from dijiang.evaluate import (Window, attention_fidelity, load_text, markdown_table, passkey_correct,
                              passkey_prompt, perplexity, sliding_windows)

CORPUS = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
          "How vexingly quick daft zebras jump! 0123456789 pass key. ") * 4


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(len(tokenizer))


# ---------------------------------------------------------------- sliding windows and perplexity


@pytest.mark.parametrize("n,window,stride", [(2, 2, 1), (10, 4, 2), (100, 16, 5), (100, 16, 16), (7, 50, None),
                                             (257, 64, 63), (33, 8, 1)])
def test_sliding_windows_score_every_token_once(n, window, stride):
    windows = sliding_windows(n, window, stride)
    scored = [t for w in windows for t in range(w.first_target, w.end)]
    assert scored == list(range(1, n))
    for w in windows:
        assert 0 <= w.begin < w.first_target <= w.end <= n
        assert w.end - w.begin <= window
    # every window after the first has the full context the window allows
    assert all(w.end - w.begin == window for w in windows[1:])


def test_sliding_windows_bad_arguments():
    with pytest.raises(ValueError, match="window must be >= 2"):
        sliding_windows(10, 1)
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 4, 5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        sliding_windows(1, 4)


def manual_nll(model, ids, window, stride):
    """Independent reference: one token at a time, context = the window's tokens before it."""
    nlls = []
    for w in sliding_windows(len(ids), window, stride):
        with torch.no_grad():
            logits = model(input_ids=ids[None, w.begin:w.end]).logits[0]
        for t in range(w.first_target, w.end):
            log_probs = torch.log_softmax(logits[t - w.begin - 1].double(), -1)
            nlls.append(-float(log_probs[ids[t]]))
    return nlls


@pytest.mark.parametrize("window,stride", [(16, 16), (16, 5), (64, None)])
def test_perplexity_is_exp_mean_nll(model, tokenizer, window, stride):
    text = CORPUS[:300]
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    nlls = manual_nll(model, ids, window, stride)
    assert len(nlls) == len(ids) - 1
    result = perplexity(model, tokenizer, text, window=window, stride=stride, batch_size=3)
    assert result.num_targets == len(ids) - 1
    assert result.perplexity == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)


def test_perplexity_whole_text_in_one_window_matches_hf_loss(model, tokenizer):
    ids = tokenizer(CORPUS[:200], add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    result = perplexity(model, tokenizer, CORPUS[:200], window=ids.shape[1])
    assert result.num_windows == 1
    assert result.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_perplexity_bounds(model, tokenizer):
    result = perplexity(model, tokenizer, CORPUS, window=16, max_windows=3)
    assert result.num_windows == 3 and result.num_targets == 15 * 3
    result = perplexity(model, tokenizer, CORPUS, window=16, max_tokens=40)
    assert result.num_targets == 39


def test_perplexity_errors(model, tokenizer):
    with pytest.raises(ValueError, match="empty"):
        perplexity(model, tokenizer, "   ", window=16)
    with pytest.raises(ValueError, match="window must be >= 2"):
        perplexity(model, tokenizer, CORPUS, window=1)


def test_compare_perplexity_ratio(model, tokenizer):
    other = tiny_llama(len(tokenizer), seed=1)
    rows = evaluate.compare_perplexity({"teacher": model, "student": other}, tokenizer, CORPUS, window=32,
                                       max_windows=2)
    assert rows[0]["ratio"] == 1.0
    assert rows[1]["ratio"] == pytest.approx(rows[1]["perplexity"] / rows[0]["perplexity"])


# ---------------------------------------------------------------- text sources


def test_load_text_sources(tmp_path):
    assert "assert" in load_text("pydoc") and len(load_text()) > 100_000
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    assert load_text(tmp_path / "a.txt") == "alpha"
    with pytest.warns(UserWarning, match="skipped 1 file"):  # skip.bin
        assert load_text(tmp_path) == "alpha\n\nbeta"
    (tmp_path / "sub" / "c.jsonl").write_text('{"body": "gamma"}\n{"body": "delta"}\n')
    assert load_text(tmp_path / "sub" / "c.jsonl", column="body") == "gamma\n\ndelta"  # read as training reads it


def test_load_text_hub_split_and_config(monkeypatch):
    calls = []

    class FakeDatasets:
        @staticmethod
        def load_dataset(name, config, split):
            calls.append((name, config, split))
            return _Rows({"text": ["one", "", "two"]})

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    assert load_text("hf:some/set", config="raw") == "one\n\ntwo"
    assert load_text("hf:some/set:own@validation", split="test", config="raw") == "one\n\ntwo"
    assert calls == [("some/set", "raw", "test"), ("some/set", "own", "validation")]


class _Rows:
    """What a datasets.Dataset offers the reader: column_names and a column by name."""

    def __init__(self, columns: dict):
        self.columns, self.column_names = columns, list(columns)

    def __getitem__(self, name: str) -> list:
        return self.columns[name]


def test_load_text_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "bin").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        load_text(tmp_path / "bin")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ValueError, match="pip install datasets"):
        load_text("hf:some/unknown-dataset")


# ---------------------------------------------------------------- attention fidelity


def attention_names(model):
    return [f"model.layers.{i}.self_attn" for i in range(model.config.num_hidden_layers)]


def test_fidelity_identity_is_perfect(model, tokenizer):
    ids = tokenizer(CORPUS[:200], return_tensors="pt")["input_ids"]
    rows = attention_fidelity(model, copy.deepcopy(model), ids, attention_names(model))
    assert [r["layer"] for r in rows] == attention_names(model)
    for row in rows:
        assert row["cosine"] == pytest.approx(1.0, abs=1e-6)
        assert row["relative_mse"] == pytest.approx(0.0, abs=1e-10)


def test_fidelity_detects_a_different_attention(model, tokenizer):
    ids = tokenizer(CORPUS[:200], return_tensors="pt")["input_ids"]
    student = copy.deepcopy(model)
    with torch.no_grad():
        student.model.layers[1].self_attn.o_proj.weight.add_(0.5 * torch.randn_like(
            student.model.layers[1].self_attn.o_proj.weight))
    rows = attention_fidelity(model, student, ids, attention_names(model))
    assert rows[0]["cosine"] == pytest.approx(1.0, abs=1e-6)  # inputs are the teacher's: no compounding
    assert rows[1]["cosine"] < 0.999 and rows[1]["relative_mse"] > 1e-3


def test_fidelity_on_a_converted_model(model, tokenizer):
    dijiang = pytest.importorskip("dijiang")
    try:
        convert = dijiang.convert
    except (AttributeError, ImportError):
        pytest.skip("dijiang.convert not available yet")
    student = convert(copy.deepcopy(model))
    ids = tokenizer(CORPUS[:200], return_tensors="pt")["input_ids"]
    rows = attention_fidelity(model, student, ids)
    assert len(rows) == model.config.num_hidden_layers
    assert all(-1 <= r["cosine"] < 1 and r["relative_mse"] > 0 for r in rows)


# ---------------------------------------------------------------- passkey


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_passkey_prompt(tokenizer, depth):
    prompt = passkey_prompt(tokenizer, 1500, depth, 48213)
    assert prompt.text.count("48213") == 1
    needle = evaluate.PASSKEY_NEEDLE.format(key="48213")
    before = prompt.text[:prompt.text.index(needle)]
    assert before.count(evaluate.PASSKEY_FILLER) == prompt.needle_after == round(depth * prompt.num_filler)
    assert prompt.num_filler > 3
    assert prompt.text.endswith(evaluate.PASSKEY_QUESTION)
    length = len(tokenizer(prompt.text)["input_ids"])
    filler_tokens = len(tokenizer(evaluate.PASSKEY_FILLER)["input_ids"])
    assert 1500 - 2 * filler_tokens <= length <= 1500 + filler_tokens


def test_passkey_prompt_errors(tokenizer):
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(tokenizer, 100, 1.5, 12345)
    with pytest.raises(ValueError, match="digits"):
        passkey_prompt(tokenizer, 100, 0.5, "12a45")


def test_passkey_scoring():
    assert passkey_correct(" 48213. Remember", "48213")
    assert not passkey_correct(" 4821", "48213")
    assert not passkey_correct(" the key is 11111 48213", "48213")
    assert not passkey_correct(" no digits", "48213")


def test_passkey_needle_distance(tokenizer):
    for depth in (0.0, 0.5, 1.0):
        prompt = passkey_prompt(tokenizer, 2000, depth, 12345)
        tail = prompt.text[prompt.needle_at:]
        assert tail.startswith(evaluate.PASSKEY_NEEDLE.format(key=12345))
        assert prompt.tokens_from_needle(tokenizer) == len(tokenizer(tail, add_special_tokens=False)["input_ids"])
    assert passkey_prompt(tokenizer, 2000, 1.0, 1).tokens_from_needle(tokenizer) < \
        passkey_prompt(tokenizer, 2000, 0.0, 1).tokens_from_needle(tokenizer)


def test_passkey_past_the_window_counts_only_far_needles():
    rows = [{"correct": [True, False, True], "needle_to_end": [10, 300, 500]},
            {"correct": [False], "needle_to_end": [129]}]
    assert evaluate.passkey_past(rows, 128) == (1, 3)
    assert evaluate.passkey_past(rows, 1000) == (0, 0)


def test_passkey_accuracy_runs_and_is_seeded(model, tokenizer):
    first = evaluate.passkey_accuracy(model, tokenizer, [64, 128], trials=2, seed=3, max_new_tokens=3)
    assert [r["context"] for r in first] == [64, 128]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in first)
    assert all(r["accuracy"] == sum(r["correct"]) / 2 and len(r["needle_to_end"]) == 2 for r in first)
    assert all(0 < d <= r["context"] for r in first for d in r["needle_to_end"])
    assert first == evaluate.passkey_accuracy(model, tokenizer, [64, 128], trials=2, seed=3, max_new_tokens=3)


# ---------------------------------------------------------------- tables and plots


def test_markdown_table():
    rows = [{"model": "teacher", "ppl": 14.0312, "n": 3, "sample": "a|b\nc"},
            {"model": "student", "ppl": 3056.4, "n": 12, "sample": None}]
    table = markdown_table(rows, ["model", ("ppl", "perplexity"), "n", "sample"])
    assert table.splitlines() == [
        "| model | perplexity | n | sample |",
        "|---|---:|---:|---|",
        "| teacher | 14.03 | 3 | a\\|b\\nc |",
        "| student | 3056 | 12 |  |",
    ]
    assert markdown_table([], ["a"]).splitlines() == ["| a |", "|---|"]
    with pytest.raises(ValueError):
        markdown_table(rows, [])


def is_png(path):
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_plots_write_pngs(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(f'{{"step": {i}, "tokens": {i * 256}, "loss": {5 - i * 0.1}, "lr": 0.001}}'
                             for i in range(20)) + '\n{"event": "done"}\n')
    paths = [
        plots.plot_loss_curve(log, tmp_path / "loss.png"),
        plots.plot_fidelity([{"layer": f"model.layers.{i}.self_attn", "cosine": 0.9 - i / 50,
                              "relative_mse": 0.1 + i / 40} for i in range(6)], tmp_path / "fid.png"),
        plots.plot_demo([{"model": "teacher", "perplexity": 14.0}, {"model": "student", "perplexity": 40.0}],
                        log, tmp_path / "demo.png"),
    ]
    assert all(is_png(p) for p in paths)
    with pytest.raises(FileNotFoundError):
        plots.plot_loss_curve(tmp_path / "missing.jsonl", tmp_path / "x.png")


def test_eval_cli_registers():
    import argparse

    parser = argparse.ArgumentParser()
    evaluate.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--convert", "--window", "256", "--passkey", "256,512"])
    assert args.func is evaluate.run_eval and args.window == 256 and args.convert


def test_eval_cli_end_to_end(model, tokenizer, tmp_path, capsys):
    import argparse
    import json

    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    (tmp_path / "text.txt").write_text(CORPUS)
    parser = argparse.ArgumentParser()
    evaluate.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--teacher", str(tmp_path / "tiny"), "--convert", "--convert-window", "8",
                              "--text", str(tmp_path / "text.txt"), "--window", "32", "--max-windows", "2",
                              "--fidelity", "--fidelity-tokens", "40", "--passkey", "64", "--passkey-trials", "1",
                              "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "| teacher |" in printed and "| student |" in printed and "model.layers.1.self_attn" in printed
    results = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert set(results) == {"perplexity", "fidelity", "passkey"}
    assert is_png(tmp_path / "out" / "fidelity.png")


def test_eval_cli_context_table_with_the_branch_ablation(model, tokenizer, tmp_path, capsys):
    import argparse
    import json

    import dijiang

    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    hybrid = dijiang.convert(copy.deepcopy(model), {"window": 8, "window_mix_init": 1.0})
    pure = dijiang.convert(copy.deepcopy(model))
    for name, student in (("hybrid", hybrid), ("pure", pure)):
        student.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    (tmp_path / "a.txt").write_text(CORPUS)
    (tmp_path / "b.txt").write_text(CORPUS[::-1])
    parser = argparse.ArgumentParser()
    evaluate.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--teacher", str(tmp_path / "tiny"), "--student", str(tmp_path / "hybrid"),
                              "--student", f"linear={tmp_path / 'pure'}", "--text", str(tmp_path / "a.txt"),
                              "--text", str(tmp_path / "b.txt"), "--windows", "16,32", "--max-windows", "2",
                              "--branch-off", "--passkey", "64", "--passkey-trials", "1",
                              "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "| hybrid, branch off |" in printed and "linear, branch off" not in printed
    assert "needle > 8 tokens back" in printed  # the hybrid's window: what a window alone cannot retrieve
    results = json.loads((tmp_path / "out" / "eval.json").read_text())
    rows = results["context"]
    assert len(rows) == 2 * 2 * 4  # texts x windows x (teacher, hybrid, hybrid off, linear)
    assert {(r["text"], r["window"]) for r in rows} == {(t, w) for t in ("a.txt", "b.txt") for w in (16, 32)}
    for row in rows:
        if row["model"] == "teacher":
            assert row["ratio"] == 1.0
        if row["model"] == "hybrid, branch off":
            on = next(r for r in rows if r["model"] == "hybrid" and (r["text"], r["window"]) == (row["text"], row["window"]))
            assert row["branch_worth"] == pytest.approx(row["perplexity"] / on["perplexity"] - 1)
            assert row["perplexity"] != on["perplexity"]  # the branch does something in a 16/32-token window of 8
    assert set(results["passkey"]) == {"teacher", "hybrid", "hybrid, branch off", "linear"}
    assert is_png(tmp_path / "out" / "context.png")
    layer = next(layer for _, layer in dijiang.conversion.iter_dijiang_layers(hybrid))
    before = layer.window_mix.detach().clone()
    with evaluate.linear_branch_off(hybrid) as switched:
        assert switched == 2 and bool((layer.window_mix == -30).all())
    assert torch.equal(layer.window_mix, before)


def test_cache_memory_grows_with_softmax_layers_only(model, tokenizer, tmp_path, capsys):
    import argparse
    import json

    import dijiang

    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    layers = model.config.num_hidden_layers
    for name, kept in (("window", []), ("layer-hybrid", [0])):
        student = dijiang.convert(copy.deepcopy(model), {"window": 8}, layers=[i for i in range(layers) if i not in kept])
        student.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    (tmp_path / "a.txt").write_text(CORPUS)
    parser = argparse.ArgumentParser()
    evaluate.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--teacher", str(tmp_path / "tiny"), "--student", f"window={tmp_path / 'window'}",
                              "--student", f"layer-hybrid={tmp_path / 'layer-hybrid'}", "--text", str(tmp_path / "a.txt"),
                              "--windows", "16,32", "--max-windows", "1", "--cache-memory", "--out", str(tmp_path / "out"),
                              "--device", "cpu"])
    assert args.func(args) == 0
    assert "generation cache after a prefill" in capsys.readouterr().out
    rows = json.loads((tmp_path / "out" / "eval.json").read_text())["cache"]
    mib = {(r["model"], r["context"]): r["mib"] for r in rows}
    teacher_growth = mib["teacher", 32] - mib["teacher", 16]
    assert mib["teacher", 32] == pytest.approx(2 * mib["teacher", 16])
    assert mib["window", 32] == mib["window", 16]  # every layer converted: constant
    assert mib["layer-hybrid", 32] - mib["layer-hybrid", 16] == pytest.approx(teacher_growth / layers)
    assert all(r["of_teacher"] == 1.0 for r in rows if r["model"] == "teacher")
