"""scripts/probe_branch_init.py: untrained conversions by a recipe's layer settings at each branch weight, scored
next to the teacher (what SmolLM2 gives is in docs/results.md)."""
import json

import pytest
import yaml
from helpers import corpus_text, save_tiny_model
from script_loader import load_script

probe = load_script("scripts/probe_branch_init.py")


def write_recipe(tmp_path, model, **attention):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(model), "attention": attention}))
    return recipe


def test_each_weight_is_a_row_and_its_weight_is_the_layers_at_init(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text(corpus_text(length=4000))
    recipe = write_recipe(tmp_path, model, window=8, sinks=2, state_update="delta", state_decay=False,
                          checkpoint=True)
    out = tmp_path / "init.json"
    assert probe.main(["--recipe", str(recipe), "--mix", "0.1,1", "--text", str(text), "--windows", "32,64",
                       "--max-windows", "2", "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["weight"] for r in rows] == ["-", 0.1, 1.0]
    assert all(r["32"] > 1 and r["64"] > 1 for r in rows)
    assert rows[1]["32"] != rows[2]["32"]  # the weight changes the untrained model
    assert "| teacher |" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # the JSON is there: refused before any model loads
        probe.main(["--recipe", str(recipe), "--json", str(out)])
    assert "--overwrite" in capsys.readouterr().err
    settings = probe.branch_settings(yaml.safe_load(recipe.read_text()), 0.3)
    assert settings["window_mix_init"] == 0.3 and "checkpoint" not in settings and settings["window"] == 8


def test_a_recipe_without_a_window_or_a_weight_of_zero_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        probe.main(["--recipe", str(write_recipe(tmp_path, "unused", window=0))])
    assert "no softmax window" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # softplus is never 0
        probe.main(["--recipe", str(write_recipe(tmp_path, "unused", window=8)), "--mix", "0.1,0"])
    assert "--mix" in capsys.readouterr().err
