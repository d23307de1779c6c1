"""The command line end to end on a tiny saved model: convert, generate (plain and fast), clear errors."""
import json

import pytest
from train_fixtures import save_tiny_model

from dijiang.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_convert_then_generate(tiny_dir, tmp_path, capsys):
    out = tmp_path / "converted"
    assert main(["convert", "--model", str(tiny_dir), "--out", str(out), "--window", "4", "--layers", "0,1"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "dijiang_llama" and config["dijiang_layers"] == [0, 1]
    assert config["dijiang"]["window"] == 4
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
    with pytest.raises(SystemExit):
        main(["convert", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--stabiliser", "bogus"])
