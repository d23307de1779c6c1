import argparse
import json

import pytest
import torch
from helpers import tiny_llama, tiny_tokenizer

import dijiang
from dijiang import demo

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
        "How vexingly quick daft zebras jump! In Python, a list comprehension builds a list. ") * 6


def run_tiny_demo(tmp_path, **overrides):
    tokenizer = tiny_tokenizer()
    kwargs = dict(model=tiny_llama(len(tokenizer)), tokenizer=tokenizer, tokens=512, out=tmp_path / "demo",
                  window=8, block_size=32, eval_window=48, eval_windows=2, sample_tokens=5,
                  eval_text=TEXT, train_text=TEXT, log=lambda _: None)
    kwargs.update(overrides)
    return demo.run_demo(**kwargs)


def check_outputs(result):
    assert [row["model"] for row in result.rows][0] == "teacher (softmax)"
    assert len(result.rows) == 4 and result.rows[0]["ratio"] == 1.0
    lines = result.table.splitlines()
    assert lines[0] == "| model | perplexity | ratio to teacher | context < 8 | context >= 8 |"
    assert len(lines) == 2 + 4
    written = (result.out_dir / "table.md").read_text()
    assert written.startswith(result.table)
    for row in result.rows:  # the samples run past the 8-token window, and say where
        assert demo.WINDOW_MARK in row["sample"] and f"- {row['model']}: " in written
    assert (result.out_dir / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((result.out_dir / "results.json").read_text())
    assert len(saved["rows"]) == 4 and saved["settings"]["window"] == 8 and saved["settings"]["sinks"] == 4


def test_demo_wiring_with_injected_pieces(tmp_path):
    calls = []

    def fake_convert(model, window, sinks):
        calls.append(("convert", window, sinks))
        return model

    def fake_train(source, *, window, sinks, tokens, out_dir, seed, block_size, train_file, convert_fn):
        calls.append(("train", window, sinks, tokens, block_size, train_file.read_text() == TEXT))
        model, _ = dijiang.load_pretrained(source)  # the demo saved the model it was given
        return model, [{"step": 1, "tokens": tokens, "loss": 3.0}]

    result = run_tiny_demo(tmp_path, convert_fn=fake_convert, train_fn=fake_train)
    assert calls == [("convert", 0, 0), ("convert", 8, 4), ("train", 8, 4, 512, 32, True)]
    check_outputs(result)
    # nothing was really converted or trained: every perplexity equals the teacher's
    assert all(row["ratio"] == pytest.approx(1.0) for row in result.rows)
    assert len({row["sample"] for row in result.rows}) == 1


def test_demo_end_to_end_on_a_tiny_llama(tmp_path):
    result = run_tiny_demo(tmp_path)
    check_outputs(result)
    assert result.train_log and all(r["loss"] > 0 for r in result.train_log)
    teacher, pure, hybrid = result.rows[:3]
    assert pure["ratio"] != pytest.approx(1.0)  # the conversion changed the model
    # the hybrid is exact softmax while the context fits its window: only the targets beyond it differ
    assert hybrid["near"] == pytest.approx(teacher["near"], rel=1e-4)
    assert hybrid["far"] != pytest.approx(teacher["far"], rel=1e-3)


def test_demo_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="window"):
        run_tiny_demo(tmp_path, window=0)
    with pytest.raises(ValueError, match="tokens"):
        run_tiny_demo(tmp_path, tokens=0)
    with pytest.raises(ValueError, match="sinks"):
        run_tiny_demo(tmp_path, sinks=65)


def test_demo_cli_and_counts():
    parser = argparse.ArgumentParser()
    demo.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", "--tokens", "120K", "--window", "32", "--seed", "3", "--out", "x"])
    assert (args.tokens, args.window, args.seed, args.out, args.sinks) == (120_000, 32, 3, "x", 4)
    assert parser.parse_args(["demo", "--sinks", "0"]).sinks == 0
    for bad in ("lots", "0"):
        with pytest.raises(SystemExit):
            parser.parse_args(["demo", "--tokens", bad])
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--sinks", "65"])


def test_stdlib_training_text_is_offline_and_sized():
    text = demo.stdlib_training_text(50_000, seed=1)
    assert len(text) >= 50_000 and "def " in text
    assert text == demo.stdlib_training_text(50_000, seed=1)
