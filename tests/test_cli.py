"""The command line end to end on a tiny saved model: convert, generate (plain, chat, stdin, fast), help, errors."""
import argparse
import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import save_tiny_model

import dijiang
from dijiang import cli as dijiang_cli
from dijiang.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_convert_then_generate(tiny_dir, tmp_path, capsys):
    out = tmp_path / "converted"
    assert main(["convert", "--model", str(tiny_dir), "--out", str(out), "--window", "4", "--sinks", "2",
                 "--layers", "0,1"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "dijiang_llama" and config["dijiang_layers"] == [0, 1]
    assert config["dijiang"]["window"] == 4 and config["dijiang"]["sinks"] == 2
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "the cat", "--max-new-tokens", "6"]) == 0
    plain = capsys.readouterr().out
    assert plain.startswith("the cat") and len(plain.strip()) > len("the cat")
    assert main(["generate", "--model", str(out), "--prompt", "the cat", "--max-new-tokens", "6", "--fast"]) == 0
    fast = capsys.readouterr().out
    assert fast.strip() == plain.strip()  # greedy: the fast path emits the same tokens


def test_convert_with_the_hedgehog_map_then_generate(tiny_dir, tmp_path, capsys):
    out = tmp_path / "hedgehog"
    assert main(["convert", "--model", str(tiny_dir), "--out", str(out), "--feature-map", "hedgehog"]) == 0
    assert json.loads((out / "config.json").read_text())["dijiang"]["feature_map"] == "hedgehog"
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "the cat", "--max-new-tokens", "4"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("the cat") and len(text.strip()) > len("the cat")


def test_bad_inputs_exit_2_with_a_message(tiny_dir, tmp_path, capsys):
    assert main(["convert", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no such model directory" in capsys.readouterr().err
    assert main(["convert", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--feature-map", "nope"]) == 2
    assert "unknown feature map" in capsys.readouterr().err
    assert main(["convert", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--sinks", "2"]) == 2
    assert "needs a window" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--stabiliser", "bogus"])


CHAT_TEMPLATE = ("{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}Assistant:{% endif %}")


@pytest.fixture(scope="module")
def instruct_dir(tmp_path_factory):
    """The tiny model with a chat template, as instruct models ship."""
    from helpers import tiny_tokenizer

    tokenizer = copy.deepcopy(tiny_tokenizer())
    tokenizer.chat_template = CHAT_TEMPLATE
    return save_tiny_model(tmp_path_factory.mktemp("instruct"), tokenizer=tokenizer)


def test_generate_applies_the_chat_template_of_instruct_models(instruct_dir, capsys):
    from dijiang.loading import load_pretrained
    from dijiang.generate import generate_text

    model, tokenizer = load_pretrained(str(instruct_dir))
    answer = generate_text(model.eval(), tokenizer, "the cat", max_new_tokens=6, chat=True)
    plain = generate_text(model, tokenizer, "the cat", max_new_tokens=6, chat=False)
    assert answer != plain  # the template changed what the model saw
    capsys.readouterr()
    assert main(["generate", "--model", str(instruct_dir), "--prompt", "the cat", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == answer + "\n"  # the answer alone, no prompt glued on
    assert main(["generate", "--model", str(instruct_dir), "--prompt", "the cat", "--max-new-tokens", "6",
                 "--no-chat"]) == 0
    assert capsys.readouterr().out == "the cat" + plain + "\n"


def test_chat_without_a_template_is_an_error(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "the cat", "--chat"]) == 2
    assert "no chat template" in capsys.readouterr().err


def test_generate_reads_the_prompt_from_stdin(tiny_dir, capsys, monkeypatch):
    expected = None
    for argv in (["--prompt", "the cat"], ["--prompt", "-"], []):
        monkeypatch.setattr(sys, "stdin", io.StringIO("the cat\n"))  # a pipe: not a tty
        assert main(["generate", "--model", str(tiny_dir), "--max-new-tokens", "4", *argv]) == 0
        out = capsys.readouterr().out
        assert out.startswith("the cat")
        expected = expected or out
        assert out == expected
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["generate", "--model", str(tiny_dir)]) == 2
    assert "no prompt" in capsys.readouterr().err


def test_top_level_help_and_version_import_neither_torch_nor_transformers():
    script = ("import sys\nfrom dijiang.cli import main\nfor argv in (['--help'], ['--version']):\n"
              "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
              "print('heavy:', sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    src = str(Path(dijiang_cli.__file__).resolve().parents[1])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=src))
    assert result.returncode == 0, result.stderr
    assert "generate" in result.stdout and f"dijiang {dijiang.__version__}" in result.stdout
    assert result.stdout.strip().endswith("heavy: []")


@pytest.mark.parametrize("command", sorted(dijiang_cli.COMMANDS))
def test_every_option_has_help_and_shows_its_default(command):
    parser = dijiang_cli.build_parser(command)
    subparser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    for action in subparser._actions:
        assert action.help, f"dijiang {command} {action.option_strings}: no help text"
        default = action.default
        if not (default is None or default is False or default is argparse.SUPPRESS or default == []) \
                and action.option_strings:
            shown = dijiang_cli.HelpFormatter("x")._get_help_string(action)
            assert "default" in shown, f"dijiang {command} {action.option_strings}: default not shown"
    text = " ".join(subparser.format_help().split())  # unwrapped
    if command == "train":  # its defaults are SUPPRESSed (recipe values must tell from flags): stated in the help
        assert "(default: 20M)" in text and "(default: --progress)" in text
    if command == "convert":
        assert "feature map" in text and "(default dijiang; official with --official)" in text
